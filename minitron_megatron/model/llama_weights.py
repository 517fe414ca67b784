"""Llama-family (and Nemotron) weights: Hugging Face names and layouts ⇄ Megatron-Core's (TP=1,
local spec).

Megatron's ``linear_qkv`` interleaves per query group: for each group, its query heads, then its
key head, then its value head (``kv_channels`` rows each). With a gated MLP, ``linear_fc1`` is
``[gate; up]``; without (Nemotron), it is HF's ``up_proj``. LayerNorm biases map one to one.
Vocabulary rows are padded to ``padded_vocab_size`` with zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from minitron_megatron.config import ModelConfig
from minitron_megatron.errors import UserError

Tensors = Callable[[str], torch.Tensor]


def interleave_qkv(cfg: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """``[q; k; v]`` as HF stores them → Megatron's per-group ``[q_1..q_n, k, v]`` rows."""
    g, d = cfg.num_query_groups, cfg.kv_channels
    rest = q.shape[1:]
    q = q.reshape(g, cfg.heads_per_group * d, *rest)  # (groups, heads/group · d, …)
    k = k.reshape(g, d, *rest)
    v = v.reshape(g, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(cfg.qkv_size, *rest)


def split_qkv(cfg: ModelConfig, qkv: torch.Tensor):
    """Inverse of :func:`interleave_qkv`: Megatron ``linear_qkv`` rows → HF ``(q, k, v)``."""
    g, d, n = cfg.num_query_groups, cfg.kv_channels, cfg.heads_per_group
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (n + 2) * d, *rest)
    q, k, v = torch.split(grouped, [n * d, d, d], dim=1)
    return (q.reshape(g * n * d, *rest), k.reshape(g * d, *rest), v.reshape(g * d, *rest))


def pad_vocab(cfg: ModelConfig, weight: torch.Tensor) -> torch.Tensor:
    extra = cfg.padded_vocab_size - weight.shape[0]
    if extra < 0:
        raise UserError(f"embedding has {weight.shape[0]} rows, more than padded_vocab_size "
                        f"{cfg.padded_vocab_size}.")
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])]) if extra else weight


def _norms(cfg: ModelConfig, layer: int) -> list[tuple[str, str]]:
    """(Megatron, HF) names of a layer's norm parameters (``-1``: the final norm)."""
    if layer < 0:
        pairs = [("decoder.final_layernorm", "model.norm")]
    else:
        pairs = [(f"decoder.layers.{layer}.input_layernorm",
                  f"model.layers.{layer}.input_layernorm"),
                 (f"decoder.layers.{layer}.pre_mlp_layernorm",
                  f"model.layers.{layer}.post_attention_layernorm")]
    params = ("weight", "bias") if cfg.normalization == "LayerNorm" else ("weight",)
    return [(f"{mc}.{p}", f"{hf}.{p}") for mc, hf in pairs for p in params]


def hf_to_megatron(cfg: ModelConfig, get: Tensors) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield Megatron state-dict entries, reading HF tensors one at a time through ``get``."""
    yield "embedding.word_embeddings.weight", pad_vocab(cfg, get("model.embed_tokens.weight"))
    for i in range(cfg.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf + "self_attn."
        for mc_name, hf_name in _norms(cfg, i):
            yield mc_name, get(hf_name)
        yield mc + "self_attention.linear_qkv.weight", interleave_qkv(
            cfg, get(attn + "q_proj.weight"), get(attn + "k_proj.weight"),
            get(attn + "v_proj.weight"))
        if cfg.add_qkv_bias:
            yield mc + "self_attention.linear_qkv.bias", interleave_qkv(
                cfg, get(attn + "q_proj.bias"), get(attn + "k_proj.bias"),
                get(attn + "v_proj.bias"))
        yield mc + "self_attention.linear_proj.weight", get(attn + "o_proj.weight")
        mlp = hf + "mlp."
        fc1 = ([get(mlp + "gate_proj.weight")] if cfg.gated_linear_unit else [])
        yield mc + "mlp.linear_fc1.weight", torch.cat(fc1 + [get(mlp + "up_proj.weight")])
        yield mc + "mlp.linear_fc2.weight", get(mlp + "down_proj.weight")
    for mc_name, hf_name in _norms(cfg, -1):
        yield mc_name, get(hf_name)
    if not cfg.tie_embeddings:
        yield "output_layer.weight", pad_vocab(cfg, get("lm_head.weight"))


def megatron_to_hf(cfg: ModelConfig, get: Tensors) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield HF Llama state-dict entries from Megatron (TP=1) tensors read through ``get``."""
    v = cfg.vocab_size
    yield "model.embed_tokens.weight", get("embedding.word_embeddings.weight")[:v]
    for i in range(cfg.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf + "self_attn."
        for mc_name, hf_name in _norms(cfg, i):
            yield hf_name, get(mc_name)
        q, k, val = split_qkv(cfg, get(mc + "self_attention.linear_qkv.weight"))
        yield from ((attn + "q_proj.weight", q), (attn + "k_proj.weight", k),
                    (attn + "v_proj.weight", val))
        if cfg.add_qkv_bias:
            q, k, val = split_qkv(cfg, get(mc + "self_attention.linear_qkv.bias"))
            yield from ((attn + "q_proj.bias", q), (attn + "k_proj.bias", k),
                        (attn + "v_proj.bias", val))
        yield attn + "o_proj.weight", get(mc + "self_attention.linear_proj.weight")
        fc1 = get(mc + "mlp.linear_fc1.weight")
        if cfg.gated_linear_unit:
            gate, fc1 = torch.chunk(fc1, 2)
            yield hf + "mlp.gate_proj.weight", gate
        yield hf + "mlp.up_proj.weight", fc1
        yield hf + "mlp.down_proj.weight", get(mc + "mlp.linear_fc2.weight")
    for mc_name, hf_name in _norms(cfg, -1):
        yield hf_name, get(mc_name)
    if not cfg.tie_embeddings:
        yield "lm_head.weight", get("output_layer.weight")[:v]


def unpermute_gguf_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (it stores each head's rotary halves interleaved)."""
    rows = weight.shape[0]
    per_head = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return per_head.transpose(1, 2).reshape(weight.shape)
