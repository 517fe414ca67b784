"""``minitron importance`` and ``minitron prune`` as a user runs them: bad targets fail with one
actionable line before any work (OUT untouched), and a TP=2 run under torchrun matches TP=1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minitron_megatron import cli
from minitron_megatron.checkpoint import find_checkpoint
from minitron_megatron.importance import Scores
from minitron_megatron.importance.stats import default_stats_dir, has_stats
from minitron_megatron.pruning.apply import PLAN_FILE, RECONSTRUCT_FILE

ROOT = Path(__file__).resolve().parents[1]


def _importance_args(ckpt, data, out, *extra):
    return ["importance", "--load", str(ckpt), "--data-path", data, "--calib-samples", "8",
            "--seq-length", "32", "--micro-batch-size", "4", "--save-scores", str(out),
            "--depth-metrics", "bi,block:2", *extra]


@pytest.fixture(scope="module")
def scores_files(tmp_path_factory, llama_ckpt_untied, gpt_ckpt, tiny_dataset):
    out = tmp_path_factory.mktemp("scores")
    for name, ckpt in (("llama", llama_ckpt_untied), ("gpt", gpt_ckpt)):
        cli.main(_importance_args(ckpt, tiny_dataset, out / f"{name}.safetensors"))
    return {name: out / f"{name}.safetensors" for name in ("llama", "gpt")}


BAD_TARGETS = [
    (["--target-ffn-hidden-size", "47", "--tensor-model-parallel-size", "2"],
     "cannot be built at this layout"),
    (["--target-num-attention-heads", "3"], "not a multiple of the query groups"),
    (["--target-ffn-hidden-size", "200"], "larger than the model's ffn_hidden_size=96"),
    (["--target-num-layers", "9"], "larger than the model's num_layers=4"),
    (["--target-hidden-size", "0"], "must be a positive integer"),
    (["--drop-layers", "1,4"], "outside 0..3"),
    (["--target-num-layers", "2", "--depth-method", "loss"], "no 'loss' depth scores"),
    (["--target-num-layers", "3", "--depth-method", "block"], "no 'block:1' depth scores"),
    (["--target-ffn-hidden-size", "48", "--reconstruct", "/nonexistent/stats"],
     "holds no reconstruction statistics"),
    (["--target-ffn-hidden-size", "48", "--reconstruct", "x", "--reconstruct-layers", "fc3"],
     "must be a non-empty subset of proj, fc2, qkv, fc1"),
    (["--target-ffn-hidden-size", "48", "--reconstruct", "x", "--reconstruct-ridge", "-1"],
     "must be ≥ 0"),
]


@pytest.mark.parametrize("flags,message", BAD_TARGETS, ids=[m for _, m in BAD_TARGETS])
def test_bad_targets_fail_before_any_work(flags, message, scores_files, llama_ckpt_untied,
                                          tmp_path, capsys, monkeypatch):
    _expect_error(["--scores", str(scores_files["llama"]), *flags], message, llama_ckpt_untied,
                  tmp_path, capsys, monkeypatch)


def test_position0_fold_is_the_default_and_can_be_turned_off(scores_files, llama_ckpt_untied):
    from minitron_megatron.cli.prune import run

    seen = []
    common = ["prune", "--load", str(llama_ckpt_untied), "--scores", str(scores_files["llama"]),
              "--save", "unused", "--target-num-attention-heads", "2"]
    for extra in ([], ["--no-position0-fold"]):
        args = cli.build_parser().parse_args(common + extra)
        assert args.func is run
        seen.append(args.position0_fold)
    assert seen == [True, False]


def test_importance_saves_stats_next_to_the_scores_and_prune_refits_from_them(
        scores_files, llama_ckpt_untied, tiny_dataset, tmp_path, capsys):
    """The robust pipeline is the default: ``importance`` writes SCORES.stats, ``prune`` finds
    them and refits all four readers; ``--no-reconstruct`` (and ``--no-save-stats``) give the
    sliced model."""
    stats = default_stats_dir(scores_files["llama"])
    assert stats.name == "llama.stats" and has_stats(stats)
    common = ["prune", "--load", str(llama_ckpt_untied), "--scores", str(scores_files["llama"]),
              "--target-ffn-hidden-size", "48", "--target-hidden-size", "48",
              "--target-num-attention-heads", "2"]
    runs = {}
    for name, extra in (("default", []), ("sliced", ["--no-reconstruct"]),
                        ("paper", ["--no-reconstruct", "--no-position0-fold"])):
        capsys.readouterr()
        cli.main([*common, "--save", str(tmp_path / name), *extra])
        runs[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert runs["default"]["reconstruct"] == str(stats)
    assert runs["sliced"]["reconstruct"] is None and runs["paper"]["reconstruct"] is None
    ckpt = {name: find_checkpoint(tmp_path / name) for name in runs}
    refit = json.loads((ckpt["default"].path / RECONSTRUCT_FILE).read_text())
    assert refit["kinds"] == ["proj", "fc2", "qkv", "fc1"] and refit["stats"] == str(stats)
    assert not (ckpt["sliced"].path / RECONSTRUCT_FILE).exists()
    plans = {n: json.loads((c.path / PLAN_FILE).read_text()) for n, c in ckpt.items()}
    assert [plans[n]["position0_fold"] for n in runs] == [True, True, False]

    bare = tmp_path / "bare.safetensors"
    cli.main(_importance_args(llama_ckpt_untied, tiny_dataset, bare, "--no-save-stats"))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stats"] is None
    assert not default_stats_dir(bare).exists()
    cli.main([*common[:3], "--scores", str(bare),
              *common[5:], "--save", str(tmp_path / "bare")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reconstruct"] is None
    assert not (find_checkpoint(tmp_path / "bare").path / RECONSTRUCT_FILE).exists()


def test_scores_of_another_model_are_refused(scores_files, llama_ckpt_untied, tmp_path, capsys,
                                             monkeypatch):
    _expect_error(["--scores", str(scores_files["gpt"]), "--target-ffn-hidden-size", "48"],
                  "computed on another model", llama_ckpt_untied, tmp_path, capsys, monkeypatch)


def _expect_error(flags, message, ckpt, tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("distributed work started before the targets were checked")

    monkeypatch.setattr("minitron_megatron.api.run_distributed", no_work)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    for save in (out, tmp_path / "fresh"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["prune", "--load", str(ckpt), "--save", str(save), *flags])
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("minitron prune: error:"), lines
        assert message in lines[0], lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "previous run"
    assert not (tmp_path / "fresh").exists()


def test_save_onto_another_checkpoint_needs_overwrite(scores_files, llama_ckpt_untied, gpt_ckpt,
                                                      tmp_path, capsys, monkeypatch):
    """An existing run directory is neither replaced silently nor mixed with the pruned model:
    refused before any work; with --overwrite replaced whole (its old iterations are gone)."""
    other = tmp_path / "other"
    shutil.copytree(gpt_ckpt, other)
    shutil.copytree(other / "iter_0000000", other / "iter_0000100")
    (other / "metrics.jsonl").write_text("{}\n")
    before = sorted(p.name for p in other.iterdir())
    targets = ["--scores", str(scores_files["llama"]), "--target-ffn-hidden-size", "48"]
    argv = ["prune", "--load", str(llama_ckpt_untied), "--save", str(other), *targets]
    monkeypatch.setattr("minitron_megatron.api.run_distributed", _no_work)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "already holds files" in err and "pass --overwrite" in err
    assert sorted(p.name for p in other.iterdir()) == before
    monkeypatch.undo()
    cli.main([*argv, "--overwrite"])
    capsys.readouterr()
    assert sorted(p.name for p in other.iterdir()) == ["iter_0000000",
                                                       "latest_checkpointed_iteration.txt"]
    assert find_checkpoint(other).model_config.ffn_hidden_size == 48
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]  # no staging left


def _no_work(*args, **kwargs):
    raise AssertionError("distributed work started before --save was checked")


def _torchrun(args, nproc=2):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", "-m", "minitron_megatron", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.multiprocess
def test_cli_at_tp2_under_torchrun_matches_tp1(scores_files, llama_ckpt_untied, tiny_dataset,
                                               tmp_path, capsys):
    """importance and prune at TP=2 (torchrun, 2 ranks) = the single-process runs."""
    at_tp2 = tmp_path / "tp2.safetensors"
    _torchrun(_importance_args(llama_ckpt_untied, tiny_dataset, at_tp2,
                               "--tensor-model-parallel-size", "2",
                               "--save-stats", str(tmp_path / "stats")))
    single, double = Scores.load(scores_files["llama"]), Scores.load(at_tp2)
    for name, tensor in single.tensors().items():
        assert torch.allclose(double.tensors()[name], tensor, rtol=1e-5, atol=1e-7), name

    targets = ["--target-ffn-hidden-size", "48", "--target-hidden-size", "48",
               "--target-num-attention-heads", "2", "--target-num-layers", "2",
               "--depth-method", "block", "--head-residual",
               "--reconstruct", str(tmp_path / "stats"), "--reconstruct-ridge", "0.01"]
    result = _torchrun(["prune", "--load", str(llama_ckpt_untied), "--scores", str(at_tp2),
                        "--save", str(tmp_path / "p2"), "--tensor-model-parallel-size", "2",
                        *targets])
    assert result["parameters"] < result["source_parameters"]
    cli.main(["prune", "--load", str(llama_ckpt_untied), "--scores", str(scores_files["llama"]),
              "--save", str(tmp_path / "p1"), *targets])
    capsys.readouterr()
    a, b = find_checkpoint(tmp_path / "p2"), find_checkpoint(tmp_path / "p1")
    assert (a.path / PLAN_FILE).read_text() == (b.path / PLAN_FILE).read_text()
    assert json.loads((a.path / PLAN_FILE).read_text())["position0_fold"] is True
    assert json.loads((a.path / RECONSTRUCT_FILE).read_text())["ridge"] == 0.01
    assert a.model_config.num_layers == 2 and a.model_config.ffn_hidden_size == 48
    cli.main(["evaluate", "--load", str(a.root), "--data-path", tiny_dataset, "--seq-length",
              "32", "--eval-samples", "4", "--window-starts"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < result["loss"] < 20
    assert sorted(result["window_starts"]) == ["as_sampled", "comma_first", "doc_start",
                                               "eos_first", "period_first", "spread"]
