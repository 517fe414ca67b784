"""Intermediate-state distillation: cosine loss between paired hidden states (paper §3).

The student's hidden state ``h_s`` (width ``d_s``) at one layer is matched with the teacher's
``h_t`` (width ``d_t``) at another. When the widths differ the student state first goes through a
learned linear map ``W ∈ R^{d_t × d_s}`` shared by all pairs (identity when they agree)::

    L_is(token) = 1 − cos(W h_s, h_t)

and the objective adds ``β · mean_pairs(L_is)`` with the loss balancer ``β = L_logits / L_is``
(values only), recomputed every micro-batch (``objective.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minitron_megatron.runtime.distributed import ParallelState


class HiddenStateProjection(torch.nn.Module):
    """``W``: student width → teacher width, replicated on every TP rank of the last stage."""

    def __init__(self, student_hidden: int, teacher_hidden: int, *, ps: ParallelState,
                 dtype: torch.dtype, init_std: float, seed: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(teacher_hidden, student_hidden, dtype=dtype))
        # A generator of its own: the same W on every layout (build order differs per stage).
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=generator) * init_std)
        # Under sequence parallelism each TP rank sees a slice of the tokens: Megatron's
        # finalize_model_grads sums grads of parameters marked like this over the TP group.
        self.weight.sequence_parallel = ps.sequence_parallel
        self._groups = (ps.tp_group, ps.dp_group)
        self.to(ps.device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)

    def sharded_state_dict(self, prefix: str = "", *args, **kwargs):
        """Replicated over TP and DP, stored once (Megatron's helper sets the replica ids)."""
        from megatron.core.utils import make_sharded_tensor_for_checkpoint

        key = f"{prefix}weight"
        return {key: make_sharded_tensor_for_checkpoint(
            self.weight, key, tp_group=self._groups[0], dp_cp_group=self._groups[1])}


def cosine_loss(student_state: torch.Tensor, teacher_state: torch.Tensor,
                projection: HiddenStateProjection | None, ps: ParallelState) -> torch.Tensor:
    """Per-token ``1 − cos(W h_s, h_t)`` for states ``[s(/tp), b, h]`` → ``[b, s]`` (fp32).

    With sequence parallelism the states hold this rank's slice of the sequence; the per-token
    losses are gathered over TP so that every TP rank holds the whole (replicated) loss, and the
    gather's backward hands each rank the gradient of its own slice.
    """
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    h_s = projection(student_state) if projection is not None else student_state
    loss = 1.0 - F.cosine_similarity(h_s.float(), teacher_state.detach().float(), dim=-1)  # [s, b]
    if ps.sequence_parallel:
        loss = gather_from_sequence_parallel_region(loss, tensor_parallel_output_grad=False,
                                                    group=ps.tp_group)
    return loss.transpose(0, 1)  # [b, s]
