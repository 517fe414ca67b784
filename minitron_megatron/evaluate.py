"""Held-out language-model loss and perplexity, at any TP × PP × DP.

The loss is the mean next-token cross entropy over every unmasked token of ``eval_samples``
validation samples: sums and token counts are reduced exactly (fp64), so every layout reports the
same number up to float rounding in the model itself.

Example::

    result = evaluate_model(model, ps, val_dataset, num_samples=64, micro_batch_size=4,
                            seq_length=512)
    print(result.loss, result.ppl)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from minitron_megatron.data.loaders import micro_batches, positive_int, shard_for_data_parallel
from minitron_megatron.errors import NonFiniteResultError
from minitron_megatron.model.forward import Batch, pipeline_forward
from minitron_megatron.runtime.distributed import ParallelState


@dataclass(kw_only=True, frozen=True)
class EvalConfig:
    """How much held-out data an evaluation reads and how it is batched."""

    num_samples: int
    """Validation samples evaluated (``--eval-samples``), split over the data-parallel ranks."""

    micro_batch_size: int = 1
    """Samples per forward pass on one rank (``--micro-batch-size``)."""

    def __post_init__(self) -> None:
        positive_int("--eval-samples", self.num_samples, "the number of validation samples")
        positive_int("--micro-batch-size", self.micro_batch_size, "samples per forward pass")


@dataclass(frozen=True)
class EvalResult:
    loss: float
    """Mean next-token cross entropy (nats) over the evaluated tokens."""

    ppl: float
    """exp(loss)."""

    tokens: int
    """Number of tokens the mean is over."""

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _masked_sum(batch: Batch, per_token_loss: torch.Tensor) -> torch.Tensor:
    mask = batch["loss_mask"].to(per_token_loss.device, torch.float64)
    return torch.stack([(per_token_loss.double() * mask).sum(), mask.sum()]).cpu()


def evaluate_model(
    model: torch.nn.Module,
    ps: ParallelState,
    dataset,
    *,
    num_samples: int,
    micro_batch_size: int,
    seq_length: int,
) -> EvalResult:
    """Loss of ``model`` on samples ``0..num_samples-1`` of ``dataset`` (split over DP ranks).

    Collective over all ranks; every rank returns the same result. A NaN or infinite loss raises
    ``NonFiniteResultError`` instead of being reported as a number.
    """
    EvalConfig(num_samples=num_samples, micro_batch_size=micro_batch_size)
    ids = shard_for_data_parallel(num_samples, ps.dp_rank, ps.dp_size)
    sums = pipeline_forward(
        model, ps, micro_batches(dataset, ids, micro_batch_size),
        seq_length=seq_length, micro_batch_size=micro_batch_size,
        on_output=_masked_sum, with_labels=True,
    )
    total = torch.stack(sums).sum(0) if sums else torch.zeros(2, dtype=torch.float64)
    if not (ps.is_last_stage and ps.tp_rank == 0):
        total.zero_()  # TP ranks hold identical losses: count each pipeline once
    loss_sum, tokens = ps.all_reduce(total).tolist()
    if tokens == 0:
        raise ValueError("no tokens were evaluated: every sample is masked.")
    loss = loss_sum / tokens
    if not math.isfinite(loss):
        raise NonFiniteResultError(
            f"the loss over {int(tokens)} tokens is {loss}: the model's outputs are not finite. "
            f"Its weights are probably corrupt or diverged (or a half-precision --params-dtype "
            f"overflows); evaluate an earlier checkpoint, re-create this one, or use fp32.")
    return EvalResult(loss=loss, ppl=math.exp(min(loss, 700.0)), tokens=int(tokens))


def evaluate_checkpoint(
    info,
    ps: ParallelState,
    data,
    *,
    num_samples: int,
    micro_batch_size: int,
    params_dtype: torch.dtype = torch.float32,
) -> EvalResult:
    """Build the checkpoint's model on this layout, load it, and evaluate its validation loss."""
    from minitron_megatron.checkpoint import load_checkpoint
    from minitron_megatron.data.loaders import build_datasets
    from minitron_megatron.model.build import build_model

    cfg = info.model_config
    EvalConfig(num_samples=num_samples, micro_batch_size=micro_batch_size)
    cfg.check_seq_length(data.seq_length)
    datasets = build_datasets(data, eod_id=eod_id_of(info), vocab_size=cfg.vocab_size,
                              num_samples={"valid": num_samples},
                              padded_vocab_size=cfg.padded_vocab_size)
    model = build_model(cfg, ps, params_dtype=params_dtype, init_weights=False)
    load_checkpoint(info, model=model)
    return evaluate_model(model, ps, datasets["valid"], num_samples=num_samples,
                          micro_batch_size=micro_batch_size, seq_length=data.seq_length)


def eod_id_of(info) -> int:
    """End-of-document id of a checkpoint's tokenizer (0 when it carries none)."""
    from minitron_megatron.data.tokenizer import Tokenizer

    return Tokenizer.load(info.tokenizer_dir).eod_id if info.tokenizer_dir else 0
