"""Forward hooks on one pipeline stage's Megatron-Core modules, one kind per measured axis.

Each hook turns the module's activation into per-token values ``a[s, b, k]`` (fp32), aggregates
them over the sequence (``aggregate.sequence_aggregate``) and adds the real samples' rows to the
running batch moments of its (layer, axis). Per module kind:

* **norms** (``input_layernorm`` / ``pre_mlp_layernorm`` output, or, with TransformerEngine's
  fused ``LayerNormLinear``, the norm recomputed from its input): ``a[s, b, c]`` = the norm's
  output channel ``c`` — embedding-channel importance (``hidden``, ``[2, h]`` per layer);
* **attention** (input of ``linear_proj``, ``[s, b, heads · d]``): ``a[s, b, j]`` = ‖o_j‖₂, the
  L2 norm over the ``d`` channels of head ``j``'s attention output; a **query group** ``g`` is
  scored from the joint output of its heads, ``a[s, b, g] = sqrt(Σ_{j ∈ g} ‖o_j‖₂²)`` (the norm of
  everything the group feeds into ``linear_proj``), aggregated like the heads;
* **MLP** (default: input of ``linear_fc2``, i.e. act(gate)·up): ``a[s, b, i]`` = neuron ``i``'s
  value; with ``ffn_hook="fc1-output"``: the pre-activation X·W1ᵢᵀ + b1ᵢ, and for a gated unit
  the norm of the neuron's two ``linear_fc1`` rows' outputs, ``sqrt(gateᵢ² + upᵢ²)``;
* **layers** (``TransformerLayer`` input and output): ``cos[s, b]`` = cos(x_in, x_out) per token;
  its mean over all tokens of all samples gives block importance BI = 1 − E[cos].

Activations sharded over tensor-parallel ranks (heads, groups, neurons) stay local here; norm
outputs and layer states that are sequence-sharded (sequence parallel) are reduced over the TP
group inside the hook. ``finalize`` merges data-parallel ranks and gathers the TP shards.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from minitron_megatron.config import ModelConfig
from minitron_megatron.importance.aggregate import Moments, Scratch, sequence_aggregate
from minitron_megatron.importance.config import ImportanceConfig
from minitron_megatron.runtime.distributed import ParallelState

SHARDED_AXES = ("ffn", "heads", "query_groups")  # split over TP ranks (gathered at the end)


def _gather_tp(vector: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """This rank's contiguous slice ``[k / tp]`` → the full vector ``[k]`` (TP rank order)."""
    if ps.tp_size == 1:
        return vector
    parts = [torch.empty_like(vector) for _ in range(ps.tp_size)]
    dist.all_gather(parts, vector.contiguous(), group=ps.tp_group)
    return torch.cat(parts)


