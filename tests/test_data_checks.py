"""Bad run settings and data, as a user passes them: each is one line (exit 2) before any model is
loaded, and a NaN loss is an error, never a number."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from minitron_megatron.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from minitron_megatron.config import ParallelConfig
from minitron_megatron.data.loaders import check_token_ids
from minitron_megatron.errors import UserError
from minitron_megatron.model.build import build_model
from minitron_megatron.runtime.distributed import LaunchEnv, distributed
from minitron_megatron.testing.multiprocess import run_distributed
from tests.cli_helpers import fail_one_line


def _no_work(*args, **kwargs):
    raise AssertionError("work started before the input was checked")


def _evaluate(ckpt, data, *extra):
    return ["evaluate", "--load", str(ckpt), "--data-path", str(data), "--seq-length", "32",
            "--eval-samples", "4", *extra]


@pytest.mark.parametrize("flags,message", [
    (["--eval-samples", "0"], "--eval-samples must be a positive integer"),
    (["--eval-samples", "-3"], "--eval-samples must be a positive integer"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be a positive integer"),
])
def test_evaluate_counts_checked_at_config_time(flags, message, llama_ckpt_untied, tiny_dataset,
                                                capsys, monkeypatch):
    monkeypatch.setattr("minitron_megatron.api.run_distributed", _no_work)
    err = fail_one_line(_evaluate(llama_ckpt_untied, tiny_dataset, *flags), capsys)
    assert message in err and f"got {flags[1]}" in err


@pytest.mark.parametrize("flags,message", [
    (["--calib-samples", "0"], "--calib-samples must be a positive integer"),
    (["--calib-samples", "4", "--micro-batch-size", "0"],
     "--micro-batch-size must be a positive integer"),
])
def test_importance_counts_checked_at_config_time(flags, message, llama_ckpt_untied, tiny_dataset,
                                                  tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("minitron_megatron.api.run_distributed", _no_work)
    err = fail_one_line(["importance", "--load", str(llama_ckpt_untied), "--data-path",
                         tiny_dataset, "--seq-length", "32", "--save-scores",
                         str(tmp_path / "s.safetensors"), *flags], capsys)
    assert message in err


def test_seq_length_above_the_model_positions(gpt_ckpt, llama_ckpt_untied, tiny_dataset,
                                              tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("minitron_megatron.api.run_distributed", _no_work)
    args = _evaluate(gpt_ckpt, tiny_dataset)  # learned positions: 64 of them
    args[args.index("--seq-length") + 1] = "128"
    err = fail_one_line(args, capsys)
    assert "--seq-length 128 exceeds the model's max_position_embeddings=64" in err
    assert "use --seq-length 64 or less" in err
    err = fail_one_line(["finetune", "--model", str(llama_ckpt_untied), "--data-path", tiny_dataset,
                         "--seq-length", "512", "--train-iters", "1", "--global-batch-size", "1",
                         "--save", str(tmp_path / "run")], capsys)  # RoPE: 256 positions
    assert "max_position_embeddings=256" in err and not (tmp_path / "run").exists()


def _write_dataset(prefix, documents, dtype=np.uint16):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in documents:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture(scope="module")
def foreign_dataset(tmp_path_factory):
    """Token ids of a larger vocabulary (up to 999; the tiny models have 384): only the last
    document holds one, so a scan split over two ranks finds it on the second."""
    generator = np.random.default_rng(0)
    docs = [generator.integers(0, 300, 200).tolist() for _ in range(60)]
    docs[-1][17] = 999
    return _write_dataset(tmp_path_factory.mktemp("foreign") / "data", docs)


def test_token_ids_beyond_the_vocabulary(llama_ckpt_untied, foreign_dataset, capsys,
                                         monkeypatch):
    monkeypatch.setattr("minitron_megatron.model.build.build_model", _no_work)
    err = fail_one_line(_evaluate(llama_ckpt_untied, foreign_dataset), capsys)
    assert "holds token id 999 but the model's vocabulary has 384 entries" in err
    assert "preprocess it again" in err


def _scan(env, prefix):
    with distributed(env, ParallelConfig()):
        try:
            check_token_ids(prefix, 384)
        except UserError as err:
            return str(err)
        return None


@pytest.mark.multiprocess
def test_token_scan_split_over_ranks_fails_on_every_rank(foreign_dataset):
    messages = run_distributed(_scan, 2, foreign_dataset)
    assert messages[0] == messages[1] and "token id 999" in messages[0], messages


def test_truncated_bin_with_intact_idx(llama_ckpt_untied, tiny_dataset, tmp_path, capsys,
                                       monkeypatch):
    monkeypatch.setattr("minitron_megatron.api.run_distributed", _no_work)
    prefix = tmp_path / "cut"
    shutil.copy(f"{tiny_dataset}.idx", f"{prefix}.idx")
    data = open(f"{tiny_dataset}.bin", "rb").read()
    open(f"{prefix}.bin", "wb").write(data[: len(data) // 2])
    err = fail_one_line(_evaluate(llama_ckpt_untied, prefix), capsys)
    assert f"{prefix}.bin holds {len(data) // 2} bytes but {prefix}.idx describes {len(data)}" \
        in err and "preprocess the data again" in err


@pytest.fixture(scope="module")
def nan_ckpt(tmp_path_factory, llama_ckpt_untied):
    """The tiny Llama with a NaN final norm (every logit NaN), saved with valid checksums."""
    root = tmp_path_factory.mktemp("nan") / "ckpt"
    with distributed(LaunchEnv(), ParallelConfig()) as ps:
        info = find_checkpoint(llama_ckpt_untied)
        model = build_model(info.model_config, ps, init_weights=False)
        load_checkpoint(info, model=model)
        with torch.no_grad():
            model.decoder.final_layernorm.weight.fill_(float("nan"))
        save_checkpoint(root, model=model, model_config=info.model_config,
                        tokenizer_dir=info.tokenizer_dir)
    return root


def test_nan_loss_is_an_error_not_a_number(nan_ckpt, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "result.json"
    err = fail_one_line(_evaluate(nan_ckpt, tiny_dataset, "--output-json", str(out)), capsys)
    assert "the loss over 128 tokens is nan" in err and "corrupt or diverged" in err
    assert not out.exists()


def test_training_refuses_a_nan_validation_loss(nan_ckpt, tiny_dataset, tmp_path, capsys):
    err = fail_one_line(["finetune", "--model", str(nan_ckpt), "--data-path", tiny_dataset,
                         "--seq-length", "32", "--train-iters", "2", "--global-batch-size", "2",
                         "--eval-interval", "1", "--save", str(tmp_path / "run")], capsys)
    assert "training stopped before its first step: the validation loss is nan on the " \
        "starting model" in err, err
    assert "check it with `minitron evaluate`" in err
    assert not list((tmp_path / "run").glob("iter_*"))
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or all(
        "val_loss" not in json.loads(line) for line in metrics.read_text().splitlines())
