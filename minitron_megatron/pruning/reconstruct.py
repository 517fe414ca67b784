"""``prune --reconstruct``: closed-form least squares for the layers that read pruned units.

A layer reads ``n`` units ``z`` — ``linear_proj`` the heads' output channels (``n = H·d``),
``linear_fc2`` the neurons (``n = F``) — with weight ``W`` ``[h, n]``. Pruning keeps the units
``K`` and the output rows ``R`` (the kept hidden channels). The new weight ``X`` ``[|R|, |K|]``
minimises, over the calibration tokens ``t`` of the unpruned model,

    Σ_t ‖W_R z_t − X z_{t,K}‖² + λ‖X‖²,      λ = ridge · mean_{k ∈ K} G_kk,

with ``G = Σ_t z_t z_tᵀ`` (``importance.stats``); the solution reads only the ``|K| × n`` rows::

    Xᵀ = A⁻¹ B,      A = G_KK + λI  [|K|, |K|],      B = G_K,: W_Rᵀ  [|K|, |R|].

With the position-0 fold (``linear_proj``, on by default) ``X`` must also keep each kept query
group's column sum, ``Σ_{i ∈ K ∩ g} X[:, i·d + c] = Σ_{j ∈ g} W_R[:, j·d + c]`` for every kept
group ``g`` and channel ``c`` — written ``C Xᵀ = E`` — so the attention output at position 0
stays exact (``pruning.slicing``). The constrained minimiser (Lagrange multipliers)::

    Xᵀ = X₀ᵀ − A⁻¹Cᵀ (C A⁻¹ Cᵀ)⁻¹ (C X₀ᵀ − E),      X₀ᵀ = A⁻¹ B.

Solved in fp64 (Cholesky) on the device of the weight; each layer independently (its inputs are
the unpruned model's), biases kept as sliced. Every rank that owns a layer reads the same rows
from the stats directory and solves the same system, so the result does not depend on the layout.
Peak extra memory per layer: the ``|K| × n`` rows and ``A`` in fp64 — for Llama-3.1-8B's MLP
pruned 14336 → 9216: 1.06 GB + 0.68 GB.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from minitron_megatron.config import ModelConfig
from minitron_megatron.errors import UserError
from minitron_megatron.importance.stats import KINDS, GramStats

PARAM_KIND = {"self_attention.linear_proj.weight": "proj", "mlp.linear_fc2.weight": "fc2"}


@dataclass(kw_only=True, frozen=True)
class ReconstructConfig:
    """What ``prune --reconstruct`` refits and how."""

    stats: str
    """Directory of Gram statistics written by ``minitron importance --save-stats``."""

    ridge: float = 1e-3
    """Ridge λ relative to the mean diagonal of the kept units' Gram block (scale-free)."""

    kinds: tuple[str, ...] = KINDS
    """Which layers are refit: ``proj`` (after head pruning), ``fc2`` (after neuron pruning)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        if not self.ridge >= 0:
            raise UserError(f"--reconstruct-ridge {self.ridge} must be ≥ 0.")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise UserError(f"reconstruct kinds {list(self.kinds)} must be a non-empty subset "
                            f"of {', '.join(KINDS)}.")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def solve(gram_rows: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, ridge: float,
          constraint: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The least-squares weight ``X`` ``[h, |K|]`` (see the module docstring): ``gram_rows``
    ``G_K,:`` ``[|K|, n]``, ``weight`` ``W_R`` ``[h, n]``, ``keep`` the indices ``K``;
    ``constraint``: ``(C [m, |K|], E [m, h])`` with ``C Xᵀ = E`` enforced. fp64 inside."""
    g, w = gram_rows.double(), weight.double()
    a = g[:, keep]  # [|K|, |K|] = G_KK
    diag = a.diagonal().mean()
    lam = ridge * (diag if diag > 0 else torch.ones_like(diag))
    a = a + lam * torch.eye(len(keep), dtype=a.dtype, device=a.device)
    chol = torch.linalg.cholesky(a)
    x = torch.cholesky_solve(g @ w.T, chol)  # [|K|, h] = A⁻¹ G_K,: Wᵀ
    if constraint is not None:
        c, e = (t.double() for t in constraint)
        ainv_ct = torch.cholesky_solve(c.T.contiguous(), chol)  # [|K|, m]
        x = x - ainv_ct @ torch.linalg.solve(c @ ainv_ct, c @ x - e)  # [m, m] system
    return x.T.to(weight.dtype)


def group_sum_constraint(weight: torch.Tensor, src: ModelConfig, heads: tuple[int, ...],
                         groups: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, E)`` keeping each kept group's column sums of ``linear_proj`` (``weight`` ``W_R``
    ``[h, H·d]``): one row per kept group ``g`` and channel ``c``."""
    n, d = src.heads_per_group, src.kv_channels
    position = {j: i for i, j in enumerate(heads)}  # kept head → its slot in X
    cols = weight.view(weight.shape[0], src.num_attention_heads, d)  # [h, H, d]
    c = torch.zeros(len(groups) * d, len(heads) * d, dtype=torch.float64, device=weight.device)
    e = []
    for row, g in enumerate(groups):
        for j in range(g * n, (g + 1) * n):
            if j in position:
                slot = position[j] * d
                c[row * d:(row + 1) * d, slot:slot + d] = torch.eye(d, dtype=torch.float64)
        e.append(cols[:, g * n:(g + 1) * n].double().sum(1).T)  # [d, h]
    return c, torch.cat(e)  # [m, |K|], [m, h]


class Reconstructor:
    """Per-parameter solvers for ``apply_plan`` from a stats directory."""

    def __init__(self, config: ReconstructConfig, stats: GramStats | None = None):
        self.config = config
        self.stats = stats or GramStats.load(config.stats)

    def check(self, source: ModelConfig) -> None:
        if self.stats.model_config != source:
            raise UserError(f"the statistics in {self.config.stats} were gathered on another "
                            f"model; rerun `minitron importance --save-stats` on this one.")

    def solver(self, name: str, plan, layer_plan, index: dict[str, torch.Tensor],
               fold: bool) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``global weight [h, n] → pruned global weight [|R|, |K|]``, or ``None`` when this
        parameter is not refit."""
        kind = PARAM_KIND.get(name)
        if kind is None or kind not in self.config.kinds:
            return None
        keep = index["head_channels" if kind == "proj" else "ffn"]
        rows = index["hidden"]
        src = plan.source
        if len(keep) == self.stats.width(kind):
            return None  # no unit of this layer's input is pruned: slicing is exact

        def refit(weight: torch.Tensor) -> torch.Tensor:
            w = weight.index_select(0, rows.to(weight.device))  # [|R|, n]
            g = self.stats.rows(kind, layer_plan.source, keep).to(weight.device)  # [|K|, n]
            constraint = None
            if kind == "proj" and fold:
                constraint = group_sum_constraint(w, src, layer_plan.heads,
                                                  layer_plan.query_groups)
            return solve(g, w, keep.to(weight.device), self.config.ridge, constraint)

        return refit
