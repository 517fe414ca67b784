"""``PrunePlan``: the target shape and the kept indices of every axis, decided from ``Scores``.

The plan is a pure function of the scores file and the targets, so every rank (and every
layout) computes the same plan; ``fingerprint`` lets ranks check that. Kept indices are the
top-k by score (ties broken by the lower index), listed in their original order.

Selection, per kept layer ``l`` (source index):

* neurons: top ``ffn_hidden_size`` of ``scores.ffn[l]``;
* query groups: top ``num_query_groups`` of ``scores.query_groups[l]``; then, in each kept group,
  its top ``heads / groups`` query heads by ``scores.heads[l]`` (the group's key/value head stays);
* embedding channels (one set for the whole residual stream): top ``hidden_size`` of
  ``scores.hidden`` (both norms of every layer summed);
* layers: ``drop_layers``, or the ``L − num_layers`` lowest ``bi`` / ``loss`` scores, or the
  contiguous block of ``L − num_layers`` layers with the lowest ``block:K`` score.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch

from minitron_megatron.config import ModelConfig
from minitron_megatron.errors import UserError
from minitron_megatron.importance.scores import Scores
from minitron_megatron.pruning.targets import PruneTargets


@dataclass(frozen=True)
class LayerPlan:
    """What one kept layer keeps (indices into the source layer's units)."""

    source: int
    """Global index of the layer in the source model."""

    ffn: tuple[int, ...]
    query_groups: tuple[int, ...]
    heads: tuple[int, ...]
    """Kept query heads (source numbering), group by group."""

    head_residual: tuple[tuple[int, int], ...] = ()
    """``(kept, pruned)`` query-head pairs folded by the head-residual option."""


@dataclass(frozen=True)
class PrunePlan:
    """Source and target configs and the kept indices (same on every rank)."""

    source: ModelConfig
    target: ModelConfig
    hidden: tuple[int, ...]
    """Kept embedding channels."""

    layers: tuple[LayerPlan, ...]
    """One entry per target layer, in order (target layer ``t`` is ``layers[t].source``)."""

    position0_fold: bool = False
    """Pruned query heads' ``linear_proj`` columns are folded into their group's kept heads
    (``PruneTargets.position0_fold``; plans written before it existed did not fold)."""

    def to_dict(self) -> dict:
        return {"source": self.source.to_dict(), "target": self.target.to_dict(),
                "hidden": list(self.hidden), "layers": [asdict(layer) for layer in self.layers],
                "position0_fold": self.position0_fold}

    @classmethod
    def from_dict(cls, data: dict) -> PrunePlan:
        layers = tuple(LayerPlan(source=d["source"], ffn=tuple(d["ffn"]),
                                 query_groups=tuple(d["query_groups"]), heads=tuple(d["heads"]),
                                 head_residual=tuple(tuple(p) for p in d["head_residual"]))
                       for d in data["layers"])
        return cls(source=ModelConfig.from_dict(data["source"]),
                   target=ModelConfig.from_dict(data["target"]), hidden=tuple(data["hidden"]),
                   layers=layers, position0_fold=bool(data.get("position0_fold", False)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def top_k(scores: torch.Tensor, k: int) -> tuple[int, ...]:
    """Indices of the ``k`` highest scores (ties: lower index first), in increasing order."""
    order = torch.argsort(-scores.double(), stable=True)[:k]  # [k] best first
    return tuple(sorted(order.tolist()))


def _depth_scores(scores: Scores, name: str, cli_metric: str) -> torch.Tensor:
    if name not in scores.depth:
        have = ", ".join(sorted(scores.depth)) or "none"
        raise UserError(f"the scores file has no {name!r} depth scores (it has: {have}); "
                        f"recompute with `minitron importance ... --depth-metrics {cli_metric}` "
                        f"or choose another --depth-method.")
    return scores.depth[name]


def kept_layers(scores: Scores, targets: PruneTargets, num_layers: int) -> tuple[int, ...]:
    L = scores.model_config.num_layers
    if targets.drop_layers is not None:
        return tuple(i for i in range(L) if i not in set(targets.drop_layers))
    drop = L - num_layers
    if drop == 0:
        return tuple(range(L))
    if targets.depth_method == "block":
        block = _depth_scores(scores, f"block:{drop}", f"block:{drop}")
        start = int(torch.argsort(block.double(), stable=True)[0])  # least harmful block
        return tuple(i for i in range(L) if not start <= i < start + drop)
    metric = _depth_scores(scores, targets.depth_method, targets.depth_method)
    return top_k(metric, num_layers)


def _residual_pairs(head_scores: torch.Tensor, kept: tuple[int, ...]) -> tuple:
    """Paper §2.3: rank the kept heads 1..K and the pruned heads K+1..L by score; kept head
    K−m pairs with pruned head K+1+m (the weakest kept head takes the strongest pruned one)."""
    kept_set = set(kept)
    pruned = [j for j in range(head_scores.numel()) if j not in kept_set]
    by_score = torch.argsort(-head_scores.double(), stable=True).tolist()  # best first
    kept_ranked = [j for j in by_score if j in kept_set]
    pruned_ranked = [j for j in by_score if j in set(pruned)]
    pairs = min(len(kept_ranked), len(pruned_ranked))
    return tuple((kept_ranked[len(kept_ranked) - 1 - m], pruned_ranked[m]) for m in range(pairs))


def make_plan(scores: Scores, targets: PruneTargets) -> PrunePlan:
    """Decide what to keep. Pure and cheap: raises an actionable ``ValueError`` for bad targets
    before any model is touched.

    Example::

        scores = Scores.load("scores.safetensors")
        plan = make_plan(scores, PruneTargets(ffn_hidden_size=960, hidden_size=384,
                                              num_attention_heads=6, num_query_groups=3))
        plan.target.num_parameters()   # the pruned size
        plan.layers[0].heads           # query heads layer 0 keeps, e.g. (0, 2, 4, 5, 6, 8)
    """
    src = scores.model_config
    target = targets.target_config(src)
    n, n_kept = src.heads_per_group, target.heads_per_group
    layers = []
    for layer in kept_layers(scores, targets, target.num_layers):
        groups = top_k(scores.query_groups[layer], target.num_query_groups)
        heads = tuple(g * n + j for g in groups
                      for j in top_k(scores.heads[layer, g * n:(g + 1) * n], n_kept))
        pairs = ()
        if targets.head_residual and len(heads) < src.num_attention_heads:
            pairs = _residual_pairs(scores.heads[layer], heads)
        layers.append(LayerPlan(source=layer,
                                ffn=top_k(scores.ffn[layer], target.ffn_hidden_size),
                                query_groups=groups, heads=heads, head_residual=pairs))
    return PrunePlan(source=src, target=target, hidden=top_k(scores.hidden, target.hidden_size),
                     layers=tuple(layers), position0_fold=targets.position0_fold)
