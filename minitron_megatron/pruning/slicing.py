"""Which rows/columns of each Megatron-Core parameter a plan keeps (global, TP=1 layouts).

Layouts (``d`` = kv_channels, ``n`` = heads per group, ``h`` = hidden, ``F`` = ffn):

* ``linear_qkv`` rows ``[(H + 2G)·d]``: per query group ``g``, the ``n`` query heads, then its
  key head, then its value head (``d`` rows each). Kept rows: for each kept group in order, the
  rows of its kept query heads, then its key and value rows.
* ``linear_proj`` columns ``[H·d]``: head ``j`` owns columns ``j·d .. j·d+d−1``.
* ``linear_fc1`` rows: ``[F]``, or with a gated unit ``[gate (F); up (F)]`` (as assembled from
  Megatron's per-TP-shard ``[gate_r; up_r]``): neuron ``i`` owns rows ``i`` and ``F + i``.
* ``linear_fc2`` columns ``[F]``; the hidden axis is the columns of ``linear_qkv``/``fc1`` and of
  the embeddings/output layer, the rows of ``linear_proj``/``fc2``, and every norm and row-parallel
  bias.

Head residual (paper §2.3, "an MHA analog of Layer Collapse"): with the kept heads ranked
``1..K`` by score and the pruned ones ``K+1..L``, each of the last ``min(K, L−K)`` kept heads
``i`` becomes ``head_i + (head_i − head_{2K−i+1})``, applied as published to the query-projection
weights (and query bias) only, as the paper does for grouped-query attention:
``W_q[i] ← 2·W_q[i] − W_q[j]`` for each plan pair ``(i, j)``. It changes the model's function
by design (the residual of the pruned head is folded in), so masking equivalence does not apply.

Position-0 fold (on by default, ``PruneTargets.position0_fold``): at position 0 a token attends
only to itself, so every query head ``j`` of group ``g`` outputs the same vector ``v_0,g`` and the
attention output there is ``Σ_g (Σ_{j ∈ g} W_proj[:, j]) v_0,g``. Giving each of the ``k`` kept
heads of a group ``1/k`` of the group's pruned heads' columns,
``W_proj[:, i] ← W_proj[:, i] + (1/k) Σ_{j ∈ g pruned} W_proj[:, j]``, keeps every group's column
sum and so the attention output at position 0 exactly, for any first token. SmolLM2 builds its
massive activations (hidden channel 507 at ~2.5·10⁴) and its attention sink from that state; plain
slicing loses a third of it per group and the pruned model's loss then swings by ~1 nat with the
identity of the first token (``benchmarks/RESULTS_pruning.md``). Groups pruned whole are dropped.
"""

from __future__ import annotations

import torch

from minitron_megatron.config import ModelConfig
from minitron_megatron.pruning.plan import LayerPlan

Rule = dict[int, str]  # tensor dim → name of the index kept along it

LAYER_RULES: dict[str, Rule] = {
    "input_layernorm.weight": {0: "hidden"},
    "input_layernorm.bias": {0: "hidden"},
    "pre_mlp_layernorm.weight": {0: "hidden"},
    "pre_mlp_layernorm.bias": {0: "hidden"},
    "self_attention.linear_qkv.layer_norm_weight": {0: "hidden"},  # TransformerEngine fused norm
    "self_attention.linear_qkv.layer_norm_bias": {0: "hidden"},
    "mlp.linear_fc1.layer_norm_weight": {0: "hidden"},
    "mlp.linear_fc1.layer_norm_bias": {0: "hidden"},
    "self_attention.linear_qkv.weight": {0: "qkv_rows", 1: "hidden"},
    "self_attention.linear_qkv.bias": {0: "qkv_rows"},
    "self_attention.linear_proj.weight": {0: "hidden", 1: "head_channels"},
    "self_attention.linear_proj.bias": {0: "hidden"},
    "mlp.linear_fc1.weight": {0: "fc1_rows", 1: "hidden"},
    "mlp.linear_fc1.bias": {0: "fc1_rows"},
    "mlp.linear_fc2.weight": {0: "hidden", 1: "ffn"},
    "mlp.linear_fc2.bias": {0: "hidden"},
}

