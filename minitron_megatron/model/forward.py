"""Forward-only passes through Megatron-Core's pipeline schedules (any TP × PP).

``pipeline_forward`` runs micro-batches through ``get_forward_backward_func`` (1F1B with PP > 1,
no pipelining otherwise) and hands each last-stage output to a callback; ``gather_logits`` turns a
vocab-parallel logits shard into the full vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from minitron_megatron.runtime.distributed import ParallelState

Batch = dict[str, torch.Tensor]


def model_inputs(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, position_ids)`` of a batch on ``device``."""
    return batch["tokens"].to(device), batch["position_ids"].to(device)


def pipeline_forward(
    model: torch.nn.Module,
    ps: ParallelState,
    batches: Iterable[Batch],
    *,
    seq_length: int,
    micro_batch_size: int,
    on_output: Callable[[Batch, torch.Tensor], Any],
    with_labels: bool = False,
) -> list[Any]:
    """Forward every micro-batch; on the last stage return ``on_output(batch, output)`` for each
    (``output``: per-token loss ``[b, s]`` with labels, else vocab-parallel logits
    ``[b, s, V/tp]``). Other stages return ``[]``. Collective over the pipeline."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = list(batches)
    if not batches:
        return []
    results: list[Any] = []

    def forward_step(data_iterator, stage_model):
        batch = next(data_iterator)
        tokens, position_ids = model_inputs(batch, ps.device)
        labels = batch["labels"].to(ps.device) if with_labels else None
        output = stage_model(tokens, position_ids, None, labels=labels)

        def collect(output_tensor):
            results.append(on_output(batch, output_tensor))
            return output_tensor.new_zeros(()), {}

        return output, collect

    was_training = model.training
    model.eval()
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )
    model.train(was_training)
    return results if ps.is_last_stage else []


def gather_logits(logits: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Vocab-parallel logits ``[..., V/tp]`` → full ``[..., V]`` on every TP rank."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if ps.tp_size == 1:
        return logits
    return gather_from_tensor_model_parallel_region(logits, group=ps.tp_group)


def full_logits(model: torch.nn.Module, ps: ParallelState, tokens: torch.Tensor,
                micro_batch_size: int | None = None) -> torch.Tensor | None:
    """Full-vocabulary fp32 logits ``[b, s, V]`` for ``tokens`` on the last stage (else None)."""
    b, s = tokens.shape
    mb = micro_batch_size or b
    positions = torch.arange(s).unsqueeze(0).expand(b, -1)
    batches = [{"tokens": tokens[i:i + mb], "position_ids": positions[i:i + mb]}
               for i in range(0, b, mb)]
    outs = pipeline_forward(model, ps, batches, seq_length=s, micro_batch_size=mb,
                            on_output=lambda _, out: gather_logits(out, ps).float().cpu())
    return torch.cat(outs) if ps.is_last_stage else None
