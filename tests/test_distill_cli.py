"""``minitron distill`` / ``minitron finetune`` from the command line: bad inputs fail with one
actionable error before any work; a run prints its progress and writes metrics.jsonl."""

from __future__ import annotations

import importlib.machinery
import json
import re
import shutil
import sys
import types

import pytest

from minitron_megatron.checkpoint import find_checkpoint
from minitron_megatron.cli import main
from minitron_megatron.config import ParallelConfig
from minitron_megatron.data.loaders import DataConfig, build_datasets
from minitron_megatron.distill import progress
from minitron_megatron.distill.progress import read_metrics
from minitron_megatron.evaluate import eod_id_of, evaluate_model
from minitron_megatron.model.build import build_model
from minitron_megatron.runtime.distributed import LaunchEnv, distributed
from tests import distill_helpers, factories


@pytest.fixture(scope="module")
def students(tmp_path_factory, llama_ckpt_untied):
    root = tmp_path_factory.mktemp("students")
    good = distill_helpers.make_student(root / "good", llama_ckpt_untied)
    other_vocab = distill_helpers.make_student(root / "vocab", llama_ckpt_untied,
                                               vocab_size=300, padded_vocab_size=384)
    other_tok = root / "tokenizer"
    shutil.copytree(good, other_tok)
    tok_dir = find_checkpoint(other_tok).tokenizer_dir
    shutil.rmtree(tok_dir)
    factories.make_tokenizer(root / "tok_src", vocab_size=300).save(tok_dir)
    wide = distill_helpers.make_student(root / "wide", llama_ckpt_untied, hidden_size=48)
    return {"good": good, "vocab": other_vocab, "tokenizer": other_tok, "wide": wide}


def distill_args(teacher, student, data, save, *extra):
    return ["distill", "--teacher", str(teacher), "--student", str(student), "--data-path", data,
            "--seq-length", "32", "--save", str(save), "--train-iters", "2",
            "--global-batch-size", "2", "--micro-batch-size", "1", *extra]


BAD = {
    "vocabulary": ("vocab", [], "vocabularies differ"),
    "tokenizer": ("tokenizer", [], "tokenizers differ"),
    "layout": ("good", ["--pipeline-model-parallel-size", "3"],
               "the student .* cannot be laid out at TP=1, PP=3.*must suit both"),
    "batch": ("good", ["--global-batch-size", "3", "--micro-batch-size", "2"],
              "global-batch-size 3 is not divisible by --micro-batch-size 2"),
    # training cycles epochs; validation never counts a sample twice
    "data-too-short": ("good", ["--eval-interval", "1", "--eval-iters", "100000"],
                       "valid split .* fewer than the 200000 requested.*--eval-iters × "
                       "--global-batch-size = 200000 validation samples"),
    "resume-other-shape": ("good", ["--load", "{wide}"], "another shape.*hidden_size"),
    "pairs": ("good", ["--kd-intermediate", "0:9"], "pair 0:9 is out of range"),
    "reverse-top-k": ("good", ["--kd-reverse", "--kd-top-k", "4"], "--kd-reverse with --kd-top-k"),
    "wandb-missing": ("good", ["--wandb-project", "p"],
                      "pip install 'minitron-megatron\\[wandb\\]'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_before_any_work(case, students, llama_ckpt_untied, tiny_dataset,
                                         tmp_path, capsys, monkeypatch):
    student, extra, message = BAD[case]
    extra = [x.format(wide=students["wide"]) for x in extra]
    if case == "wandb-missing":
        real = progress.importlib.util.find_spec
        monkeypatch.setattr(progress.importlib.util, "find_spec",
                            lambda name: None if name == "wandb" else real(name))
    save = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(distill_args(llama_ckpt_untied, students[student], tiny_dataset, save, *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minitron distill: error: "), err
    assert re.search(message, err[0]), err[0]
    assert not save.exists()  # nothing was written


def test_distill_prints_progress_and_logs_metrics(students, llama_ckpt_untied, tiny_dataset,
                                                  tmp_path, capsys, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")  # stands in for the optional wandb package
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or types.SimpleNamespace(
        log=lambda data, step: calls.append(("log", step, data)),
        finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    save = tmp_path / "run"
    main(distill_args(llama_ckpt_untied, students["good"], tiny_dataset, save, "--eval-interval",
                      "2", "--kd-ce-weight", "0.5", "--kd-temperature", "2",
                      "--wandb-project", "p"))
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("iteration      2/2"))
    for part in ("| loss ", "| kd loss ", "| lr ", "| grad norm ", " tok/s", "| ETA "):
        assert part in line, line
    assert "validation at iteration 2: val loss" in out
    records = read_metrics(save)
    summary = json.loads(out.strip().splitlines()[-1])  # the closing JSON line
    last_eval = [r for r in records if "val_loss" in r][-1]
    assert summary == {"save": str(save), "iteration": 2, "val_loss": last_eval["val_loss"]}
    steps = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in steps] == [1, 2]
    for r in steps:  # α·CE + (1 − α)·KD with α = 0.5
        assert r["loss"] == pytest.approx(0.5 * r["ce_loss"] + 0.5 * r["kd_loss"], rel=1e-6)
    assert [c[0] for c in calls] == ["init", "log", "log", "log", "log", "finish"]
    assert calls[0][1]["project"] == "p" and calls[1][1] == 0  # validation at iteration 0
    config = json.loads((save / "iter_0000002" / "run_config.json").read_text())
    assert config["kd"]["temperature"] == 2.0 and config["teacher"]


def test_finetune_is_cross_entropy_without_teacher(students, tiny_dataset, tmp_path, capsys):
    save = tmp_path / "ft"
    main(["finetune", "--model", str(students["good"]), "--data-path", tiny_dataset,
          "--seq-length", "32", "--save", str(save), "--train-iters", "2",
          "--global-batch-size", "2", "--micro-batch-size", "1", "--lr", "1e-3"])
    steps = [r for r in read_metrics(save) if "loss" in r]
    assert all("kd_loss" not in r and r["loss"] == r["ce_loss"] for r in steps)
    assert "kd loss" not in capsys.readouterr().out
    # step 1's loss is the model's mean CE on the first global batch (samples 0, 1), computed
    # independently by the foundation's evaluation
    info = find_checkpoint(students["good"])
    with distributed(LaunchEnv(), ParallelConfig()) as ps:
        data = DataConfig(data_path=tiny_dataset, seq_length=32)
        train = build_datasets(data, eod_id=eod_id_of(info),
                               vocab_size=info.model_config.vocab_size,
                               num_samples={"train": 4})["train"]
        model = build_model(info.model_config, ps, init_weights=False)
        from minitron_megatron.checkpoint import load_checkpoint

        load_checkpoint(info, model=model)
        expected = evaluate_model(model, ps, train, num_samples=2, micro_batch_size=1,
                                  seq_length=32).loss
    assert steps[0]["loss"] == pytest.approx(expected, rel=1e-6)
    assert find_checkpoint(save).iteration == 2
