"""Windows by where they start, and the loss by window start (as sampled, first token replaced,
starting at a document start) equal to a plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minitron_megatron.config import ParallelConfig
from minitron_megatron.data.loaders import DataConfig, build_datasets
from minitron_megatron.data.windows import DocumentStartWindows, MixedWindows
from minitron_megatron.evaluate import WindowStarts, evaluate_model, first_token_ids
from minitron_megatron.runtime.distributed import LaunchEnv, distributed, shutdown
from tests import reference_model as ref
from tests.pruning_helpers import load_at


def _valid(prefix, n=8, seq=32):
    with distributed(LaunchEnv(), ParallelConfig()):
        return build_datasets(DataConfig(data_path=prefix, seq_length=seq), eod_id=0,
                              vocab_size=384, num_samples={"valid": n})["valid"]


def test_document_start_windows(tiny_dataset, tiny_tokenizer):
    valid = _valid(tiny_dataset)
    windows = DocumentStartWindows(valid, seq_length=32, seed=5)
    corpus, docs = valid.dataset, sorted(valid.indices.tolist())
    assert len(windows) == len(docs)
    starts = []
    for i in range(len(windows)):
        w = windows[i]
        stream = torch.cat([torch.as_tensor(corpus[d].astype("int64")) for d in docs * 2])
        offsets = [0]
        for d in docs:
            offsets.append(offsets[-1] + len(corpus[d]))
        # the window is the split's token stream cut at one of its documents' starts
        matches = [k for k, o in enumerate(offsets[:-1])
                   if torch.equal(stream[o:o + 33], torch.cat([w["tokens"], w["labels"][-1:]]))]
        assert matches, i
        starts.append(matches[0])
        assert torch.equal(w["labels"][:-1], w["tokens"][1:])
        assert w["loss_mask"].sum() == 32 and torch.equal(w["position_ids"], torch.arange(32))
    assert len(set(starts)) == len(docs)  # every document starts exactly one window
    assert starts != sorted(starts)  # in a seeded order, not the corpus order
    again = DocumentStartWindows(valid, seq_length=32, seed=5)
    assert all(torch.equal(again[i]["tokens"], windows[i]["tokens"]) for i in range(4))
    with pytest.raises(IndexError):
        windows[len(windows)]


@pytest.mark.parametrize("fraction,pattern", [(0.5, "mdmdmdmd"), (0.25, "mmmdmmmd"),
                                              (0.0, "mmmmmmmm"), (1.0, "dddddddd")])
def test_mixed_windows_interleave_evenly(fraction, pattern):
    mid = [f"m{i}" for i in range(100)]
    starts = [f"d{i}" for i in range(100)]
    mixed = MixedWindows(mid, starts, fraction)
    got = [mixed[i] for i in range(8)]
    assert "".join(x[0] for x in got) == pattern
    for kind in "md":  # each source is read in order, without repeats
        seen = [int(x[1:]) for x in got if x[0] == kind]
        assert seen == list(range(len(seen)))
    assert len(mixed) == (100 if fraction in (0.0, 1.0) else int(100 / max(fraction,
                                                                           1 - fraction)))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        MixedWindows(mid, starts, 1.5)


def _reference_tail_loss(cfg, sd, samples, first=None):
    tokens = torch.stack([s["tokens"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    if first is not None:
        tokens[:, 0] = first
    logits, _ = ref.forward(cfg, sd, tokens)
    return F.cross_entropy(logits[:, 1:].flatten(0, 1), labels[:, 1:].flatten()).item()


def test_loss_by_window_start_equals_reference(llama_ckpt_untied, tiny_dataset,
                                               tiny_tokenizer):
    ps, info, model = load_at(LaunchEnv(), llama_ckpt_untied)
    try:
        cfg, sd = info.model_config, model.state_dict()
        data = DataConfig(data_path=tiny_dataset, seq_length=32)
        valid = build_datasets(data, eod_id=tiny_tokenizer.eod_id, vocab_size=cfg.vocab_size,
                               num_samples={"valid": 6})["valid"]
        starts = DocumentStartWindows(valid, seq_length=32)
        firsts = first_token_ids(tiny_tokenizer)
        assert firsts["eos"] == tiny_tokenizer.eod_id
        assert tiny_tokenizer.decode([firsts["comma"]]) == ","
        assert tiny_tokenizer.decode([firsts["period"]]) == "."
        result = evaluate_model(model, ps, valid, num_samples=6, micro_batch_size=4,
                                seq_length=32, window_starts=WindowStarts(
                                    first_tokens=firsts, doc_starts=starts))
        samples = [valid[i] for i in range(6)]
        got = result.window_starts
        want = {"as_sampled": _reference_tail_loss(cfg, sd, samples)}
        for name, token in firsts.items():
            want[f"{name}_first"] = _reference_tail_loss(cfg, sd, samples, token)
        want["spread"] = max(want.values()) - min(want.values())
        want["doc_start"] = _reference_tail_loss(cfg, sd, [starts[i] for i in range(6)])
        assert sorted(got) == sorted(want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=2e-5), key
        assert want["spread"] > 1e-3  # the first token matters to an untrained model
        assert "window_starts" in result.to_dict()
        plain = evaluate_model(model, ps, valid, num_samples=6, micro_batch_size=4,
                               seq_length=32)
        assert plain.loss == result.loss and "window_starts" not in plain.to_dict()
    finally:
        shutdown()


def test_calibration_mixes_document_start_windows(llama_ckpt_untied, tiny_dataset,
                                                  tiny_tokenizer):
    from minitron_megatron.errors import UserError
    from minitron_megatron.importance import ImportanceConfig, estimate_importance

    ps, info, model = load_at(LaunchEnv(), llama_ckpt_untied)
    try:
        cfg = info.model_config
        train = build_datasets(DataConfig(data_path=tiny_dataset, seq_length=32),
                               eod_id=tiny_tokenizer.eod_id, vocab_size=cfg.vocab_size,
                               num_samples={"train": 8})["train"]
        run = dict(model_config=cfg, num_samples=8, micro_batch_size=4, seq_length=32)
        mixed = estimate_importance(model, ps, train, **run, config=ImportanceConfig(
            depth_metrics=(), calib_doc_starts=0.5))
        starts = DocumentStartWindows(train, seq_length=32)
        explicit = [train[0], starts[0], train[1], starts[1], train[2], starts[2], train[3],
                    starts[3]]
        want = estimate_importance(model, ps, explicit, **run,
                                   config=ImportanceConfig(depth_metrics=()))
        plain = estimate_importance(model, ps, train, **run,
                                    config=ImportanceConfig(depth_metrics=()))
        for axis in ("ffn", "heads", "hidden_norms"):
            assert torch.equal(getattr(mixed, axis), getattr(want, axis)), axis
        assert not torch.equal(mixed.ffn, plain.ffn)
        assert mixed.settings.calib_doc_starts == 0.5
        with pytest.raises(UserError, match="GPTDataset"):
            estimate_importance(model, ps, explicit, **run, config=ImportanceConfig(
                depth_metrics=(), calib_doc_starts=0.5))
    finally:
        shutdown()
