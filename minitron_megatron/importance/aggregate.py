"""Aggregation of per-token activations over the sequence, then over calibration samples.

Notation: ``a[s, b, i]`` is the per-token activation of unit ``i`` (a neuron's value, a head's
output norm, a hidden channel's norm output) at position ``s`` of sample ``b`` (Megatron's
``[s, b, ...]`` layout). A score is ``batch_agg_b(seq_agg_s(a[s, b, i]))`` (paper §2.2):

* sequence (per sample ``b``, ``S`` tokens) → ``m[b, i]``:
  ``mean``: Σ_s |a| / S;  ``l2``: sqrt(Σ_s a²);  ``var``: Σ_s (a − ā)² / S  (ā = Σ_s a / S);
  ``max``: max_s |a| (the peak);
* batch (over all ``N`` calibration samples, every rank's share) → ``score[i]``:
  ``l2``: sqrt(Σ_b m²);  ``mean``: Σ_b |m| / N;  ``var``: Σ_b (m − m̄)² / N.

Under sequence parallelism a rank holds ``S / tp`` tokens of each sample; the sums (or maxima)
over ``s`` are then all-reduced over the tensor-parallel group before the per-sample value is
formed, so ``m`` is the same as with the whole sequence on one rank.

The batch side keeps the running moments ``(n, m̄, M2 = Σ (m − m̄)²)`` of ``m`` (Chan et al.'s
pairwise update), from which all three batch aggregations follow without cancellation:
``l2 = sqrt(M2 + n·m̄²)``, ``mean = m̄`` (m ≥ 0), ``var = M2 / n``. Moments of different
micro-batches and of different data-parallel ranks merge with the same update. All in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None,
                op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class Scratch:
    """Reusable fp32 work buffers, one per activation shape. On CPU a fresh multi-megabyte
    temporary per hook call (page faults on every allocation) costs more than the reduction."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        key = (tuple(a.shape), a.device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(a.shape, dtype=torch.float32, device=a.device)
        return self.buffers[key]


def _elementwise(op, a: torch.Tensor, work: torch.Tensor, *args) -> torch.Tensor:
    """``op(a, *args)`` in fp32, written into ``work`` (one pass when ``a`` already is fp32)."""
    if a.dtype == torch.float32:
        return op(a, *args, out=work)
    return op(work.copy_(a), *args, out=work)


def sequence_aggregate(a: torch.Tensor, how: str, sp_group: dist.ProcessGroup | None = None,
                       scratch: Scratch | None = None) -> torch.Tensor:
    """``a[s, b, k]`` → ``m[b, k]`` in fp32 (``sp_group``: the sequence is sharded over it)."""
    work = (scratch or Scratch())(a)  # [s, b, k] fp32 buffer
    seq = a.shape[0] * (dist.get_world_size(sp_group) if sp_group is not None else 1)
    if how == "mean":
        total = _elementwise(torch.abs, a, work).sum(0)  # [b, k] = Σ_s |a|
        return _all_reduce(total, sp_group) / seq
    if how == "l2":
        squares = _elementwise(torch.square, a, work).sum(0)  # [b, k] = Σ_s a²
        return _all_reduce(squares, sp_group).sqrt()
    if how == "max":
        peak = _elementwise(torch.abs, a, work).amax(0)  # [b, k] = max_s |a|
        return _all_reduce(peak, sp_group, dist.ReduceOp.MAX)
    if how == "var":
        mean = _all_reduce(a.sum(0, dtype=torch.float32), sp_group) / seq  # [b, k] = ā
        spread = _elementwise(torch.sub, a, work, mean).square_().sum(0)  # Σ_s (a − ā)²
        return _all_reduce(spread, sp_group) / seq
    raise ValueError(f"unknown sequence aggregation {how!r}")


class Moments:
    """Running ``(n, mean, M2)`` of per-sample values ``m[b, k]`` over calibration samples.

    Rows are buffered and folded in groups of ``fold_rows`` (fewer small-tensor operations per
    micro-batch); ``state`` always includes every row seen.
    """

    def __init__(self, size: int, device: torch.device | str = "cpu", fold_rows: int = 256):
        self._state = torch.zeros(3, size, device=device)  # rows: n (broadcast), mean, M2; fp32
        self._pending: list[torch.Tensor] = []
        self._pending_rows = 0
        self.fold_rows = fold_rows

    @staticmethod
    def of(m: torch.Tensor) -> torch.Tensor:
        """The moments ``[3, k]`` of rows ``m[b, k]``."""
        m = m.float()
        mean = m.mean(0)  # [k]
        return torch.stack([torch.full_like(mean, m.shape[0]), mean,
                            (m - mean).square().sum(0)])  # [3, k]

    @staticmethod
    def merge(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Chan's pairwise update of two ``[3, k]`` moment tensors."""
        nx, ny = x[0], y[0]
        n = nx + ny
        safe_n = n.clamp(min=1)  # both empty: stay empty
        delta = y[1] - x[1]  # [k]
        mean = x[1] + delta * (ny / safe_n)
        m2 = x[2] + y[2] + delta.square() * (nx * ny / safe_n)
        return torch.stack([n, mean, m2])

    def update(self, m: torch.Tensor) -> None:
        if m.shape[0]:
            self._pending.append(m)
            self._pending_rows += m.shape[0]
            if self._pending_rows >= self.fold_rows:
                self._fold()

    def _fold(self) -> None:
        if self._pending:
            self._state = self.merge(self._state, self.of(torch.cat(self._pending)))
            self._pending, self._pending_rows = [], 0

    @property
    def state(self) -> torch.Tensor:
        self._fold()
        return self._state

    @state.setter
    def state(self, value: torch.Tensor) -> None:
        self._pending, self._pending_rows = [], 0
        self._state = value

    def reduce(self, group: dist.ProcessGroup | None) -> None:
        """Merge every rank's moments of ``group`` in rank order (the same result everywhere)."""
        if group is None or dist.get_world_size(group) == 1:
            return
        parts = [torch.empty_like(self.state) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, self.state, group=group)
        state = parts[0]
        for part in parts[1:]:
            state = self.merge(state, part)
        self.state = state

    def result(self, how: str) -> torch.Tensor:
        """The batch aggregation ``[k]`` of everything seen."""
        n, mean, m2 = self.state
        if how == "l2":
            return (m2 + n * mean.square()).sqrt()
        if how == "mean":
            return mean
        if how == "var":
            return m2 / n.clamp(min=1)
        raise ValueError(f"unknown batch aggregation {how!r}")