MODEL_RULES: dict[str, Rule] = {
    "embedding.word_embeddings.weight": {1: "hidden"},
    "embedding.position_embeddings.weight": {1: "hidden"},
    "decoder.final_layernorm.weight": {0: "hidden"},
    "decoder.final_layernorm.bias": {0: "hidden"},
    "output_layer.weight": {1: "hidden"},
}


def rule_for(name: str, rules: dict[str, Rule]) -> Rule:
    """The slicing rule of a parameter; an unknown parameter is an error, never copied blindly."""
    if name not in rules:
        raise ValueError(f"parameter {name!r} has no pruning rule (supported: GPT models with "
                         f"Megatron-Core's local or TransformerEngine layer spec).")
    return rules[name]


def is_gated_fc1(name: str, cfg: ModelConfig) -> bool:
    return cfg.gated_linear_unit and name in ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")


def _blocks(starts: list[int], width: int) -> list[int]:
    return [start + c for start in starts for c in range(width)]


def layer_index(src: ModelConfig, layer: LayerPlan, hidden: tuple[int, ...],
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Index tensors of everything one layer keeps, by the names used in ``LAYER_RULES``."""
    d, n, F = src.kv_channels, src.heads_per_group, src.ffn_hidden_size
    qkv_starts = []
    for g in layer.query_groups:
        base = g * (n + 2) * d  # the group's block of rows
        qkv_starts += [base + (j - g * n) * d for j in layer.heads if j // n == g]
        qkv_starts += [base + n * d, base + (n + 1) * d]  # key, value
    fc1_rows = list(layer.ffn) + ([F + i for i in layer.ffn] if src.gated_linear_unit else [])
    index = {"hidden": list(hidden), "ffn": list(layer.ffn), "fc1_rows": fc1_rows,
             "qkv_rows": _blocks(qkv_starts, d),
             "head_channels": _blocks([j * d for j in layer.heads], d)}
    return {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in index.items()}


def source_sizes(src: ModelConfig) -> dict[str, int]:
    """Global length of each index kind in the source model."""
    return {"hidden": src.hidden_size, "ffn": src.ffn_hidden_size,
            "fc1_rows": src.ffn_hidden_size * (2 if src.gated_linear_unit else 1),
            "qkv_rows": src.qkv_size, "head_channels": src.query_projection_size}


def query_rows(src: ModelConfig, head: int) -> slice:
    """Rows of query head ``head`` in the global ``linear_qkv``."""
    n, d = src.heads_per_group, src.kv_channels
    g = head // n
    start = (g * (n + 2) + head - g * n) * d
    return slice(start, start + d)


def fold_pruned_heads(qkv: torch.Tensor, src: ModelConfig,
                      pairs: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Head residual on a global ``linear_qkv`` weight or bias: ``W_q[i] ← 2·W_q[i] − W_q[j]``."""
    folded = qkv.clone()
    for kept, pruned in pairs:
        folded[query_rows(src, kept)] = 2 * qkv[query_rows(src, kept)] - qkv[
            query_rows(src, pruned)]
    return folded


def fold_into_groups(proj: torch.Tensor, src: ModelConfig, layer: LayerPlan) -> torch.Tensor:
    """Position-0 fold on a global ``linear_proj`` weight ``[h, H·d]`` (see the module
    docstring): each kept head's columns gain ``1/k`` of its group's pruned heads' columns."""
    n, d = src.heads_per_group, src.kv_channels
    cols = proj.view(proj.shape[0], src.num_attention_heads, d)  # [h, H, d]
    folded = cols.clone()
    kept = set(layer.heads)
    for g in layer.query_groups:
        members = range(g * n, (g + 1) * n)
        keep = [j for j in members if j in kept]
        drop = [j for j in members if j not in kept]
        if drop:
            share = cols[:, drop].sum(1) / len(keep)  # [h, d]
            folded[:, keep] += share[:, None]
    return folded.view_as(proj)


def apply_rule(tensor: torch.Tensor, rule: Rule, index: dict[str, torch.Tensor]) -> torch.Tensor:
    """Keep ``index[rule[dim]]`` along each ruled dim."""
    for dim, name in rule.items():
        tensor = tensor.index_select(dim, index[name].to(tensor.device))
    return tensor
