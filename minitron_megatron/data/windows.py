"""Samples by where their window starts: at a document's first token, or mixed with Megatron's
``GPTDataset`` windows (which start anywhere in the token stream, usually mid-document).

A window's first position is special to a causal LM: nothing precedes it, so every later token
sees it through attention (the "attention sink"). A pruned model can lose the machinery that makes
position 0 behave the same whatever token sits there; these windows measure that (``evaluate``)
and calibrate on it (``importance``).

Example::

    valid = build_datasets(cfg, eod_id=0, vocab_size=V, num_samples={"valid": 64})["valid"]
    starts = DocumentStartWindows(valid, seq_length=256)      # window i starts at a document
    calibration = MixedWindows(train, starts_train, doc_start_fraction=0.5)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from minitron_megatron.config import DEFAULT_SEED
from minitron_megatron.errors import UserError


def _sample(ids: np.ndarray) -> dict[str, torch.Tensor]:
    """``seq_length + 1`` token ids → the dict ``GPTDataset`` yields (no attention mask)."""
    ids = torch.from_numpy(ids.astype(np.int64))
    seq = ids.numel() - 1
    return {"tokens": ids[:-1].clone(), "labels": ids[1:].clone(),
            "loss_mask": torch.ones(seq, dtype=torch.float32),
            "position_ids": torch.arange(seq, dtype=torch.int64)}


class DocumentStartWindows(Sequence):
    """Windows of ``seq_length`` tokens (+1 label) that start at the first token of a document of
    ``dataset``'s split (a Megatron ``GPTDataset``).

    Window ``i`` starts at document ``order[i]``, where ``order`` is a permutation of the split's
    documents seeded by ``seed``; like ``GPTDataset``'s samples, a window runs on through the
    documents that follow it in the corpus (each ends with its end-of-document token), wrapping to
    the split's first document at its end. Deterministic, and the same on every rank.
    """

    def __init__(self, dataset, seq_length: int, seed: int = DEFAULT_SEED):
        self.indexed = dataset.dataset  # the IndexedDataset of the whole corpus
        self.documents = np.sort(np.asarray(dataset.indices))  # the split's documents
        self.seq_length = seq_length
        self.order = np.random.RandomState(seed).permutation(len(self.documents))
        lengths = self.indexed.sequence_lengths[self.documents]
        if int(lengths.sum()) < seq_length + 1:
            raise UserError(f"the split holds {int(lengths.sum())} tokens, fewer than one "
                            f"window of {seq_length} + 1; lower --seq-length.")

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} of {len(self)} (one per document of the split)")
        need, parts, k = self.seq_length + 1, [], int(self.order[i])
        while need > 0:
            doc = np.asarray(self.indexed[int(self.documents[k])])[:need]
            parts.append(doc)
            need -= len(doc)
            k = (k + 1) % len(self.documents)
        return _sample(np.concatenate(parts))


class MixedWindows(Sequence):
    """``mid`` and ``starts`` interleaved evenly: sample ``i`` is the next document-start window
    when ``⌊(i+1)·f⌋ > ⌊i·f⌋`` (``f = doc_start_fraction``), else the next ``mid`` window. So any
    prefix ``0..n−1`` — and any data-parallel share of it — holds a fraction ``f`` of
    document-start windows (to within one)."""

    def __init__(self, mid: Sequence, starts: Sequence, doc_start_fraction: float):
        if not 0.0 <= doc_start_fraction <= 1.0:
            raise UserError(f"doc_start_fraction {doc_start_fraction} must be in [0, 1].")
        self.mid, self.starts, self.fraction = mid, starts, doc_start_fraction

    def _source(self, i: int) -> tuple[Sequence, int]:
        f = self.fraction
        before = int(np.floor(i * f + 1e-9))  # document-start windows among 0..i−1
        if int(np.floor((i + 1) * f + 1e-9)) > before:
            return self.starts, before
        return self.mid, i - before

    def __len__(self) -> int:
        f = self.fraction
        limits = [len(self.mid) / (1 - f) if f < 1 else float("inf"),
                  len(self.starts) / f if f > 0 else float("inf")]
        return int(min(limits))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        source, j = self._source(i)
        return source[j]
