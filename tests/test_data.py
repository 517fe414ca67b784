"""Preprocessing, the deterministic split, and micro-batching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minitron_megatron.data.loaders import (
    DataConfig,
    build_datasets,
    distinct_samples,
    micro_batches,
    shard_for_data_parallel,
)
from minitron_megatron.data.preprocess import preprocess, read_documents
from minitron_megatron.data.tokenizer import Tokenizer


def test_read_documents_all_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": " "}\n')
    (tmp_path / "b.json").write_text(json.dumps({"x": {"extract": "three"}, "y": "four"}))
    (tmp_path / "c.txt").write_text("five\nstill five\n\n\nsix\n")
    assert list(read_documents(tmp_path / "a.jsonl")) == ["one", "two"]
    assert list(read_documents(tmp_path / "b.json")) == ["three", "four"]
    assert list(read_documents(tmp_path / "c.txt")) == ["five\nstill five", "six"]
    with pytest.raises(ValueError, match="unsupported input type"):
        list(read_documents(tmp_path / "d.csv"))


def test_preprocess_writes_tokens_and_eod(tmp_path, tiny_tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = ["ka lo mi ne.", "su ta ri po an el."]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stats = preprocess(tmp_path / "in.jsonl", tiny_tokenizer, tmp_path / "out")
    dataset = IndexedDataset(str(tmp_path / "out"))
    assert stats.documents == 2 == len(dataset)
    for i, doc in enumerate(docs):
        expected = tiny_tokenizer.encode(doc) + [tiny_tokenizer.eod_id]
        assert dataset[i].tolist() == expected
    assert stats.tokens == sum(len(dataset[i]) for i in range(2))
    assert not list(tmp_path.glob("*.tmp*"))


def test_preprocess_empty_input_fails_before_writing(tmp_path, tiny_tokenizer):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="holds no documents"):
        preprocess(tmp_path / "empty.jsonl", tiny_tokenizer, tmp_path / "out")
    assert not list(tmp_path.glob("out*"))


def test_tokenizer_travels(tiny_tokenizer, tmp_path):
    saved = Tokenizer.load(tiny_tokenizer.save(tmp_path / "tok"))
    assert saved.encode("ka lo mi") == tiny_tokenizer.encode("ka lo mi")
    assert saved.eod_id == tiny_tokenizer.eod_id == tiny_tokenizer.token_to_id("<|endoftext|>")


def _datasets(prefix, **sizes):
    from minitron_megatron.config import ParallelConfig
    from minitron_megatron.runtime.distributed import LaunchEnv, distributed

    with distributed(LaunchEnv(), ParallelConfig()):
        return build_datasets(DataConfig(data_path=prefix, seq_length=32), eod_id=0,
                              vocab_size=384, num_samples=sizes)


def test_split_is_deterministic_and_disjoint(tiny_dataset):
    first = _datasets(tiny_dataset, train=16, valid=8)
    second = _datasets(tiny_dataset, train=16, valid=8)
    for name in ("train", "valid"):
        for i in range(8):
            assert torch.equal(first[name][i]["tokens"], second[name][i]["tokens"])
    train_docs = set(first["train"].indices.tolist())
    valid_docs = set(first["valid"].indices.tolist())
    assert train_docs and valid_docs and not train_docs & valid_docs
    assert max(train_docs) < min(valid_docs)  # Megatron's split: contiguous document ranges


def test_too_many_samples_is_explained(tiny_dataset):
    with pytest.raises(ValueError, match="distinct samples"):
        _datasets(tiny_dataset, valid=100_000)


def test_training_split_cycles_epochs_as_megatron_does(tiny_dataset):
    """A split asked for more samples than it holds cycles its documents (GPTDataset's
    multi-epoch index) when it may repeat, and is refused otherwise."""
    from minitron_megatron.config import ParallelConfig
    from minitron_megatron.runtime.distributed import LaunchEnv, distributed

    with distributed(LaunchEnv(), ParallelConfig()):
        cfg = DataConfig(data_path=tiny_dataset, seq_length=32)
        one = build_datasets(cfg, eod_id=0, vocab_size=384, num_samples={"train": 1})["train"]
        n = distinct_samples(one, 32)
        train = build_datasets(cfg, eod_id=0, vocab_size=384, num_samples={"train": 3 * n},
                               repeat=("train",))["train"]
        with pytest.raises(ValueError, match=f"holds {n} distinct samples"):
            build_datasets(cfg, eod_id=0, vocab_size=384, num_samples={"train": n + 1})
    assert len(one) == n and len(train) >= 3 * n
    # every training document is used once per epoch, no other document ever
    uses = np.bincount(train.document_index, minlength=len(train.dataset.document_indices) - 1)
    assert (uses[train.indices] == 3).all() and uses.sum() == 3 * len(train.indices)
    assert all(train[i]["tokens"].shape == (32,) for i in (0, n, 3 * n - 1))


def test_micro_batches_pad_the_last_batch(tiny_dataset):
    valid = _datasets(tiny_dataset, valid=5)["valid"]
    batches = list(micro_batches(valid, range(5), 2))
    assert [b["tokens"].shape for b in batches] == [(2, 32)] * 3
    assert batches[-1]["sample_mask"].tolist() == [1.0, 0.0]
    assert batches[-1]["loss_mask"][1].sum() == 0
    assert torch.equal(batches[0]["labels"][0, :-1], batches[0]["tokens"][0, 1:])


@pytest.mark.parametrize("n,dp", [(10, 3), (2, 4), (8, 2)])
def test_data_parallel_shards_partition_the_samples(n, dp):
    shards = [shard_for_data_parallel(n, r, dp) for r in range(dp)]
    assert sorted(np.concatenate([s for s in shards if s]).tolist()) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
