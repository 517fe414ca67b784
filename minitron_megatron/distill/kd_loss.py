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
top-k over all TP shards) and ``q`` is renormalised over them: ``top_k_kd_loss`` then takes the
teacher as those ``k`` (value, id) pairs per token — taken from the live teacher's logits, or read
from a teacher cache — and never touches a teacher row of the full vocabulary (the forward KL
over ``K`` needs only the student's log-sum-exp and its logits at the ``k`` ids)::

    KL(q ‖ p) = Σ_{v∈K} q_v (log q_v − log p_v),    ∂(τ²·KL)/∂z_s = τ (p − q)   (q = 0 off K)

How the vocabulary is never gathered (as in Megatron's ``tensor_parallel/cross_entropy.py``):
the row maxima are all-reduced (MAX) over the TP group; one pass then gives this shard's sums of
exponentials and KL partial sums, all-reduced (SUM) together. Every pass walks the local shard
in row chunks of about ``CHUNK_ELEMENTS`` elements through reused fp32 buffers, so the
temporaries are a small, fixed fraction of the logits.
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

import torch
import torch.distributed as dist

CHUNK_ELEMENTS = 1 << 21
"""Elements of the local logit shard processed at once (fp32 temporaries are a few of these)."""


def _all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _row_chunks(rows: int, vocab: int):
    step = _rows_per_chunk(vocab)
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _in_shard(ids: torch.Tensor, lo: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global vocabulary ids → (their column in this shard ``[lo, lo + vocab)``, clamped into it;
    whether this shard owns them)."""
    local = ids - lo
    return local.clamp(0, vocab - 1), (local >= 0) & (local < vocab)


def _workspace(count: int, rows: int, vocab: int, device) -> list[torch.Tensor]:
    """``count`` fp32 chunk buffers, reused by every chunk (no allocation per chunk)."""
    shape = (min(_rows_per_chunk(vocab), rows), vocab)
    return [torch.empty(shape, dtype=torch.float32, device=device) for _ in range(count)]


def _vocab_range(vocab_local: int, group) -> tuple[int, int]:
    rank = dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0
    return rank * vocab_local, (rank + 1) * vocab_local


def global_top_k(logits: torch.Tensor, k: int, group, vocab_start: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``k`` largest entries of each row over a vocabulary sharded on ``group``: values
    ``[rows, k]`` (fp32, descending) and, given this shard's ``vocab_start``, their global ids
    ``[rows, k]`` (int64; else ``None``). ``logits``: ``[rows, V/tp]``."""
    values, ids = torch.topk(logits, min(k, logits.shape[-1]), dim=-1)  # [rows, k']
    parts = [values.float()] + ([ids + vocab_start] if vocab_start is not None else [])
    world = dist.get_world_size(group) if group is not None else 1
    if world > 1:
        gathered = []
        for part in parts:
            out = [torch.empty_like(part) for _ in range(world)]
            dist.all_gather(out, part.contiguous(), group=group)
            gathered.append(torch.cat(out, dim=-1))  # [rows, tp·k']
        parts = gathered
    values, order = torch.topk(parts[0], k, dim=-1)  # [rows, k]
    return values, (parts[1].gather(-1, order) if len(parts) > 1 else None)


class _VocabParallelKD(torch.autograd.Function):
    """Per-token (τ²·KL, CE) over a TP-sharded vocabulary; gradient analytic, written in place.

    With ``u = (z − max z)/τ`` (student ``u_s``, teacher ``u_t``), ``S = Σ_v exp(u_v)`` summed
    over all shards, ``p = exp(u_s)/S_s`` and ``q = exp(u_t)/S_t``::

        KL(q‖p) = Σ q (log q − log p) = Σ exp(u_t)(u_t − u_s) / S_t + log S_s − log S_t
        KL(p‖q) = Σ exp(u_s)(u_s − u_t) / S_s + log S_t − log S_s

    so one pass over the shard gives every partial sum, and one all-reduce completes them.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, temperature, reverse, group):
        vocab = student.shape[-1]
        s = student.view(-1, vocab)  # [N, V/tp] (a view: the gradient is written into it)
        t = teacher.reshape(-1, vocab)  # [N, V/tp]
        n = s.shape[0]
        with_ce = labels is not None
        lo, _ = _vocab_range(vocab, group)

        # Row maxima over the whole vocabulary (max(z/τ) = max(z)/τ for τ > 0).
        maxima = torch.stack([s.amax(-1).float(), t.amax(-1).float()])  # [2, N]
        _all_reduce(maxima, group, dist.ReduceOp.MAX)
        max_s, max_t = maxima

        # One pass: partial sums [S_s, S_t, Σ exp(u)·(u_t − u_s) (or reverse), S at τ=1, z_label].
        sums = torch.zeros(5, n, dtype=torch.float32, device=s.device)
        work = _workspace(3, n, vocab, s.device)
        for rows in _row_chunks(n, vocab):
            r = rows.stop - rows.start
            u_s = _shifted(s[rows], max_s[rows], temperature, out=work[0][:r])  # [r, V/tp]
            u_t = _shifted(t[rows], max_t[rows], temperature, out=work[1][:r])
            if with_ce and temperature != 1.0:
                sums[3, rows] = torch.mul(u_s, temperature, out=work[2][:r]).exp_().sum(-1)
            diff = torch.sub(*((u_s, u_t) if reverse else (u_t, u_s)), out=work[2][:r])
            if with_ce:
                local, owned = _in_shard(labels.reshape(-1)[rows], lo, vocab)
                picked = s[rows].gather(-1, local[:, None]).squeeze(-1).float() - max_s[rows]
                sums[4, rows] = torch.where(owned, picked, torch.zeros_like(picked))
            e_s, e_t = u_s.exp_(), u_t.exp_()  # in place
            sums[0, rows] = e_s.sum(-1)
            sums[1, rows] = e_t.sum(-1)
            sums[2, rows] = diff.mul_(e_s if reverse else e_t).sum(-1)
        _all_reduce(sums, group)
        log_s, log_t = sums[0].log(), sums[1].log()  # [N]
        wide = sums.double()  # the per-token combination in fp64: no rounding of its own
        if reverse:
            kl = (wide[2] / wide[0] + wide[1].log() - wide[0].log()).float()
        else:
            kl = (wide[2] / wide[1] + wide[0].log() - wide[1].log()).float()

        ctx.save_for_backward(s, t, max_s, max_t, log_s, log_t, kl)
        ctx.labels = labels.reshape(-1) if with_ce else None
        log_ce = (log_s if temperature == 1.0 else sums[3].log()) if with_ce else None
        ctx.log_ce = log_ce
        ctx.config = (temperature, reverse, tuple(student.shape), lo)
        kd = (kl * temperature**2).view(student.shape[:-1])
        if not with_ce:
            ce = kd.new_zeros(())
            ctx.mark_non_differentiable(ce)
            return kd, ce
        return kd, (log_ce - sums[4]).view(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_kd, grad_ce):
        s, t, max_s, max_t, log_s, log_t, kl = ctx.saved_tensors
        temperature, reverse, shape, lo = ctx.config
        vocab = s.shape[-1]
        # ∂(τ²·KL)/∂z = τ · ∂KL/∂u
        a = (grad_kd.reshape(-1).float() * temperature if grad_kd is not None
             else torch.zeros_like(kl))  # [N]
        labels = ctx.labels
        g_ce = grad_ce.reshape(-1).float() if labels is not None and grad_ce is not None else None
        fold_ce = g_ce is not None and temperature == 1.0 and not reverse
        # log p = (z − max)/τ − log S = z/τ − (max/τ + log S): one shift per row
        shift_s, shift_t = max_s + temperature * log_s, max_t + temperature * log_t
        in_place = s.dtype == torch.float32  # else an fp32 buffer, copied back at the end
        work = _workspace(2 if in_place else 3, s.shape[0], vocab, s.device)
        for rows in _row_chunks(s.shape[0], vocab):
            r = rows.stop - rows.start
            p1 = None
            if g_ce is not None and not fold_ce:  # softmax at τ = 1, before s is overwritten
                p1 = _shifted(s[rows], (max_s + ctx.log_ce)[rows], 1.0, out=work[1][:r]).exp_()
            log_q = _shifted(t[rows], shift_t[rows], temperature, out=work[0][:r])
            log_p = _shifted(s[rows], shift_s[rows], temperature,
                             out=s[rows] if in_place else work[2][:r])
            if reverse:  # ∂KL(p‖q)/∂u = p ⊙ (log p − log q − KL)
                log_q.neg_().add_(log_p).sub_(kl[rows, None])
                grad = log_p.exp_().mul_(log_q).mul_(a[rows, None])
            elif fold_ce:  # a·(p − q) + g_ce·(p − onehot), p shared at τ = 1
                grad = log_p.exp_().mul_((a + g_ce)[rows, None])
                grad.sub_(log_q.exp_().mul_(a[rows, None]))
            else:  # ∂KL(q‖p)/∂u = p − q
                grad = log_p.exp_().sub_(log_q.exp_()).mul_(a[rows, None])
            if g_ce is not None:  # + g_ce·(softmax(z) − onehot(label))
                if p1 is not None:
                    grad.add_(p1.mul_(g_ce[rows, None]))
                local, owned = _in_shard(labels[rows], lo, vocab)
                grad.scatter_add_(-1, local[:, None], -(owned.float() * g_ce[rows])[:, None])
            if not in_place:
                s[rows] = grad
        return s.view(shape), None, None, None, None, None  # the logits are consumed


def _shifted(z_rows, shift_rows, temperature, *, out) -> torch.Tensor:
    """``(z − shift)/τ`` in fp32, written to ``out``."""
    u = torch.sub(z_rows, shift_rows[:, None], out=out)
    if temperature != 1.0:
        u.mul_(1.0 / temperature)
    return u


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
    if top_k:
        vocab = teacher_logits.shape[-1]
        values, ids = global_top_k(teacher_logits.detach().reshape(-1, vocab), top_k, tp_group,
                                   _vocab_range(vocab, tp_group)[0])  # [N, k] each
        return top_k_kd_loss(student_logits, values.view(*teacher_logits.shape[:-1], -1),
                             ids.view(*teacher_logits.shape[:-1], -1), labels=labels,
                             temperature=temperature, tp_group=tp_group)
    if not student_logits.is_contiguous():
        student_logits = student_logits.contiguous()
    kd, ce = _VocabParallelKD.apply(student_logits, teacher_logits.detach(), labels,
                                    float(temperature), bool(reverse), tp_group)
    return kd, (ce if labels is not None else None)


class _TopKKD(torch.autograd.Function):
    """Per-token (τ²·KL(q‖p), CE) with the teacher given as its top-k ``(values, ids)``.

    With ``u_s = (z_s − max z_s)/τ`` over the TP-sharded vocabulary, ``S_s = Σ_v exp(u_s)``, and
    ``u_t = (v − max v)/τ``, ``S_t = Σ_{j<k} exp(u_t)`` over the k teacher entries (the same on
    every rank), with ``u_s[K]`` the student's shifted logits at the k ids (each gathered by the
    rank that owns it, summed over the group)::

        KL = Σ_j exp(u_t,j)(u_t,j − u_s[K_j]) / S_t + log S_s − log S_t

    The backward writes ``τ·a·p`` into the student-logit buffer chunk by chunk and scatters
    ``−τ·a·q`` at the owned ids (``a`` the incoming gradient), plus the CE term.
    """

    @staticmethod
    def forward(ctx, student, values, ids, labels, temperature, group):
        vocab, k = student.shape[-1], values.shape[-1]
        s = student.view(-1, vocab)  # [N, V/tp] (a view: the gradient is written into it)
        n = s.shape[0]
        with_ce = labels is not None
        lo, _ = _vocab_range(vocab, group)
        max_s = _all_reduce(s.amax(-1).float(), group, dist.ReduceOp.MAX)  # [N]

        # The student's side over its shard: [S_s, S at τ=1, z_label − max]; its logits at K.
        sums = torch.zeros(3, n, dtype=torch.float32, device=s.device)
        both = with_ce and temperature != 1.0  # the CE needs S at τ = 1 too
        work = _workspace(2 if both else 1, n, vocab, s.device)
        for rows in _row_chunks(n, vocab):
            r = rows.stop - rows.start
            u_s = _shifted(s[rows], max_s[rows], temperature, out=work[0][:r])  # [r, V/tp]
            if both:
                sums[1, rows] = torch.mul(u_s, temperature, out=work[1][:r]).exp_().sum(-1)
            sums[0, rows] = u_s.exp_().sum(-1)
        local, owned = _in_shard(ids.reshape(n, k).to(s.device, torch.long), lo, vocab)  # [N, k]
        at_k = s.gather(-1, local).float().masked_fill_(~owned, 0.0)  # [N, k]
        if with_ce:
            lab, lab_owned = _in_shard(labels.reshape(-1), lo, vocab)
            picked = s.gather(-1, lab[:, None]).squeeze(-1).float()
            sums[2] = torch.where(lab_owned, picked - max_s, torch.zeros_like(picked))
        at_k = _all_reduce(at_k, group)  # [N, k]: z_s at the teacher's ids, from their owners
        _all_reduce(sums, group)

        v = values.reshape(n, k).to(s.device, torch.float32)  # [N, k]
        u_t = (v - v.amax(-1, keepdim=True)) / temperature  # [N, k]
        e_t = u_t.exp()
        u_s_k = (at_k - max_s[:, None]) / temperature  # [N, k]
        s_t = e_t.sum(-1)  # [N]
        cross = (e_t.double() * (u_t - u_s_k).double()).sum(-1)  # [N] Σ_j exp(u_t)(u_t − u_s)
        wide = sums[0].double()
        kl = (cross / s_t.double() + wide.log() - s_t.double().log()).float()  # [N]
        q = e_t / s_t[:, None]  # [N, k]

        log_s = sums[0].log()
        log_ce = (log_s if temperature == 1.0 else sums[1].log()) if with_ce else None
        ctx.save_for_backward(s, max_s, log_s, q, local, owned)
        ctx.labels, ctx.log_ce = (labels.reshape(-1) if with_ce else None), log_ce
        ctx.config = (temperature, tuple(student.shape), lo)
        kd = (kl * temperature**2).view(student.shape[:-1])
        if not with_ce:
            ce = kd.new_zeros(())
            ctx.mark_non_differentiable(ce)
            return kd, ce
        return kd, (log_ce - sums[2]).view(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_kd, grad_ce):
        s, max_s, log_s, q, local, owned = ctx.saved_tensors
        temperature, shape, lo = ctx.config
        vocab = s.shape[-1]
        a = (grad_kd.reshape(-1).float() * temperature if grad_kd is not None
             else torch.zeros_like(max_s))  # [N]: ∂(τ²·KL)/∂z = τ·(p − q)
        labels = ctx.labels
        g_ce = grad_ce.reshape(-1).float() if labels is not None and grad_ce is not None else None
        fold_ce = g_ce is not None and temperature == 1.0  # p shared by both terms
        shift_s = max_s + temperature * log_s  # log p = (z − shift)/τ
        in_place = s.dtype == torch.float32
        work = _workspace(1 if in_place else 2, s.shape[0], vocab, s.device)
        for rows in _row_chunks(s.shape[0], vocab):
            r = rows.stop - rows.start
            p1 = None
            if g_ce is not None and not fold_ce:  # softmax at τ = 1, before s is overwritten
                p1 = _shifted(s[rows], (max_s + ctx.log_ce)[rows], 1.0, out=work[0][:r]).exp_()
            p = _shifted(s[rows], shift_s[rows], temperature,
                         out=s[rows] if in_place else work[-1][:r]).exp_()
            grad = p.mul_((a + g_ce)[rows, None] if fold_ce else a[rows, None])
            if p1 is not None:
                grad.add_(p1.mul_(g_ce[rows, None]))
            if not in_place:
                s[rows] = grad
        s.scatter_add_(-1, local, (-(a[:, None] * q) * owned).to(s.dtype))  # − τ·a·q on K
        if g_ce is not None:  # − g_ce · onehot(label)
            lab, lab_owned = _in_shard(labels, lo, vocab)
            s.scatter_add_(-1, lab[:, None], -(lab_owned.to(s.dtype) * g_ce.to(s.dtype))[:, None])
        return s.view(shape), None, None, None, None, None


def top_k_kd_loss(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_ids: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``vocab_parallel_kd_loss`` (forward KL) against a teacher given as its ``k`` largest
    logits per token: ``teacher_values`` ``[..., k]`` (any shift per row, any float dtype) and
    their global vocabulary ids ``teacher_ids`` ``[..., k]``, the same on every TP rank;
    ``student_logits`` ``[..., V/tp]`` is consumed as there. Returns per-token ``(τ²·KL, CE)``.

    Example (a teacher cache's rows)::

        kd, ce = top_k_kd_loss(logits, values, ids, labels=labels, tp_group=ps.tp_group)
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    if teacher_values.shape != teacher_ids.shape or (
            teacher_values.shape[:-1] != student_logits.shape[:-1]):
        raise ValueError(f"teacher top-k values {tuple(teacher_values.shape)} and ids "
                         f"{tuple(teacher_ids.shape)} must be the student logits' "
                         f"{tuple(student_logits.shape[:-1])} + [k].")
    if not student_logits.is_contiguous():
        student_logits = student_logits.contiguous()
    kd, ce = _TopKKD.apply(student_logits, teacher_values.detach(), teacher_ids, labels,
                           float(temperature), tp_group)
    return kd, (ce if labels is not None else None)
