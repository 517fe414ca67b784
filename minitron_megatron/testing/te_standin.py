"""TransformerEngine, simulated on CPU: stand-in modules in Megatron-Core's real TE layer spec.

TransformerEngine needs CUDA, so its layer spec cannot be built on a CPU machine. What matters to
this project about it is its *shape*, not its kernels: fused norm+linear modules that own the
norm's ``layer_norm_weight`` (and ``layer_norm_bias``), separate norms replaced by ``IdentityOp``,
an ``_extra_state`` entry (FP8 metadata) on every TE module, attention whose ``_extra_state`` is in
``state_dict()`` but not in ``sharded_state_dict()``, and a TE norm as the final norm of the block.

``simulated_transformer_engine()`` makes Megatron-Core's own
``get_gpt_layer_with_transformer_engine_spec()`` build that shape from the stand-ins below (each
one Megatron-Core's local module plus the TE traits), makes ``TransformerBlock`` use a TE-like
final norm (as it does whenever TE is installed) and lets ``build_model(spec="te")`` choose it.
Checkpoints, importance hooks and pruning can then be proven on gloo ranks against the local spec.
What only a GPU can prove (TE's kernels, FP8, fused RoPE, its numerics in bf16) is left to
``benchmarks/gpu_check.py``.

Example::

    with simulated_transformer_engine():
        model = build_model(cfg, ps, spec="te")      # TE-shaped GPTModel on CPU
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention


def _extra_state() -> torch.Tensor:
    """What TE's ``get_extra_state`` returns without FP8: an empty byte tensor."""
    return torch.empty(0, dtype=torch.uint8)


class _ExtraState:
    """TE's ``_extra_state``: present in ``state_dict()``, accepted on load."""

    def get_extra_state(self) -> torch.Tensor:
        return _extra_state()

    def set_extra_state(self, state: Any) -> None:
        self.loaded_extra_state = state


def _normalize(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               config: Any) -> torch.Tensor:
    """TE's LayerNorm/RMSNorm (``zero_centered_gamma`` applies ``1 + weight``)."""
    if config.layernorm_zero_centered_gamma:
        weight = weight + 1
    h, eps = x.shape[-1], config.layernorm_epsilon
    if config.normalization == "RMSNorm":
        return F.rms_norm(x, (h,), weight, eps)
    return F.layer_norm(x, (h,), weight, bias, eps)


def _norm_params(module: torch.nn.Module, prefix: str, config: Any, hidden: int) -> None:
    dtype = config.params_dtype
    init = torch.zeros if config.layernorm_zero_centered_gamma else torch.ones
    module.register_parameter(f"{prefix}weight",
                              torch.nn.Parameter(init(hidden, dtype=dtype)))
    bias = (torch.nn.Parameter(torch.zeros(hidden, dtype=dtype))
            if config.normalization == "LayerNorm" else None)
    module.register_parameter(f"{prefix}bias", bias)
    for param in (getattr(module, f"{prefix}weight"), bias):
        if param is not None:  # TE marks norm params so Megatron sums their grads over TP
            param.sequence_parallel = config.sequence_parallel


class StandinLayerNormColumnParallelLinear(_ExtraState, ColumnParallelLinear):
    """``TELayerNormColumnParallelLinear``: the norm (its ``layer_norm_weight`` /
    ``layer_norm_bias``) applied to the sequence-local input, then the column-parallel GEMM."""

    def __init__(self, input_size: int, output_size: int, *, config: Any, **kwargs: Any):
        kwargs.pop("tp_comm_buffer_name", None)
        super().__init__(input_size, output_size, config=config, **kwargs)
        _norm_params(self, "layer_norm_", config, input_size)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        normed = _normalize(x, self.layer_norm_weight, self.layer_norm_bias, self.config)
        return super().forward(normed, *args, **kwargs)


class StandinRowParallelLinear(_ExtraState, RowParallelLinear):
    """``TERowParallelLinear``: the local row-parallel linear with TE's ``_extra_state``."""

    def __init__(self, input_size: int, output_size: int, *, config: Any, **kwargs: Any):
        kwargs.pop("tp_comm_buffer_name", None)
        super().__init__(input_size, output_size, config=config, **kwargs)


class StandinDotProductAttention(_ExtraState, DotProductAttention):
    """``TEDotProductAttention``: ``_extra_state`` in ``state_dict()``, while the inherited
    ``sharded_state_dict`` (like Megatron-Core's TE wrapper) writes nothing for it."""


class StandinNorm(_ExtraState, torch.nn.Module):
    """``TENorm`` (TE's LayerNorm/RMSNorm): ``weight`` (+ ``bias``) and ``_extra_state``."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.config = config
        _norm_params(self, "", config, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _normalize(x, self.weight, self.bias, self.config)


class StandinTESpecProvider:
    """Megatron-Core's ``BackendSpecProvider`` protocol answered with the stand-ins."""

    def linear(self) -> type:
        return ColumnParallelLinear

    def column_parallel_linear(self) -> type:
        return ColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return StandinRowParallelLinear

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self) -> type:
        return StandinLayerNormColumnParallelLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return StandinNorm

    def core_attention(self) -> type:
        return StandinDotProductAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool, moe_use_legacy_grouped_gemm: bool):
        raise NotImplementedError("the TE stand-in has no MoE modules")

    def activation_func(self) -> None:
        return None


@contextlib.contextmanager
def simulated_transformer_engine() -> Iterator[None]:
    """Within the block, ``build_model(spec="te")`` builds Megatron-Core's TE layer spec from the
    stand-ins, and every ``TransformerBlock`` ends in a TE-like norm (as with TE installed)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer import transformer_block

    from minitron_megatron.model import build

    patches = [(gpt_layer_specs, "TESpecProvider", StandinTESpecProvider),
               (transformer_block, "LayerNormImpl", StandinNorm),
               (build, "te_available", lambda: True)]
    saved = [(module, name, getattr(module, name, None)) for module, name, _ in patches]
    try:
        for module, name, value in patches:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
