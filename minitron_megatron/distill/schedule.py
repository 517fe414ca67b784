"""One global batch through Megatron's pipeline schedule: micro-batches of this rank, the
forward step, and the statistics reduced over the whole job."""

from __future__ import annotations

from functools import partial

import torch

from minitron_megatron.data.loaders import micro_batches
from minitron_megatron.distill.config import KDConfig
from minitron_megatron.distill.model import DistillationModel
from minitron_megatron.distill.objective import REPORT_KEYS, objective
from minitron_megatron.model.forward import Batch, model_inputs
from minitron_megatron.runtime.distributed import ParallelState


def train_sample_ids(consumed_samples: int, global_batch_size: int, ps: ParallelState
                     ) -> list[int]:
    """Samples of the next global batch that this data-parallel rank owns (a contiguous share,
    so micro-batch ``k`` of DP rank ``r`` holds the same samples at every layout)."""
    per_rank = global_batch_size // ps.dp_size
    start = consumed_samples + ps.dp_rank * per_rank
    return list(range(start, start + per_rank))


def forward_backward(
    model: torch.nn.Module,
    distill_model: DistillationModel,
    ps: ParallelState,
    dataset,
    sample_ids: list[int],
    *,
    kd: KDConfig | None,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
) -> dict[str, float]:
    """Forward (and backward) ``sample_ids`` of ``dataset`` through ``model`` (DDP-wrapped or
    not) with Megatron's schedule. Returns the job-wide sums of ``REPORT_KEYS``, the same on
    every rank (collective over all ranks)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = list(micro_batches(dataset, sample_ids, micro_batch_size))

    def forward_step(data_iterator, stage_model):
        batch: Batch = next(data_iterator)
        tokens, position_ids = model_inputs(batch, ps.device)
        cached = (batch["teacher_values"], batch["teacher_indices"]) \
            if "teacher_values" in batch else None  # a teacher cache's top-k [b, s, k]
        out = stage_model(tokens, position_ids, labels=batch["labels"].to(ps.device),
                          teacher_top_k=cached)
        return out, partial(objective, kd, batch["loss_mask"])

    extra = {}
    if ps.pp_size > 1 and distill_model.teacher is not None:
        extra["adjust_tensor_shapes_fn"] = distill_model.tensor_shapes_adjust_fn
    store = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        **extra,
    )
    sums = torch.zeros(len(REPORT_KEYS), dtype=torch.float64)
    if store and ps.is_last_stage and ps.tp_rank == 0:  # TP ranks hold identical sums
        sums = torch.stack([item["report"].cpu() for item in store]).sum(0)
    sums = ps.all_reduce(sums)  # over every pipeline and data-parallel rank
    return dict(zip(REPORT_KEYS, sums.tolist(), strict=True))
