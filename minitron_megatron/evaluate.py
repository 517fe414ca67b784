"""Held-out language-model loss and perplexity, at any TP × PP × DP — and the loss by window
start.

The loss is the mean next-token cross entropy over every unmasked token of ``eval_samples``
validation samples: sums and token counts are reduced exactly (fp64), so every layout reports the
same number up to float rounding in the model itself.

**Loss by window start** (``window_starts``): a window's first position has no context, so a model
must treat it the same whatever token sits there (the teacher does, to ~0.01 nats; a pruned model
may not). Measured on the same windows, over positions ``1..S−1`` only (the prediction made *at*
position 0 is left out, so every variant scores the same targets):

* ``as_sampled`` — the windows as the dataset cut them (mostly starting mid-document);
* ``<name>_first`` — the same windows with their first token replaced by token ``<name>``
  (``comma``, ``period``, ``eos`` from the checkpoint's tokenizer);
* ``spread`` — max − min of the four above (the teacher's is ≈ 0.01);
* ``doc_start`` — as many other windows, each starting at a document's first token
  (``data.windows.DocumentStartWindows``).

Example::

    result = evaluate_model(model, ps, val_dataset, num_samples=64, micro_batch_size=4,
                            seq_length=512)
    print(result.loss, result.ppl)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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

    window_starts: bool = False
    """Also report the loss by window start: as sampled, with the first token replaced by a
    comma, a period and end-of-document, and on windows that start at a document start
    (positions 1..S-1; five forward passes)."""

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

    window_starts: dict[str, float] | None = None
    """Loss by window start (see the module docstring), when requested."""

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.window_starts is None:
            del out["window_starts"]
        return out


@dataclass(kw_only=True, frozen=True)
class WindowStarts:
    """What the loss by window start is measured on."""

    first_tokens: Mapping[str, int]
    """Name → token id put at position 0 of every window (e.g. ``{"comma": 11}``)."""

    doc_starts: Sequence | None = None
    """Windows that start at a document's first token (the first ``num_samples`` are used)."""

    def __post_init__(self) -> None:
        bad = [name for name in self.first_tokens if not name.isidentifier()]
        if bad:
            raise ValueError(f"first-token names {bad} must be identifiers (they become JSON "
                             f"keys such as comma_first).")


def _masked_sum(batch: Batch, per_token_loss: torch.Tensor) -> torch.Tensor:
    """``[Σ loss·mask, Σ mask, Σ loss·mask over positions ≥ 1, Σ mask over positions ≥ 1]``."""
    mask = batch["loss_mask"].to(per_token_loss.device, torch.float64)  # [b, s]
    loss = per_token_loss.double() * mask
    return torch.stack([loss.sum(), mask.sum(), loss[:, 1:].sum(), mask[:, 1:].sum()]).cpu()


def _with_first(batches, token: int):
    for batch in batches:
        tokens = batch["tokens"].clone()
        tokens[:, 0] = token
        yield {**batch, "tokens": tokens}


def _sums(model, ps: ParallelState, batches, *, seq_length: int, micro_batch_size: int):
    """``_masked_sum`` totals over all ranks' micro-batches (each pipeline's last stage, TP rank
    0, counts once). Collective over all ranks."""
    sums = pipeline_forward(model, ps, batches, seq_length=seq_length,
                            micro_batch_size=micro_batch_size, on_output=_masked_sum,
                            with_labels=True)
    total = torch.stack(sums).sum(0) if sums else torch.zeros(4, dtype=torch.float64)
    if not (ps.is_last_stage and ps.tp_rank == 0):
        total.zero_()  # TP ranks hold identical losses: count each pipeline once
    return ps.all_reduce(total).tolist()


