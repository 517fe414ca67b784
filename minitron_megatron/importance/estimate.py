"""``estimate_importance``: one forward-only calibration pass with hooks, then the depth passes.

Cross-rank reduction, so that every rank returns the same global ``Scores``:

* **data parallel** — calibration samples ``0..N−1`` are split over DP ranks; the batch moments
  of each (layer, axis) are merged over the DP group;
* **tensor parallel** — neuron, head and query-group vectors are gathered over the TP group (each
  rank holds a contiguous slice in global order); norm outputs and layer states are replicated on
  TP ranks, or, with sequence parallel, sequence-sharded and reduced inside the hooks;
* **pipeline parallel** — each stage fills its own layers of ``[L, ...]`` tensors, summed over the
  PP group (every layer is written by exactly one stage, so the sum is exact).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from minitron_megatron.config import ModelConfig
from minitron_megatron.data.loaders import micro_batches, shard_for_data_parallel
from minitron_megatron.errors import NonFiniteResultError, UserError
from minitron_megatron.importance.config import (
    CalibrationConfig,
    ImportanceConfig,
    parse_depth_metric,
)
from minitron_megatron.importance.depth import masked_loss_sum, reduce_loss, skip_loss_increase
from minitron_megatron.importance.hooks import ActivationRecorder
from minitron_megatron.importance.scores import Scores
from minitron_megatron.importance.stats import GramRecorder
from minitron_megatron.model.forward import pipeline_forward
from minitron_megatron.runtime.distributed import ParallelState

log = logging.getLogger(__name__)


def _collect_stages(local: dict[int, dict[str, torch.Tensor]], cfg: ModelConfig,
                    ps: ParallelState) -> dict[str, torch.Tensor]:
    """Per-stage ``{layer: {axis: vector}}`` → global ``{axis: [L, ...]}`` on every rank."""
    L = cfg.num_layers
    full = {"ffn": torch.zeros(L, cfg.ffn_hidden_size),
            "heads": torch.zeros(L, cfg.num_attention_heads),
            "query_groups": torch.zeros(L, cfg.num_query_groups),
            "hidden_norms": torch.zeros(L, 2, cfg.hidden_size),
            "bi": torch.zeros(L)}
    for index, axes in local.items():
        for axis, score in axes.items():
            if axis.startswith("hidden."):
                full["hidden_norms"][index, int(axis[-1])] = score.cpu()
            elif axis == "bi":
                full["bi"][index] = 1.0 - score.cpu()[0]  # BI = 1 − E[cos]
            else:
                full[axis][index] = score.cpu()
    if ps.pp_size > 1:
        for name, tensor in full.items():
            full[name] = ps.all_reduce(tensor, group=ps.pp_group)  # layers are disjoint
    return full


def _with_document_starts(dataset, seq_length: int, fraction: float):
    """The dataset's windows interleaved with windows starting at its documents' first tokens."""
    from minitron_megatron.data.windows import DocumentStartWindows, MixedWindows
    from minitron_megatron.errors import UserError

    if not hasattr(dataset, "indices"):
        raise UserError("calib_doc_starts needs a Megatron GPTDataset (its documents are where "
                        "the document-start windows begin).")
    return MixedWindows(dataset, DocumentStartWindows(dataset, seq_length), fraction)


def estimate_importance(
    model: torch.nn.Module,
    ps: ParallelState,
    dataset: Sequence,
    *,
    model_config: ModelConfig,
    num_samples: int,
    micro_batch_size: int,
    seq_length: int,
    config: ImportanceConfig | None = None,
    stats_dir: str | Path | None = None,
) -> Scores:
    """Importance of every neuron, head, query group, embedding channel and layer of ``model``
    (this rank's stage of a Megatron-Core ``GPTModel``), from calibration samples
    ``0..num_samples−1`` of ``dataset`` (split over DP ranks). Collective over all ranks; every
    rank returns the same ``Scores``. With ``stats_dir``, the same pass also gathers the input
    Gram matrices of ``linear_proj`` and ``linear_fc2`` for ``prune --reconstruct`` and writes
    them there (``importance.stats``).

    Example::

        with distributed(LaunchEnv.from_environ(os.environ), parallel) as ps:
            model = build_model(info.model_config, ps, init_weights=False)
            load_checkpoint(info, model=model)
            scores = estimate_importance(
                model, ps, datasets["train"], model_config=info.model_config,
                num_samples=1024, micro_batch_size=4, seq_length=4096,
                config=ImportanceConfig(depth_metrics=("bi", "block:8")))
            if ps.rank == 0:
                scores.save("scores.safetensors")
        plan = make_plan(scores, PruneTargets(ffn_hidden_size=9216, num_attention_heads=32))
    """
    config = config or ImportanceConfig()
    config.check_model(model_config.num_layers)
    CalibrationConfig(num_samples=num_samples, micro_batch_size=micro_batch_size)
    if num_samples < ps.dp_size:
        raise UserError(f"{num_samples} calibration samples cannot be split over "
                        f"{ps.dp_size} data-parallel ranks; use at least {ps.dp_size}.")
    if config.calib_doc_starts > 0:
        dataset = _with_document_starts(dataset, seq_length, config.calib_doc_starts)
    ids = shard_for_data_parallel(num_samples, ps.dp_rank, ps.dp_size)
    batches = list(micro_batches(dataset, ids, micro_batch_size))
    run = dict(seq_length=seq_length, micro_batch_size=micro_batch_size)

    masks = [batch["sample_mask"] for batch in batches]
    recorder = ActivationRecorder(model, ps, config, model_config, masks)
    grams = GramRecorder(model, ps, masks) if stats_dir is not None else None
    with recorder, grams or contextlib.nullcontext():
        sums = pipeline_forward(model, ps, batches, on_output=masked_loss_sum,
                                with_labels=True, **run)
    base_loss = reduce_loss(sums, ps)
    if not math.isfinite(base_loss):
        raise NonFiniteResultError(
            f"the calibration loss is {base_loss}: the model's outputs are not finite, so no "
            f"score would mean anything. Its weights are probably corrupt or diverged (or a "
            f"half-precision --params-dtype overflows); re-create the checkpoint or use fp32.")
    full = _collect_stages(recorder.finalize(), model_config, ps)
    if grams is not None:
        grams.save(stats_dir, model_config)

    depth: dict[str, torch.Tensor] = {}
    L = model_config.num_layers
    for metric in config.depth_metrics:
        kind, k = parse_depth_metric(metric)
        if kind == "bi":
            depth["bi"] = full["bi"]
            continue
        blocks = [range(start, start + k) for start in range(L - k + 1)]
        log.info("depth metric %s: %d passes over the calibration samples", metric, len(blocks))
        depth[metric] = skip_loss_increase(model, ps, batches, blocks, base_loss, **run)

    return Scores(model_config=model_config, settings=config, ffn=full["ffn"],
                  heads=full["heads"], query_groups=full["query_groups"],
                  hidden_norms=full["hidden_norms"], depth=depth, num_samples=num_samples,
                  num_tokens=num_samples * seq_length, calibration_loss=base_loss)


def importance_checkpoint(
    info,
    ps: ParallelState,
    data,
    *,
    num_samples: int,
    micro_batch_size: int,
    config: ImportanceConfig | None = None,
    params_dtype: torch.dtype = torch.float32,
    stats_dir: str | Path | None = None,
) -> Scores:
    """Build and load checkpoint ``info`` on this layout and score it on ``num_samples``
    calibration samples of the train split of ``data`` (a ``DataConfig``); with ``stats_dir``
    also write the reconstruction statistics there."""
    from minitron_megatron.checkpoint import load_checkpoint
    from minitron_megatron.data.loaders import build_datasets
    from minitron_megatron.evaluate import eod_id_of
    from minitron_megatron.model.build import build_model

    cfg = info.model_config
    config = config or ImportanceConfig()
    config.check_model(cfg.num_layers)
    CalibrationConfig(num_samples=num_samples, micro_batch_size=micro_batch_size)
    cfg.check_seq_length(data.seq_length)
    datasets = build_datasets(data, eod_id=eod_id_of(info), vocab_size=cfg.vocab_size,
                              num_samples={"train": num_samples},
                              padded_vocab_size=cfg.padded_vocab_size)
    model = build_model(cfg, ps, params_dtype=params_dtype, init_weights=False)
    load_checkpoint(info, model=model)
    return estimate_importance(model, ps, datasets["train"], model_config=cfg,
                               num_samples=num_samples, micro_batch_size=micro_batch_size,
                               seq_length=data.seq_length, config=config, stats_dir=stats_dir)
