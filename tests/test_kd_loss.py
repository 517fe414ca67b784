"""The vocab-parallel KD loss equals a naive full-vocabulary reference (log_softmax + autograd),
value and gradient, at TP=1 and TP=2 (gathered), within 1e-6 in fp32 (absolute, plus 1e-6
relative: per-token losses reach ~8 here, where one fp32 ulp is ~1e-6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minitron_megatron.distill import kd_loss
from minitron_megatron.testing.multiprocess import run_distributed

TOL = 1e-6
VOCAB = 96
# (temperature, reverse, top_k, ce_weight)
CASES = [(1.0, False, None, 0.0), (2.0, False, None, 0.0), (1.0, True, None, 0.0),
         (2.0, True, None, 0.0), (1.0, False, 9, 0.3), (2.0, False, None, 0.5),
         (2.0, True, None, 0.5), (1.0, False, 9, 0.0), (2.0, False, 9, 0.0), (2.0, False, 9, 0.4),
         (1.0, False, 1, 0.3)]


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 7, VOCAB, generator=g) * 3
    teacher = torch.randn(3, 7, VOCAB, generator=g) * 3
    labels = torch.randint(0, VOCAB, (3, 7), generator=g)
    mask = (torch.rand(3, 7, generator=g) > 0.3).float()
    return student, teacher, labels, mask


def naive(student, teacher, labels, mask, temperature, reverse, top_k, ce_weight):
    """Full vocabulary, torch.log_softmax, autograd: (per-token kd, per-token ce, loss, grad)."""
    x = student.clone().requires_grad_(True)
    if top_k:
        kth = teacher.topk(top_k, dim=-1).values[..., -1:]
        teacher = teacher.masked_fill(teacher < kth, float("-inf"))
    logp = F.log_softmax(x / temperature, dim=-1)
    logq = F.log_softmax(teacher / temperature, dim=-1)
    if reverse:
        kl = (logp.exp() * (logp - logq)).sum(-1)
    else:
        kl = torch.where(torch.isinf(logq), 0.0, logq.exp() * (logq - logp)).sum(-1)
    kd = kl * temperature**2
    ce = F.cross_entropy(x.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    loss = (((1 - ce_weight) * kd + ce_weight * ce) * mask).sum() / mask.sum()
    loss.backward()
    return kd.detach(), ce.detach(), loss.detach(), x.grad


def ours(student, teacher, labels, mask, temperature, reverse, top_k, ce_weight, group=None):
    x = student.clone().requires_grad_(True)
    kd, ce = kd_loss.vocab_parallel_kd_loss(
        x.clone(), teacher, labels=labels, temperature=temperature, reverse=reverse,
        top_k=top_k, tp_group=group)  # the clone is consumed: the gradient is written into it
    loss = (((1 - ce_weight) * kd + ce_weight * ce) * mask).sum() / mask.sum()
    loss.backward()
    return kd.detach(), ce.detach(), loss.detach(), x.grad


def check(got, expected, case):
    for name, a, b in zip(("kd", "ce", "loss", "grad"), got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL,
                                   msg=lambda m, name=name: f"{case} {name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"tau{c[0]}-rev{c[1]}-top{c[2]}-ce{c[3]}")
def test_tp1_matches_naive_reference(case, monkeypatch):
    monkeypatch.setattr(kd_loss, "CHUNK_ELEMENTS", 2 * VOCAB)  # several row chunks per pass
    student, teacher, labels, mask = inputs()
    expected = naive(student, teacher, labels, mask, *case)
    assert expected[0].abs().max() > 0.5  # distributions far apart: a real test of the KL
    check(ours(student, teacher, labels, mask, *case), expected, case)


def tp2_losses(env, cases):
    """Each rank holds half of the vocabulary; returns its values and its gradient shard."""
    import torch.distributed as dist

    from minitron_megatron.config import ParallelConfig
    from minitron_megatron.runtime.distributed import distributed

    kd_loss.CHUNK_ELEMENTS = VOCAB  # rows one by one
    out = []
    with distributed(env, ParallelConfig(tensor_model_parallel_size=2)) as ps:
        assert dist.get_world_size(ps.tp_group) == 2
        for case in cases:
            student, teacher, labels, mask = inputs()
            shard = slice(ps.tp_rank * VOCAB // 2, (ps.tp_rank + 1) * VOCAB // 2)
            out.append(ours(student[..., shard].contiguous(), teacher[..., shard].contiguous(),
                            labels, mask, *case, group=ps.tp_group))
    return out


@pytest.mark.multiprocess
def test_tp2_matches_naive_reference():
    per_rank = run_distributed(tp2_losses, 2, CASES)
    for i, case in enumerate(CASES):
        student, teacher, labels, mask = inputs()
        expected = naive(student, teacher, labels, mask, *case)
        rank0, rank1 = per_rank[0][i], per_rank[1][i]
        for rank in (rank0, rank1):  # values are whole-vocabulary on every rank
            check((*rank[:3], torch.cat([rank0[3], rank1[3]], dim=-1)), expected, case)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_given_as_values_and_ids_matches_the_reference(temperature, monkeypatch):
    """``top_k_kd_loss`` from (values, ids) alone — values shifted by any per-row constant, in
    fp16, ids in any order — equals the naive masked-teacher reference."""
    monkeypatch.setattr(kd_loss, "CHUNK_ELEMENTS", 2 * VOCAB)
    student, teacher, labels, mask = inputs(1)
    k = 9
    values, ids = teacher.topk(k, dim=-1)
    order = torch.randperm(k, generator=torch.Generator().manual_seed(0))
    values, ids = values[..., order], ids[..., order].int()
    shifted = (values - values.amax(-1, keepdim=True) - 5.0).half()  # as a cache holds them
    teacher = teacher.masked_fill(teacher < teacher.topk(k, dim=-1).values[..., -1:], -1e4)
    teacher.scatter_(-1, ids.long(), shifted.float())  # the reference sees the rounded values
    expected = naive(student, teacher, labels, mask, temperature, False, k, 0.2)
    x = student.clone().requires_grad_(True)
    kd, ce = kd_loss.top_k_kd_loss(x.clone(), shifted, ids, labels=labels,
                                   temperature=temperature)
    loss = ((0.8 * kd + 0.2 * ce) * mask).sum() / mask.sum()
    loss.backward()
    check((kd.detach(), ce.detach(), loss.detach(), x.grad), expected, temperature)
    with pytest.raises(ValueError, match="must be the student logits"):
        kd_loss.top_k_kd_loss(student, shifted[..., 1:, :], ids[..., 1:, :])


def test_bad_arguments():
    student, teacher, labels, _ = inputs()
    with pytest.raises(ValueError, match="differ in shape"):
        kd_loss.vocab_parallel_kd_loss(student, teacher[..., :-1])
    with pytest.raises(ValueError, match="reverse KL against a top-k"):
        kd_loss.vocab_parallel_kd_loss(student, teacher, reverse=True, top_k=4)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss.vocab_parallel_kd_loss(student, teacher, temperature=0.0)
