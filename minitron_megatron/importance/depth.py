"""Loss-based depth metrics: the LM-loss increase when one layer, or a contiguous block of K
layers, is skipped (paper §2.2, "PPL"; 2408.11796 §3: dropping the contiguous block whose removal
hurts least beats dropping the individually least important layers).

    loss[l]       = L(calibration | layer l skipped)            − L(calibration)
    block:K[j]    = L(calibration | layers j .. j+K−1 skipped)  − L(calibration)

where L is the mean next-token cross entropy over every calibration token. A skipped layer
passes its input through unchanged (``x_out = x_in``), exactly as if it were removed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch

from minitron_megatron.model.forward import Batch, pipeline_forward
from minitron_megatron.runtime.distributed import ParallelState


def _identity_forward(hidden_states=None, *args, context=None, **kwargs):
    """A removed ``TransformerLayer``: ``(x_out, context) = (x_in, context)``."""
    return hidden_states.clone(), context


@contextlib.contextmanager
def skip_layers(model: torch.nn.Module, layers: Iterable[int]) -> Iterator[None]:
    """Within the block, this stage's layers with these global indices are the identity."""
    wanted = set(layers)
    skipped = [layer for layer in model.decoder.layers if layer.layer_number - 1 in wanted]
    for layer in skipped:
        layer.forward = _identity_forward  # instance attribute shadows the class method
    try:
        yield
    finally:
        for layer in skipped:
            del layer.forward


def masked_loss_sum(batch: Batch, per_token_loss: torch.Tensor) -> torch.Tensor:
    """``[Σ loss · mask, Σ mask]`` (fp64) of one micro-batch's ``[b, s]`` per-token losses."""
    mask = batch["loss_mask"].to(per_token_loss.device, torch.float64)
    return torch.stack([(per_token_loss.double() * mask).sum(), mask.sum()]).cpu()


def reduce_loss(sums: list[torch.Tensor], ps: ParallelState) -> float:
    """Mean loss over all ranks' micro-batches (each pipeline's last stage, TP rank 0, counts
    once). Collective over all ranks."""
    total = torch.stack(sums).sum(0) if sums else torch.zeros(2, dtype=torch.float64)
    if not (ps.is_last_stage and ps.tp_rank == 0):
        total.zero_()
    loss_sum, tokens = ps.all_reduce(total).tolist()
    return loss_sum / max(tokens, 1.0)


def calibration_loss(model: torch.nn.Module, ps: ParallelState, batches: Sequence[Batch], *,
                     seq_length: int, micro_batch_size: int) -> float:
    """LM loss of ``model`` on this DP rank's ``batches``, reduced over all ranks."""
    sums = pipeline_forward(model, ps, batches, seq_length=seq_length,
                            micro_batch_size=micro_batch_size, on_output=masked_loss_sum,
                            with_labels=True)
    return reduce_loss(sums, ps)


def skip_loss_increase(model: torch.nn.Module, ps: ParallelState, batches: Sequence[Batch],
                       blocks: Sequence[Sequence[int]], base_loss: float, *, seq_length: int,
                       micro_batch_size: int) -> torch.Tensor:
    """``[len(blocks)]``: loss increase when each block of global layer indices is skipped."""
    increases = []
    for block in blocks:
        with skip_layers(model, block):
            loss = calibration_loss(model, ps, batches, seq_length=seq_length,
                                    micro_batch_size=micro_batch_size)
        increases.append(loss - base_loss)
    return torch.tensor(increases, dtype=torch.float32)
