"""Model building: the kernel fusions chosen for a GPU are ones Megatron-Core accepts for every
architecture and spec (a gelu MLP without biases, a TE-only fusion on the local spec and a
persistent LayerNorm under the torch norm each made the first GPU run fail), and none on CPU."""

from __future__ import annotations

import itertools

import pytest
import torch.nn.functional as F

from minitron_megatron.config import ModelConfig
from minitron_megatron.model import build

ARCHS = list(itertools.product(("silu", "gelu", "relu"), (True, False), (True, False)))


@pytest.mark.parametrize(("activation", "gated", "bias"), ARCHS)
@pytest.mark.parametrize("spec", ["local", "te"])
def test_gpu_fusions_are_accepted_by_megatron(activation, gated, bias, spec):
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = ModelConfig(num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                      vocab_size=128, activation=activation, gated_linear_unit=gated,
                      add_bias_linear=bias)
    flags = build._fusions(cfg, on_gpu=True, spec=spec)
    checkable = {k: v for k, v in flags.items() if k != "apply_rope_fusion"}  # needs TE here
    TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                      activation_func={"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[activation],
                      gated_linear_unit=gated, add_bias_linear=bias, **checkable)
    assert flags["persist_layer_norm"] is False  # WrappedTorchNorm asserts it is off
    assert flags["apply_rope_fusion"] == (spec == "te")  # TE's fused RoPE kernel
    assert flags["bias_activation_fusion"] == (
        (activation == "gelu" and (gated or bias)) or (activation == "silu" and gated))
    assert not any(build._fusions(cfg, on_gpu=False, spec=spec).values())


def test_te_spec_needs_transformer_engine():
    assert build.resolve_spec("auto") == "local"  # this machine: no CUDA
    with pytest.raises(ValueError, match="TransformerEngine layer spec needs CUDA"):
        build.resolve_spec("te")
