"""The per-micro-batch objective handed to Megatron's schedule as its ``loss_func``.

Losses are **sums over the unmasked tokens** and the token count is returned with them; Megatron
(``calculate_per_token_loss``) divides the gradients by the token count of the whole global batch
(over micro-batches and data-parallel ranks) in ``finalize_model_grads``. The step's loss is thus
the per-token mean over the global batch, identical at every TP × PP × DP layout.

Objective per token, with α the CE weight and β the loss balancer of the paper::

    loss = α·CE + (1 − α)·(τ²·KL + β·mean_pairs(1 − cos)),     β = Σ τ²·KL / Σ mean_pairs(1 − cos)

β is a value (no gradient flows through it) recomputed on every micro-batch.
"""

from __future__ import annotations

import torch

from minitron_megatron.distill.config import KDConfig
from minitron_megatron.distill.model import StageOutput

REPORT_KEYS = ("loss", "kd_loss", "ce_loss", "is_loss", "tokens")
"""Order of the summed statistics in every report tensor."""


def objective(kd: KDConfig | None, loss_mask: torch.Tensor, out: StageOutput):
    """``(loss_sum, num_tokens, {"report": sums})`` for Megatron's schedule.

    ``kd=None`` is fine-tuning: plain cross entropy. ``report`` holds the sums of
    ``REPORT_KEYS`` (fp64), reduced over micro-batches and ranks by the caller.
    """
    mask = loss_mask.to(out.ce.device, torch.float32)  # [b, s]
    tokens = mask.sum()
    zero = mask.new_zeros(())
    if kd is None or out.kd is None:
        ce_sum = (out.ce.float() * mask).sum()
        loss, kd_sum, is_sum = ce_sum, zero, zero
    else:
        ce = out.ce if kd.ce_weight > 0 else out.ce.detach()  # no CE gradient when α = 0
        ce_sum = (ce.float() * mask).sum()
        kd_sum = (out.kd * mask).sum()
        logits_term = kd_sum
        is_sum = zero
        if out.intermediate:
            is_sum = torch.stack([(x * mask).sum() for x in out.intermediate]).mean()
            balance = kd_sum.detach() / is_sum.detach().clamp_min(torch.finfo(torch.float32).tiny)
            logits_term = kd_sum + balance * is_sum
        loss = kd.kd_weight * logits_term
        if kd.ce_weight > 0:
            loss = loss + kd.ce_weight * ce_sum
    report = torch.stack([loss.detach(), kd_sum.detach(), ce_sum.detach(), is_sum.detach(),
                          tokens]).double()
    return loss, tokens.detach().to(torch.int), {"report": report}