def evaluate_model(
    model: torch.nn.Module,
    ps: ParallelState,
    dataset,
    *,
    num_samples: int,
    micro_batch_size: int,
    seq_length: int,
    window_starts: WindowStarts | None = None,
) -> EvalResult:
    """Loss of ``model`` on samples ``0..num_samples-1`` of ``dataset`` (split over DP ranks);
    with ``window_starts`` also the loss by window start (one more forward pass per first token
    and one over the document-start windows).

    Collective over all ranks; every rank returns the same result. A NaN or infinite loss raises
    ``NonFiniteResultError`` instead of being reported as a number.
    """
    EvalConfig(num_samples=num_samples, micro_batch_size=micro_batch_size)
    ids = shard_for_data_parallel(num_samples, ps.dp_rank, ps.dp_size)
    run = dict(seq_length=seq_length, micro_batch_size=micro_batch_size)
    loss_sum, tokens, tail_sum, tail_tokens = _sums(
        model, ps, micro_batches(dataset, ids, micro_batch_size), **run)
    if tokens == 0 or tail_tokens == 0:
        raise ValueError("no tokens were evaluated: every sample is masked.")
    loss = loss_sum / tokens
    if not math.isfinite(loss):
        raise NonFiniteResultError(
            f"the loss over {int(tokens)} tokens is {loss}: the model's outputs are not finite. "
            f"Its weights are probably corrupt or diverged (or a half-precision --params-dtype "
            f"overflows); evaluate an earlier checkpoint, re-create this one, or use fp32.")
    by_start = None
    if window_starts is not None:
        by_start = {"as_sampled": tail_sum / tail_tokens}
        for name, token in window_starts.first_tokens.items():
            batches = _with_first(micro_batches(dataset, ids, micro_batch_size), token)
            _, _, s, n = _sums(model, ps, batches, **run)
            by_start[f"{name}_first"] = s / n
        by_start["spread"] = max(by_start.values()) - min(by_start.values())
        if window_starts.doc_starts is not None:
            _, _, s, n = _sums(model, ps, micro_batches(window_starts.doc_starts, ids,
                                                        micro_batch_size), **run)
            by_start["doc_start"] = s / n
    return EvalResult(loss=loss, ppl=math.exp(min(loss, 700.0)), tokens=int(tokens),
                      window_starts=by_start)


def first_token_ids(tokenizer) -> dict[str, int]:
    """The replacement first tokens: ``comma``, ``period`` and ``eos`` of a tokenizer."""
    out = {name: tokenizer.encode(text)[-1] for name, text in (("comma", ","),
                                                                ("period", "."))}
    out["eos"] = tokenizer.eod_id
    return out


def evaluate_checkpoint(
    info,
    ps: ParallelState,
    data,
    *,
    num_samples: int,
    micro_batch_size: int,
    params_dtype: torch.dtype = torch.float32,
    window_starts: bool = False,
) -> EvalResult:
    """Build the checkpoint's model on this layout, load it, and evaluate its validation loss
    (and, with ``window_starts``, the loss by window start; the first tokens come from the
    checkpoint's tokenizer)."""
    from minitron_megatron.checkpoint import load_checkpoint
    from minitron_megatron.data.loaders import build_datasets
    from minitron_megatron.model.build import build_model

    cfg = info.model_config
    EvalConfig(num_samples=num_samples, micro_batch_size=micro_batch_size)
    cfg.check_seq_length(data.seq_length)
    datasets = build_datasets(data, eod_id=eod_id_of(info), vocab_size=cfg.vocab_size,
                              num_samples={"valid": num_samples},
                              padded_vocab_size=cfg.padded_vocab_size)
    starts = window_starts_of(info, datasets["valid"], data, num_samples) if window_starts \
        else None
    model = build_model(cfg, ps, params_dtype=params_dtype, init_weights=False)
    load_checkpoint(info, model=model)
    return evaluate_model(model, ps, datasets["valid"], num_samples=num_samples,
                          micro_batch_size=micro_batch_size, seq_length=data.seq_length,
                          window_starts=starts)


def window_starts_of(info, dataset, data, num_samples: int) -> WindowStarts:
    """``WindowStarts`` for a checkpoint (its tokenizer's first tokens) and a split's dataset."""
    from minitron_megatron.data.tokenizer import Tokenizer
    from minitron_megatron.data.windows import DocumentStartWindows
    from minitron_megatron.errors import UserError

    if not info.tokenizer_dir:
        raise UserError(f"--window-starts needs the checkpoint's tokenizer (for the comma, "
                        f"period and end-of-document ids), but {info.root} carries none.")
    starts = DocumentStartWindows(dataset, data.seq_length, seed=data.seed)
    if len(starts) < num_samples:
        raise UserError(f"the split has {len(starts)} documents, fewer than the {num_samples} "
                        f"document-start windows --window-starts needs; lower --eval-samples.")
    return WindowStarts(first_tokens=first_token_ids(Tokenizer.load(info.tokenizer_dir)),
                        doc_starts=starts)


def eod_id_of(info) -> int:
    """End-of-document id of a checkpoint's tokenizer (0 when it carries none)."""
    from minitron_megatron.data.tokenizer import Tokenizer

    return Tokenizer.load(info.tokenizer_dir).eod_id if info.tokenizer_dir else 0