class ActivationRecorder:
    """``with ActivationRecorder(...) as rec:`` run the calibration forward; then ``finalize``.

    ``sample_masks`` holds, in order, each micro-batch's ``[b]`` mask of real samples (padding
    rows of a short last micro-batch are 0 and never counted); a pre-hook on the stage model
    advances through it, since every stage runs every micro-batch once, in order.
    """

    def __init__(self, model: torch.nn.Module, ps: ParallelState, config: ImportanceConfig,
                 model_config: ModelConfig, sample_masks: list[torch.Tensor]):
        self.model, self.ps, self.config, self.cfg = model, ps, config, model_config
        self.masks = deque(m.to(ps.device).bool() for m in sample_masks)
        self.mask: torch.Tensor | None = None
        self.sp_group = ps.tp_group if ps.sequence_parallel and ps.tp_size > 1 else None
        self.moments: dict[tuple[int, str], Moments] = {}
        self.scratch = Scratch()
        self.handles: list[Any] = []
        self.want_bi = "bi" in config.depth_metrics

    # ------------------------------------------------------------------ registration
    def __enter__(self) -> ActivationRecorder:
        self.handles.append(self.model.register_forward_pre_hook(self._next_micro_batch))
        for layer in self.model.decoder.layers:
            self._register_layer(layer.layer_number - 1, layer)
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _register_layer(self, index: int, layer: torch.nn.Module) -> None:
        attention, mlp = layer.self_attention, layer.mlp
        for slot, norm, fused in ((0, layer.input_layernorm, attention.linear_qkv),
                                  (1, layer.pre_mlp_layernorm, mlp.linear_fc1)):
            if hasattr(fused, "layer_norm_weight"):  # TransformerEngine LayerNormLinear
                self._pre_hook(fused, self._fused_norm_hook(index, slot))
            else:
                self.handles.append(norm.register_forward_hook(self._norm_hook(index, slot)))
        self._pre_hook(attention.linear_proj, self._attention_hook(index))
        if self.config.ffn_hook == "fc2-input":
            self._pre_hook(mlp.linear_fc2, self._fc2_input_hook(index))
        else:
            self.handles.append(mlp.linear_fc1.register_forward_hook(self._fc1_output_hook(index)))
        if self.want_bi:
            self.handles.append(layer.register_forward_hook(self._layer_hook(index),
                                                            with_kwargs=True))

    def _pre_hook(self, module: torch.nn.Module, fn) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda _m, args: fn(_m, args[0])))

    def _next_micro_batch(self, module: torch.nn.Module, args: Any) -> None:
        mask = self.masks.popleft()
        self.mask = None if bool(mask.all()) else mask  # None: every row is a real sample

    def _real(self, rows: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return rows if self.mask is None else rows.index_select(dim, self.mask.nonzero()[:, 0])

    def _add(self, index: int, axis: str, a: torch.Tensor, sp: bool = False) -> None:
        """Per-token values ``a[s, b, k]`` → sequence aggregate → batch moments."""
        m = sequence_aggregate(a, self.config.seq_agg, self.sp_group if sp else None,
                               self.scratch)  # [b, k]
        key = (index, axis)
        if key not in self.moments:
            self.moments[key] = Moments(m.shape[1], device=m.device)
        self.moments[key].update(self._real(m))

    # ------------------------------------------------------------------ hooks per module kind
    def _norm_hook(self, index: int, slot: int):
        def hook(module, args, output):
            self._add(index, f"hidden.{slot}", output, sp=True)  # [s(/tp), b, h]
        return hook

    def _fused_norm_hook(self, index: int, slot: int):
        cfg = self.model.config

        def hook(module, x):
            h = x.shape[-1]
            weight = module.layer_norm_weight.float()
            if getattr(cfg, "layernorm_zero_centered_gamma", False):
                weight = weight + 1
            if cfg.normalization == "RMSNorm":
                y = F.rms_norm(x.float(), (h,), weight, cfg.layernorm_epsilon)
            else:
                y = F.layer_norm(x.float(), (h,), weight, module.layer_norm_bias.float(),
                                 cfg.layernorm_epsilon)
            self._add(index, f"hidden.{slot}", y, sp=True)
        return hook

    def _attention_hook(self, index: int):
        d, per_group = self.cfg.kv_channels, self.cfg.heads_per_group

        def hook(module, x):
            s, b, _ = x.shape
            heads = torch.linalg.vector_norm(x.float().view(s, b, -1, d), dim=-1)  # [s, b, np]
            groups = heads.square().view(s, b, -1, per_group).sum(-1).sqrt()  # [s, b, ng]
            self._add(index, "heads", heads)
            self._add(index, "query_groups", groups)
        return hook

    def _fc2_input_hook(self, index: int):
        def hook(module, x):
            self._add(index, "ffn", x)  # [s, b, ffn / tp]
        return hook

    def _fc1_output_hook(self, index: int):
        gated = self.cfg.gated_linear_unit

        def hook(module, args, output):
            out, bias = output if isinstance(output, tuple) else (output, None)
            pre = out.float() if bias is None else out.float() + bias.float()  # [s, b, (2)f/tp]
            if gated:
                gate, up = pre.chunk(2, dim=-1)  # this shard's [gate; up]
                pre = torch.sqrt(gate.square() + up.square())  # [s, b, f/tp]
            self._add(index, "ffn", pre)
        return hook

    def _layer_hook(self, index: int):
        def hook(module, args, kwargs, output):
            x_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            x_out = output[0] if isinstance(output, tuple) else output
            x_in, x_out = x_in.float(), x_out.float()  # [s(/tp), b, h]
            norms = torch.linalg.vector_norm(x_in, dim=-1) * torch.linalg.vector_norm(x_out, dim=-1)
            cos = torch.linalg.vecdot(x_in, x_out, dim=-1) / norms.clamp_(min=1e-8)  # [s(/tp), b]
            # (three fused row reductions: F.cosine_similarity normalises both tensors first,
            # twice the hook's cost on CPU)
            key = (index, "bi")
            if key not in self.moments:
                self.moments[key] = Moments(1, device=cos.device)
            self.moments[key].update(self._real(cos, 1).reshape(-1, 1))  # one row per token
        return hook

    # ------------------------------------------------------------------ reduction
    def finalize(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per local layer: ``{axis: score}`` with full-length vectors, the same on every rank
        of the stage. Collective over the DP group (and the TP group)."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        for (index, axis), moments in sorted(self.moments.items()):
            if axis == "bi" and self.sp_group is not None:
                moments.reduce(self.sp_group)  # tokens were split over TP ranks
            moments.reduce(self.ps.dp_group)
            if axis == "bi":
                score = moments.state[1]  # E[cos] over all tokens, [1]
            else:
                score = moments.result(self.config.batch_agg)
            if axis in SHARDED_AXES:
                score = _gather_tp(score, self.ps)
            out.setdefault(index, {})[axis] = score
        return out
