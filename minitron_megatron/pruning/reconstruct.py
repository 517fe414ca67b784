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

**Hidden channels** (``qkv`` / ``fc1``, RMSNorm models): ``linear_qkv`` and ``linear_fc1`` read
the norm output ``u = γ ⊙ x / rms(x)``; with hidden channels pruned the pruned model feeds them
``u'_K = γ_K ⊙ x_K / rms_K(x)``, whose RMS runs over the kept channels only: ``u'_K = c_t u_K``
with ``c_t = rms(x_t) / rms_K(x_t)``. Taking ``c_t`` as its calibration mean ``c̄`` (mean-field;
``c̄⁻² = mean_{k ∈ K} E_t[x̂_k²]`` with ``x̂ = x / rms(x)``, read off the Gram diagonal), the
minimiser of ``Σ_t ‖W u_t − X c̄ u_{t,K}‖²`` is ``Xᵀ = c̄⁻¹ (G_KK + λI)⁻¹ G_K,: Wᵀ`` with
``G = diag(γ) Ĝ diag(γ)``, ``Ĝ = Σ_t x̂_t x̂_tᵀ`` (``importance.stats``; the output rows are the
kept q/k/v rows, or the kept gate and up rows). On SmolLM2 this mean-field refit matched a refit
from the exact per-token ``c_t`` (which needs the kept channels before the calibration pass).

Solved in fp64 (Cholesky) on the device of the weight; each layer independently (its inputs are
the unpruned model's), biases kept as sliced. Every rank that owns a layer reads the same rows
from the stats directory and solves the same system, so the result does not depend on the layout.
Peak extra memory per layer: the ``|K| × n`` rows and ``A`` in fp64 — for Llama-3.1-8B's MLP
pruned 14336 → 9216: 1.06 GB + 0.68 GB.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from minitron_megatron.config import ModelConfig
from minitron_megatron.errors import UserError
from minitron_megatron.importance.stats import HIDDEN_KINDS, KINDS, GramStats

log = logging.getLogger(__name__)

PARAM_KIND = {"self_attention.linear_proj.weight": "proj", "mlp.linear_fc2.weight": "fc2",
              "self_attention.linear_qkv.weight": "qkv", "mlp.linear_fc1.weight": "fc1"}
NORM_WEIGHTS = {"qkv": ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
                "fc1": ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")}


@dataclass(kw_only=True, frozen=True)
class ReconstructConfig:
    """What ``prune --reconstruct`` refits and how."""

    stats: str | os.PathLike
    """Directory of Gram statistics written by ``minitron importance --save-stats`` (kept as a
    string: the config is written into the pruned checkpoint as JSON)."""

    ridge: float = 1e-3
    """Ridge λ relative to the mean diagonal of the kept units' Gram block (scale-free)."""

    kinds: tuple[str, ...] = KINDS
    """Which layers are refit: ``proj`` (after head pruning), ``fc2`` (after neuron pruning),
    ``qkv`` and ``fc1`` (after hidden-channel pruning; RMSNorm models)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stats", os.fspath(self.stats))
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
        self.kinds = tuple(k for k in config.kinds if k in self.stats.kinds)
        skipped = [k for k in config.kinds if k not in self.kinds]
        if skipped:
            log.warning("reconstruct: no %s statistics in %s (hidden-channel refit needs an "
                        "RMSNorm model); those layers are sliced.", "/".join(skipped),
                        config.stats)

    def check(self, source: ModelConfig) -> None:
        if self.stats.model_config != source:
            raise UserError(f"the statistics in {self.config.stats} were gathered on another "
                            f"model; rerun `minitron importance --save-stats` on this one.")

    def solver(self, name: str, plan, layer_plan, index: dict[str, torch.Tensor], fold: bool,
               params: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``global weight → pruned global weight`` for parameter ``name`` of source layer
        ``layer_plan.source`` (``params``: that layer's parameters, for the norm weight), or
        ``None`` when it is not refit."""
        kind = PARAM_KIND.get(name)
        if kind is None or kind not in self.kinds:
            return None
        keep = index[{"proj": "head_channels", "fc2": "ffn"}.get(kind, "hidden")]
        rows = index[{"qkv": "qkv_rows", "fc1": "fc1_rows"}.get(kind, "hidden")]
        if len(keep) == self.stats.width(kind):
            return None  # no unit of this layer's input is pruned: slicing is exact
        src, layer, ridge = plan.source, layer_plan.source, self.config.ridge
        gamma = next((params[n] for n in NORM_WEIGHTS.get(kind, ()) if n in params), None)

        def refit(weight: torch.Tensor) -> torch.Tensor:
            device = weight.device
            w = weight.index_select(0, rows.to(device))  # [|R|, n]
            k = keep.to(device)
            g = self.stats.rows(kind, layer, keep).to(device)  # [|K|, n]
            if kind in HIDDEN_KINDS:  # Ĝ → G = diag(γ) Ĝ diag(γ), and c̄
                inv_c2 = g[torch.arange(len(k), device=device), k].mean() / self.stats.tokens
                gm = gamma.detach().to(device, torch.float32)
                g = g * gm[k, None] * gm[None, :]
                return solve(g, w, k, ridge) * inv_c2.sqrt().to(w.dtype)  # · c̄⁻¹
            constraint = None
            if kind == "proj" and fold:
                constraint = group_sum_constraint(w, src, layer_plan.heads,
                                                  layer_plan.query_groups)
            return solve(g, w, k, ridge, constraint)

        return refit
