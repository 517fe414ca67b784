"""Train / validation / calibration batches from an indexed dataset, via Megatron's ``GPTDataset``.

The split is Megatron's deterministic document split (``--split 98,2,0``: the first 98 % of the
documents train, the next 2 % validate); samples within a split are shuffled with the seed. Every
rank builds the same datasets and reads the samples its data-parallel rank owns, so no tensor is
broadcast.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from minitron_megatron.config import DEFAULT_SEED
from minitron_megatron.errors import MissingInputError, UserError

SPLITS = ("train", "valid", "test")
CARRIED = ("teacher_values", "teacher_indices")
"""Per-sample tensors a wrapped dataset may add (a teacher cache's top-k), batched too."""
_SCAN_CHUNK = 1 << 26  # tokens per step of the token-id scan (128 MiB of uint16)


def positive_int(flag: str, value: object, what: str) -> None:
    """Config-time check of a count flag (``--eval-samples``, ``--micro-batch-size``, ...)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{flag} must be a positive integer ({what}), got {value!r}.")


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    """Where the tokens are and how they are cut into samples."""

    data_path: str
    """Prefix of the indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``)."""

    seq_length: int
    """Tokens per sample (labels are the next tokens)."""

    split: str = "98,2,0"
    """Train, validation and test shares of the documents."""

    seed: int = DEFAULT_SEED
    """Seed of the sample shuffle."""

    cache_path: str | None = None
    """Directory for Megatron's index caches (default: next to the data)."""

    def __post_init__(self) -> None:
        if self.seq_length <= 0:
            raise UserError(f"seq-length must be positive, got {self.seq_length}.")
        prefix = Path(self.data_path)
        missing = [str(prefix) + ext for ext in (".bin", ".idx")
                   if not Path(str(prefix) + ext).is_file()]
        if missing:
            raise MissingInputError(
                f"dataset {self.data_path} not found ({', '.join(missing)} missing); create it "
                f"with `minitron preprocess --input FILE --tokenizer T --output-prefix "
                f"{self.data_path}`."
            )
        check_bin_size(self.data_path)


class _DatasetTokenizer:
    """The two facts ``GPTDataset`` needs of a tokenizer (and its cache identity)."""

    def __init__(self, eod: int, vocab_size: int):
        self.eod = eod
        self.vocab_size = vocab_size
        self.unique_identifiers = {"class": "minitron", "eod": eod, "vocab_size": vocab_size}


