"""Vocab-parallel knowledge-distillation loss, memory-flat, with an analytic gradient.

Per token, with student logits ``z_s`` and teacher logits ``z_t`` sharded over the vocabulary
(each TP rank holds ``V/tp`` columns), temperature ``τ`` and ``p = softmax(z_s/τ)``,
``q = softmax(z_t/τ)``::

    forward KL   kd = τ² · KL(q ‖ p) = τ² · Σ_v q_v (log q_v − log p_v)
    reverse KL   kd = τ² · KL(p ‖ q) = τ² · Σ_v p_v (log p_v − log q_v)
    CE (option)  ce = log Σ_v exp(z_s,v) − z_s,label                       (τ = 1 always)

**The τ² convention** (Hinton et al.): the KL of the softened distributions is multiplied by τ²
so that its gradient, ``∂kd/∂z_s = τ (p − q)``, keeps the same scale whatever τ is; at τ = 1 the
loss is the plain KL. With ``top_k``, the teacher keeps only its ``k`` largest logits (the global
top-k over all TP shards) and ``q`` is renormalised over them.

How the vocabulary is never gathered (as in Megatron's ``tensor_parallel/cross_entropy.py``):
the row maxima are all-reduced (MAX) over the TP group, then the sums of exponentials, then the
per-row KL partial sums (SUM). Every pass walks the local shard in row chunks of about
``CHUNK_ELEMENTS`` elements, so the fp32 temporaries are a small, fixed fraction of the logits.
Nothing is saved for backward but the two logit tensors themselves and a few numbers per token;
the backward recomputes ``p − q`` chunk by chunk from the logits and writes the gradient **in
place into the student-logits buffer** (which the loss consumes, as Megatron's cross entropy
does). Extra memory over the logits is therefore O(chunk), not O(logits).

Example::

    kd, ce = vocab_parallel_kd_loss(student_logits, teacher_logits, labels=labels,
                                    temperature=1.0, tp_group=ps.tp_group)
    loss = ((kd + 0.1 * ce) * loss_mask).sum() / loss_mask.sum()
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

CHUNK_ELEMENTS = 1 << 21
"""Elements of the local logit shard processed at once (fp32 temporaries are a few of these)."""


def _all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _row_chunks(rows: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _vocab_range(vocab_local: int, group) -> tuple[int, int]:
    rank = dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0
    return rank * vocab_local, (rank + 1) * vocab_local


def _global_top_k_threshold(teacher: torch.Tensor, k: int, group) -> torch.Tensor:
    """The k-th largest teacher logit of each row over the whole vocabulary: ``[rows]``."""
    local = torch.topk(teacher, min(k, teacher.shape[-1]), dim=-1).values.float()  # [rows, k']
    world = dist.get_world_size(group) if group is not None else 1
    if world > 1:
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local.contiguous(), group=group)
        local = torch.cat(gathered, dim=-1)  # [rows, tp·k']
    return torch.topk(local, k, dim=-1).values[:, -1]  # [rows]


class _VocabParallelKD(torch.autograd.Function):
    """Per-token (τ²·KL, CE) over a TP-sharded vocabulary; gradient analytic, written in place."""

    @staticmethod
    def forward(ctx, student, teacher, labels, temperature, reverse, top_k, group):
        vocab = student.shape[-1]
        s = student.view(-1, vocab)  # [N, V/tp] (a view: the gradient is written into it)
        t = teacher.reshape(-1, vocab)  # [N, V/tp]
        n = s.shape[0]
        inv_t = 1.0 / temperature
        with_ce = labels is not None

        # Pass 1: row maxima over the whole vocabulary. max(z/τ) = max(z)/τ for τ > 0.
        maxima = torch.stack([s.amax(-1).float(), t.amax(-1).float()])  # [2, N]
        _all_reduce(maxima, group, dist.ReduceOp.MAX)
        max_s, max_t = maxima
        threshold = _global_top_k_threshold(t, top_k, group) if top_k else None  # [N]

        # Pass 2: Σ exp over the vocabulary (τ-scaled for both, τ = 1 for the student's CE),
        # and the label logit held by the rank that owns the label's column.
        lo, hi = _vocab_range(vocab, group)
        sums = torch.zeros(4, n, dtype=torch.float32, device=s.device)  # [S_s, S_t, S_1, z_lab]
        for rows in _row_chunks(n, vocab):
            zs = s[rows].float() - max_s[rows, None]  # [r, V/tp]
            zt = _teacher_shifted(t[rows], max_t[rows], threshold, rows)
            sums[0, rows] = torch.exp(zs * inv_t).sum(-1)
            sums[1, rows] = torch.exp(zt * inv_t).sum(-1)
            if with_ce:
                sums[2, rows] = sums[0, rows] if temperature == 1.0 else zs.exp().sum(-1)
                lab = labels.reshape(-1)[rows]
                owned = (lab >= lo) & (lab < hi)
                local = (lab - lo).clamp(0, vocab - 1)
                picked = zs.gather(-1, local[:, None]).squeeze(-1)  # [r]
                sums[3, rows] = torch.where(owned, picked, torch.zeros_like(picked))
        _all_reduce(sums, group)
        log_s, log_t = sums[0].log(), sums[1].log()  # [N]

        # Pass 3: the KL, summed term by term from exact log-probabilities.
        kl = torch.zeros(n, dtype=torch.float32, device=s.device)
        for rows in _row_chunks(n, vocab):
            logp = (s[rows].float() - max_s[rows, None]) * inv_t - log_s[rows, None]
            logq = _teacher_shifted(t[rows], max_t[rows], threshold, rows) * inv_t
            logq -= log_t[rows, None]
            if reverse:
                kl[rows] = (logp.exp() * (logp - logq)).sum(-1)
            else:
                q = logq.exp()
                kl[rows] = (q * (logq - logp).nan_to_num(0.0, 0.0, 0.0)).sum(-1)  # 0·(−∞) → 0
        _all_reduce(kl, group)

        ctx.save_for_backward(s, t, max_s, max_t, log_s, log_t, kl,
                              *([] if threshold is None else [threshold]))
        ctx.labels = labels.reshape(-1) if with_ce else None
        ctx.log_ce = sums[2].log() if with_ce else None
        ctx.config = (temperature, reverse, group, tuple(student.shape), lo, hi)
        kd = (kl * temperature**2).view(student.shape[:-1])
        ce = (ctx.log_ce - sums[3]).view(student.shape[:-1]) if with_ce else None
        if ce is None:
            ce = kd.new_zeros(())
            ctx.mark_non_differentiable(ce)
        return kd, ce

    @staticmethod
    def backward(ctx, grad_kd, grad_ce):
        s, t, max_s, max_t, log_s, log_t, kl, *rest = ctx.saved_tensors
        threshold = rest[0] if rest else None
        temperature, reverse, _, shape, lo, _ = ctx.config
        inv_t = 1.0 / temperature
        vocab = s.shape[-1]
        g_kd = (grad_kd.reshape(-1).float() * temperature if grad_kd is not None
                else torch.zeros_like(kl))  # [N]; ∂(τ²KL)/∂z = τ·∂KL/∂(z/τ)
        labels = ctx.labels
        g_ce = grad_ce.reshape(-1).float() if labels is not None and grad_ce is not None else None
        for rows in _row_chunks(s.shape[0], vocab):
            zs = s[rows].float() - max_s[rows, None]  # [r, V/tp]
            logp = zs * inv_t - log_s[rows, None]
            p = logp.exp()
            if reverse:
                logq = _teacher_shifted(t[rows], max_t[rows], threshold, rows) * inv_t
                logq -= log_t[rows, None]
                grad = p * (logp - logq - kl[rows, None])  # ∂KL(p‖q)/∂(z/τ)
            else:
                q = (_teacher_shifted(t[rows], max_t[rows], threshold, rows) * inv_t
                     - log_t[rows, None]).exp()
                grad = p - q  # ∂KL(q‖p)/∂(z/τ)
            grad *= g_kd[rows, None]
            if g_ce is not None:
                # softmax at τ = 1 (already in hand when τ = 1; p is not needed any more)
                p1 = p if temperature == 1.0 else (zs - ctx.log_ce[rows, None]).exp()
                lab = labels[rows]
                owned = (lab >= lo) & (lab < lo + vocab)
                local = (lab - lo).clamp(0, vocab - 1)
                p1.scatter_add_(-1, local[:, None], -owned.float()[:, None])  # softmax − onehot
                grad += p1 * g_ce[rows, None]
            s[rows] = grad.to(s.dtype)  # in place: the logits are consumed
        return s.view(shape), None, None, None, None, None, None


def _teacher_shifted(t_rows, max_t_rows, threshold, rows) -> torch.Tensor:
    """``z_t − max`` in fp32, with −∞ outside the global top-k when it is used: ``[r, V/tp]``."""
    zt = t_rows.float() - max_t_rows[:, None]
    if threshold is not None:
        zt.masked_fill_(t_rows.float() < threshold[rows, None], -math.inf)
    return zt


def vocab_parallel_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    reverse: bool = False,
    top_k: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token ``τ²·KL`` (and, with ``labels``, per-token cross entropy) of vocab-parallel
    logits ``[..., V/tp]``; returns tensors of shape ``[...]``.

    ``student_logits`` must be contiguous and is **consumed**: the backward writes the gradient
    into its storage. ``teacher_logits`` carries no gradient. Mask and normalise the result
    outside (it is per token, so that costs nothing). ``tp_group`` is the tensor-parallel group
    the vocabulary is sharded over (``None``: the full vocabulary is local).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape; both models must share "
                         f"the (padded) vocabulary and the TP layout.")
    if reverse and top_k:
        raise ValueError("reverse KL against a top-k teacher is infinite (the student puts mass "
                         "where the truncated teacher has none); use one of the two options.")
    if not student_logits.is_contiguous():
        student_logits = student_logits.contiguous()
    kd, ce = _VocabParallelKD.apply(student_logits, teacher_logits.detach(), labels,
                                    float(temperature), bool(reverse), top_k, tp_group)
    return kd, (ce if labels is not None else None)
