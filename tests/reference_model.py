"""A plain-PyTorch GPT (no Megatron, no hooks) that reads a TP=1 Megatron state dict and returns
every activation the importance formulas use. Used as the independent reference in tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minitron_megatron.config import ModelConfig


def _norm(cfg: ModelConfig, sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    w = sd[prefix + ".weight"]
    if cfg.normalization == "RMSNorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_epsilon) * w
    return F.layer_norm(x, (x.shape[-1],), w, sd[prefix + ".bias"], cfg.norm_epsilon)


def _linear(sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    y = x @ sd[prefix + ".weight"].T
    return y + sd[prefix + ".bias"] if prefix + ".bias" in sd else y


def _rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """x [b, s, heads, d], rotate-half RoPE."""
    s, d = x.shape[1], x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = torch.outer(torch.arange(s, dtype=torch.float64), inv)  # [s, d/2]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[None, :, None].to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1)[None, :, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def forward(cfg: ModelConfig, sd: dict, tokens: torch.Tensor, skip: tuple[int, ...] = ()):
    """Run the model; returns ``(logits [b, s, V], acts)`` where ``acts[l]`` holds the layer's
    ``norm1, norm2`` [b, s, h], ``heads`` [b, s, H, d] (attention output per head), ``fc1``
    [b, s, (2)F] (pre-activation), ``act`` [b, s, F] (input of fc2), ``x_in, x_mid, x_out``
    (the layer's input, the residual after attention, the layer's output)."""
    sd = {k: v.double() for k, v in sd.items() if torch.is_tensor(v)}
    b, s = tokens.shape
    H, G, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    n = H // G
    x = sd["embedding.word_embeddings.weight"][tokens]
    if cfg.position_embedding_type == "learned_absolute":
        x = x + sd["embedding.position_embeddings.weight"][:s]
    causal = torch.full((s, s), float("-inf"), dtype=torch.float64).triu(1)
    acts = []
    for layer in range(cfg.num_layers):
        p = f"decoder.layers.{layer}."
        x_in = x
        norm1 = _norm(cfg, sd, p + "input_layernorm", x)
        qkv = _linear(sd, p + "self_attention.linear_qkv", norm1).view(b, s, G, n + 2, d)
        q = qkv[:, :, :, :n].reshape(b, s, H, d)
        k, v = qkv[:, :, :, n], qkv[:, :, :, n + 1]  # [b, s, G, d]
        if cfg.position_embedding_type == "rope":
            q, k = _rope(q, cfg.rotary_base), _rope(k, cfg.rotary_base)
        k = k.repeat_interleave(n, dim=2)  # head j uses group j // n
        v = v.repeat_interleave(n, dim=2)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d) + causal
        heads = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v)  # [b, s, H, d]
        x = x + _linear(sd, p + "self_attention.linear_proj", heads.reshape(b, s, H * d))
        x_mid = x
        norm2 = _norm(cfg, sd, p + "pre_mlp_layernorm", x)
        fc1 = _linear(sd, p + "mlp.linear_fc1", norm2)
        if cfg.gated_linear_unit:
            gate, up = fc1.chunk(2, dim=-1)
            act = F.silu(gate) * up if cfg.activation == "silu" else F.gelu(gate) * up
        else:
            act = F.gelu(fc1) if cfg.activation == "gelu" else F.silu(fc1)
        x = x + _linear(sd, p + "mlp.linear_fc2", act)
        if layer in skip:
            x = x_in
        acts.append(dict(norm1=norm1, norm2=norm2, heads=heads, fc1=fc1, act=act, x_in=x_in,
                         x_mid=x_mid, x_out=x))
    x = _norm(cfg, sd, "decoder.final_layernorm", x)
    out = sd["embedding.word_embeddings.weight" if cfg.tie_embeddings else "output_layer.weight"]
    return x @ out.T, acts


def loss(cfg: ModelConfig, sd: dict, tokens: torch.Tensor, labels: torch.Tensor,
         skip: tuple[int, ...] = ()) -> float:
    logits, _ = forward(cfg, sd, tokens, skip)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()


def seq_agg(a: torch.Tensor, how: str) -> torch.Tensor:
    """a [b, s, k] → [b, k]."""
    return {"mean": lambda: a.abs().mean(1), "l2": lambda: a.pow(2).sum(1).sqrt(),
            "var": lambda: a.var(1, unbiased=False), "max": lambda: a.abs().amax(1)}[how]()


def batch_agg(m: torch.Tensor, how: str) -> torch.Tensor:
    """m [N, k] → [k]."""
    return {"l2": lambda: m.pow(2).sum(0).sqrt(), "mean": lambda: m.abs().mean(0),
            "var": lambda: m.var(0, unbiased=False)}[how]()