def _open_indexed(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        return IndexedDataset(prefix)
    except (ValueError, OSError, AssertionError) as err:
        raise UserError(f"dataset {prefix}.idx cannot be read ({err}); it is truncated or not a "
                        f"Megatron index: preprocess the data again.") from None


def check_bin_size(prefix: str) -> None:
    """The ``.bin`` holds every token its ``.idx`` points to (reads the index only)."""
    index = _open_indexed(prefix).index
    if not len(index.sequence_lengths):
        return
    expected = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * \
        index.dtype_size
    actual = os.path.getsize(f"{prefix}.bin")
    if actual < expected:
        raise UserError(f"dataset {prefix}.bin holds {actual} bytes but {prefix}.idx describes "
                        f"{expected}: the .bin is truncated (or the two files come from "
                        f"different runs); preprocess the data again.")


def check_token_ids(prefix: str, padded_vocab_size: int) -> None:
    """Every token id of the dataset indexes the model's (padded) vocabulary. Skipped when the
    dataset's dtype cannot hold a larger id; otherwise a vectorised max/min over the ``.bin``,
    split over the ranks when distributed (cost: ``docs/errors.md``)."""
    dtype = np.dtype(_open_indexed(prefix).index.dtype)
    if np.iinfo(dtype).max < padded_vocab_size and np.iinfo(dtype).min >= 0:
        return
    tokens = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    start, stop = len(tokens) * rank // world, len(tokens) * (rank + 1) // world
    low, high = 0, -1
    for i in range(start, stop, _SCAN_CHUNK):
        chunk = tokens[i:min(i + _SCAN_CHUNK, stop)]
        low, high = min(low, int(chunk.min())), max(high, int(chunk.max()))
    if world > 1:
        found: list = [None] * world
        dist.all_gather_object(found, (low, high))
        low, high = min(f[0] for f in found), max(f[1] for f in found)
    if high >= padded_vocab_size or low < 0:
        bad = high if high >= padded_vocab_size else low
        raise UserError(f"dataset {prefix} holds token id {bad} but the model's vocabulary has "
                        f"{padded_vocab_size} entries (ids 0..{padded_vocab_size - 1}): it was "
                        f"tokenized for another model; preprocess it again with --tokenizer "
                        f"<this checkpoint>.")


def build_datasets(cfg: DataConfig, *, eod_id: int, vocab_size: int,
                   num_samples: dict[str, int], repeat: Collection[str] = (),
                   padded_vocab_size: int | None = None):
    """Megatron ``GPTDataset`` per split name in ``num_samples`` (collective when distributed).

    A split named in ``repeat`` (training) cycles its documents when asked for more samples
    than one pass gives: GPTDataset's multi-epoch index, each epoch a new shuffle. Any other
    split (validation, evaluation, calibration) never counts a sample twice: ``UserError``
    when it cannot give that many distinct samples of the sequence length. A split shorter
    than one sample is refused either way, and so, given the model's ``padded_vocab_size``,
    is a token id outside it.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend=([cfg.data_path], None),
        split=cfg.split,
        path_to_cache=cfg.cache_path,
        tokenizer=_DatasetTokenizer(eod_id, vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    if padded_vocab_size is not None:
        check_token_ids(cfg.data_path, padded_vocab_size)
    for name, available in _split_samples(cfg, list(num_samples)).items():
        if num_samples[name] > available and (name not in repeat or available == 0):
            raise UserError(
                f"the {name} split of {cfg.data_path} holds {available} distinct samples of "
                f"{cfg.seq_length} tokens, fewer than the {num_samples[name]} requested; lower "
                f"the sample count or seq-length, change --split, or preprocess more text."
            )
    sizes = [max(num_samples.get(name, 0), 1) if name in num_samples else 0 for name in SPLITS]
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return {name: dataset for name, dataset in zip(SPLITS, datasets) if name in num_samples}


def _split_samples(cfg: DataConfig, names: list[str]) -> dict[str, int]:
    """Distinct samples one pass over each named split gives (Megatron's document split),
    before any index is built; refuses an empty split."""
    from megatron.core.datasets.utils import normalize

    shares = normalize([float(x) for x in cfg.split.split(",")])
    index = _open_indexed(cfg.data_path)  # the lengths are a view of its memory map
    lengths = index.sequence_lengths
    n_docs = len(index.document_indices) - 1
    begin, out = 0.0, {}
    for name, share in zip(SPLITS, shares):
        end = begin + share
        first, stop = round(begin * n_docs), round(end * n_docs)
        begin = end
        if name not in names:
            continue
        if stop <= first:
            raise UserError(f"the {name} split of {cfg.data_path} is empty ({n_docs} documents, "
                            f"--split {cfg.split}); give it a larger share or more documents.")
        out[name] = max(int(lengths[first:stop].sum()) - 1, 0) // cfg.seq_length
    del lengths, index
    return out


def distinct_samples(dataset, seq_length: int) -> int:
    """Samples one pass over the split's documents gives (no repetition)."""
    lengths = dataset.dataset.sequence_lengths[dataset.indices]
    return max(int(lengths.sum()) - 1, 0) // seq_length


def micro_batches(dataset, sample_ids: Sequence[int], micro_batch_size: int
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """Stack samples into micro-batches of exactly ``micro_batch_size`` (a short last batch is
    padded with copies of its first sample whose ``loss_mask`` and ``sample_mask`` are zero)."""
    ids = list(sample_ids)
    for start in range(0, len(ids), micro_batch_size):
        chunk = ids[start:start + micro_batch_size]
        samples = [dataset[i] for i in chunk]
        real = len(samples)
        samples += [samples[0]] * (micro_batch_size - real)
        keys = ("tokens", "labels", "loss_mask", "position_ids",
                *(key for key in CARRIED if key in samples[0]))
        batch = {key: torch.stack([s[key] for s in samples]) for key in keys}
        batch["sample_mask"] = (torch.arange(micro_batch_size) < real).float()
        batch["loss_mask"] = batch["loss_mask"] * batch["sample_mask"][:, None]
        yield batch


def shard_for_data_parallel(num_samples: int, dp_rank: int, dp_size: int) -> list[int]:
    """This DP rank's contiguous share of samples ``0..num_samples-1`` (sizes differ by ≤ 1)."""
    per, extra = divmod(num_samples, dp_size)
    start = dp_rank * per + min(dp_rank, extra)
    return list(range(start, start + per + (dp_rank < extra)))
