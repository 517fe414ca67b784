"""Input Gram matrices of the layers that read prunable units — the statistics of
``prune --reconstruct`` — gathered in the importance pass (by default into ``SCORES.stats`` next to
the scores file; ``importance --save-stats DIR`` elsewhere, ``--no-save-stats`` not at all).

For layer ``l`` and each reader kind, with ``z_t`` its input at calibration token ``t`` (every
real token of every sample)::

    G = Σ_t z_t z_tᵀ                                   [n, n], fp32

* ``proj``: input of ``linear_proj`` (the heads' outputs, ``n = H·d``, head-major);
* ``fc2``: input of ``linear_fc2`` (the neurons, ``n = F``);
* ``qkv`` / ``fc1`` (RMSNorm models): the unit-RMS residual stream ``x̂ = x / rms(x)`` entering
  the norm in front of ``linear_qkv`` / ``linear_fc1`` (``n = h``; the norm's weight ``γ`` is
  applied when solving, so a tiny ``γ_k`` loses nothing), for the hidden-channel refit.

Distributed, as the scores: each tensor-parallel rank holds the rows of its own units,
``G[r] = Z_rᵀ Z`` (``Z_r`` ``[tokens, n/tp]`` its shard of the input, ``Z`` ``[tokens, n]`` the
input all-gathered over TP for each micro-batch; the hidden channels, replicated over TP, are split
into contiguous row blocks, and with sequence parallelism their tokens are all-gathered first), so
the matrix stays sharded over TP; the rows are summed over the data-parallel group once, at the
end; each pipeline stage holds its own layers.

Stored sharded and layout-free: a directory with one safetensors file per (PP stage, TP rank),
written by its DP rank 0 — tensors ``{kind}.{layer}`` ``[rows, n]`` with their first global row in
the metadata — and ``stats.json`` (format, model config, token count), written last. Any layout
reads any rows (``GramStats.rows``), so stats gathered at one layout prune at another.

Memory: ``(n/tp)·n·4`` bytes per layer and kind on each rank; for Llama-3.1-8B (F = 14336,
h = H·d = 4096, 32 layers) 822 + 3 × 67 MB per layer, 32.7 GB in all (4.1 GB per rank at TP = 8,
PP = 1).
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from minitron_megatron.config import ModelConfig
from minitron_megatron.errors import UserError
from minitron_megatron.runtime.distributed import ParallelState

FORMAT = "minitron-gram-stats/1"
KINDS = ("proj", "fc2", "qkv", "fc1")
HIDDEN_KINDS = ("qkv", "fc1")  # readers of the (pruned) hidden channels, through a norm
META = "stats.json"


def default_stats_dir(scores: str | Path) -> Path:
    """Where ``importance`` writes the statistics by default and ``prune`` looks for them: the
    scores file with its suffix replaced by ``.stats`` (``s.safetensors`` → ``s.stats``)."""
    return Path(scores).with_suffix(".stats")


def has_stats(directory: str | Path) -> bool:
    return (Path(directory) / META).is_file()


def _gather_tp(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """``[t, n/tp]`` on each TP rank → ``[t, n]`` (units in TP-rank order)."""
    if ps.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(ps.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=ps.tp_group)
    return torch.cat(parts, dim=1)


class GramRecorder:
    """``with GramRecorder(model, ps, sample_masks) as rec:`` run the calibration forward, then
    ``rec.save(directory, model_config)`` (collective over all ranks).

    ``sample_masks``: each micro-batch's ``[b]`` mask of real samples, in order (as for
    ``ActivationRecorder``); padding rows never count."""

    def __init__(self, model: torch.nn.Module, ps: ParallelState,
                 sample_masks: list[torch.Tensor]):
        self.model, self.ps = model, ps
        config = model.config
        self.kinds = KINDS if config.normalization == "RMSNorm" else KINDS[:2]
        self.eps = config.layernorm_epsilon
        self.sp = ps.sequence_parallel and ps.tp_size > 1
        self.masks = deque(m.to(ps.device).bool() for m in sample_masks)
        self.mask: torch.Tensor | None = None
        self.grams: dict[tuple[str, int], torch.Tensor] = {}
        self.first: dict[tuple[str, int], int] = {}  # first global row held here
        self.tokens = 0
        self.handles: list[Any] = []

    def __enter__(self) -> GramRecorder:
        self.handles.append(self.model.register_forward_pre_hook(self._next_micro_batch))
        for layer in self.model.decoder.layers:
            index = layer.layer_number - 1
            for kind, module in (("proj", layer.self_attention.linear_proj),
                                 ("fc2", layer.mlp.linear_fc2)):
                self.handles.append(module.register_forward_pre_hook(
                    lambda _m, args, key=(kind, index): self._add(key, args[0])))
            if "qkv" not in self.kinds:
                continue
            for kind, norm, fused in (("qkv", layer.input_layernorm,
                                       layer.self_attention.linear_qkv),
                                      ("fc1", layer.pre_mlp_layernorm, layer.mlp.linear_fc1)):
                module = fused if hasattr(fused, "layer_norm_weight") else norm  # TE: fused
                self.handles.append(module.register_forward_pre_hook(
                    lambda _m, args, key=(kind, index): self._add_hidden(key, args[0])))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _next_micro_batch(self, module: torch.nn.Module, args: Any) -> None:
        mask = self.masks.popleft()
        self.mask = None if bool(mask.all()) else mask.nonzero()[:, 0]
        self.counted = False

    def _add(self, key: tuple[str, int], x: torch.Tensor) -> None:
        if self.mask is not None:
            x = x.index_select(1, self.mask)  # [s, b_real, n/tp]
        local = x.float().reshape(-1, x.shape[-1])  # [t, n/tp]: tokens × this rank's units
        full = _gather_tp(local, self.ps)  # [t, n]
        if key not in self.grams:
            self.grams[key] = torch.zeros(local.shape[1], full.shape[1], device=local.device)
            self.first[key] = self.ps.tp_rank * local.shape[1]
        self.grams[key].addmm_(local.T, full)  # [n/tp, n] += Z_rᵀ Z
        if not self.counted:
            self.tokens += local.shape[0]
            self.counted = True

    def _add_hidden(self, key: tuple[str, int], x: torch.Tensor) -> None:
        """``x`` ``[s(/tp), b, h]``: the residual stream entering a norm."""
        if self.mask is not None:
            x = x.index_select(1, self.mask)
        x = x.float().reshape(-1, x.shape[-1])  # [t(/tp), h]
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)  # x̂: unit RMS
        if self.sp:  # tokens are split over TP ranks: gather them
            parts = [torch.empty_like(x) for _ in range(self.ps.tp_size)]
            dist.all_gather(parts, x.contiguous(), group=self.ps.tp_group)
            x = torch.cat(parts)  # [t, h]
        rows = torch.arange(x.shape[1]).tensor_split(self.ps.tp_size)[self.ps.tp_rank]
        own = x[:, rows[0]:rows[-1] + 1]  # [t, h/tp]: this rank's rows of G
        if key not in self.grams:
            self.grams[key] = torch.zeros(own.shape[1], x.shape[1], device=x.device)
            self.first[key] = int(rows[0])
        self.grams[key].addmm_(own.T, x)  # [h/tp, h] += X̂_rᵀ X̂

    def save(self, directory: str | Path, model_config: ModelConfig) -> Path:
        """Sum over DP, write this (stage, TP rank)'s rows, then the metadata (rank 0, last).
        Collective over all ranks."""
        ps, directory = self.ps, Path(directory)
        tokens = torch.tensor([float(self.tokens)], device=ps.device)
        if ps.dp_size > 1:
            for gram in self.grams.values():
                dist.all_reduce(gram, group=ps.dp_group)  # [n/tp, n]: Σ over DP ranks
            dist.all_reduce(tokens, group=ps.dp_group)
        tokens = int(tokens.item())
        if ps.dp_rank == 0:
            from safetensors.torch import save_file

            directory.mkdir(parents=True, exist_ok=True)
            rows = {f"{kind}.{layer}": g.cpu().contiguous()
                    for (kind, layer), g in sorted(self.grams.items())}
            first = {f"{kind}.{layer}": row for (kind, layer), row in self.first.items()}
            name = f"gram-pp{ps.pp_rank}-tp{ps.tp_rank}.safetensors"
            tmp = directory / f".{name}.tmp"
            save_file(rows, str(tmp), metadata={"format": FORMAT, "first_row": json.dumps(first)})
            tmp.replace(directory / name)
        if dist.is_initialized():
            dist.barrier()
        if ps.rank == 0:
            meta = {"format": FORMAT, "model_config": model_config.to_dict(), "tokens": tokens,
                    "kinds": list(self.kinds)}
            (directory / META).write_text(json.dumps(meta, indent=1) + "\n")
        if dist.is_initialized():
            dist.barrier()
        return directory


class GramStats:
    """Read access to a stats directory written by ``GramRecorder.save`` (any layout)."""

    def __init__(self, directory: Path, model_config: ModelConfig, tokens: int,
                 shards: dict[str, list[tuple[int, Path]]], kinds: tuple[str, ...] = KINDS):
        self.directory, self.model_config, self.tokens = directory, model_config, tokens
        self.kinds = kinds
        self.shards = shards  # tensor name → [(first global row, file)], by first row

    @classmethod
    def load(cls, directory: str | Path) -> GramStats:
        from safetensors import safe_open

        directory = Path(directory)
        meta_path = directory / META
        if not meta_path.is_file():
            raise UserError(f"{directory} holds no reconstruction statistics ({META} missing); "
                            f"write them with `minitron importance ... --save-stats "
                            f"{directory}`.")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise UserError(f"{meta_path} is not a {FORMAT} file; rewrite it with "
                            f"`minitron importance --save-stats`.")
        shards: dict[str, list[tuple[int, Path]]] = {}
        for path in sorted(directory.glob("gram-pp*-tp*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                first = json.loads(handle.metadata()["first_row"])
            for name, row in first.items():
                shards.setdefault(name, []).append((int(row), path))
        for parts in shards.values():
            parts.sort()
        cfg = ModelConfig.from_dict(meta["model_config"])
        stats = cls(directory, cfg, int(meta["tokens"]), shards, tuple(meta["kinds"]))
        missing = [f"{k}.{layer}" for k in stats.kinds for layer in range(cfg.num_layers)
                   if f"{k}.{layer}" not in shards]
        if missing:
            raise UserError(f"{directory} lacks the statistics of {', '.join(missing[:4])}; "
                            f"rewrite it with `minitron importance --save-stats`.")
        return stats

    def width(self, kind: str) -> int:
        cfg = self.model_config
        return {"proj": cfg.num_attention_heads * cfg.kv_channels, "fc2": cfg.ffn_hidden_size,
                "qkv": cfg.hidden_size, "fc1": cfg.hidden_size}[kind]

    def rows(self, kind: str, layer: int, index: torch.Tensor) -> torch.Tensor:
        """``G[index, :]`` of layer ``layer``'s ``kind`` Gram matrix, ``[len(index), n]`` fp32."""
        from safetensors import safe_open

        name = f"{kind}.{layer}"
        out = torch.empty(len(index), self.width(kind))
        index = index.cpu()
        for first, path in self.shards[name]:
            with safe_open(str(path), framework="pt") as handle:
                block = handle.get_slice(name)
                count = block.get_shape()[0]
                inside = ((index >= first) & (index < first + count)).nonzero()[:, 0]
                if len(inside):
                    lo, hi = int(index[inside].min()), int(index[inside].max()) + 1
                    rows = block[lo - first:hi - first]  # only the span of needed rows
                    out[inside] = rows[index[inside] - lo]
        return out
