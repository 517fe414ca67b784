"""``minitron search`` end to end on a tiny teacher: three candidates (narrower, shallower, and
fewer heads / smaller MLP) ranked by their loss after a short distillation; the recorded losses
are those of the kept checkpoints (evaluated independently); 2 ranks (TP=2, torchrun) give the
1-rank losses; a search killed in the middle of a candidate's distillation resumes without
redoing finished candidates."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from minitron_megatron import cli
from minitron_megatron.checkpoint import find_checkpoint, latest_iteration
from minitron_megatron.config import ParallelConfig
from minitron_megatron.data.loaders import DataConfig
from minitron_megatron.evaluate import evaluate_checkpoint
from minitron_megatron.model.build import build_model, count_parameters
from minitron_megatron.runtime.distributed import LaunchEnv, distributed
from minitron_megatron.search import runner
from minitron_megatron.testing.multiprocess import DistributedRunError, run_distributed

ROOT = Path(__file__).resolve().parents[1]
SPACE = "num_layers: [4, 3]\nhidden_size: [64, 48]\nffn_hidden_size: [96, 64, 48]\n" \
        "num_attention_heads: [4, 2]\n"
CANDIDATES = {"L4-H48-F96-A4-G2", "L3-H64-F96-A2-G2", "L4-H64-F64-A2-G2"}  # ±3 % of 129,456
ITERS, EVAL_SAMPLES = 4, 8


def search_args(assets, save, *extra):
    return ["search", "--load", assets["teacher"], "--scores", assets["scores"],
            "--search-space", assets["space"], "--target-params", "129456",
            "--params-tolerance", "0.03", "--candidate-train-iters", str(ITERS),
            "--candidate-eval-iters", "2", "--save", str(save), "--data-path", assets["data"],
            "--seq-length", "32", "--global-batch-size", "4", "--micro-batch-size", "2",
            "--lr", "3e-3", "--log-interval", "2", *extra]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, llama_ckpt_untied, tiny_dataset):
    root = tmp_path_factory.mktemp("search_assets")
    (root / "space.yaml").write_text(SPACE)
    cli.main(["importance", "--load", str(llama_ckpt_untied), "--data-path", tiny_dataset,
              "--calib-samples", "8", "--seq-length", "32", "--micro-batch-size", "4",
              "--save-scores", str(root / "scores.safetensors"), "--depth-metrics", "bi"])
    return {"teacher": str(llama_ckpt_untied), "scores": str(root / "scores.safetensors"),
            "space": str(root / "space.yaml"), "data": tiny_dataset}


@pytest.fixture(scope="module")
def single(assets, tmp_path_factory):
    """The search on one process, every checkpoint kept: (directory, results, console)."""
    save = tmp_path_factory.mktemp("single") / "search"
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        cli.main(search_args(assets, save, "--keep-all"))
    return save, json.loads((save / "search_results.json").read_text()), console.getvalue()


def _losses(results):
    return {c["name"]: (c["zero_shot_loss"], c["post_kd_loss"]) for c in results["candidates"]}


def _evaluate(path, data):
    with distributed(LaunchEnv(), ParallelConfig()) as ps:
        return evaluate_checkpoint(find_checkpoint(path), ps,
                                   DataConfig(data_path=data, seq_length=32),
                                   num_samples=EVAL_SAMPLES, micro_batch_size=2).loss


def test_search_ranks_by_post_kd_loss_of_the_checkpoints_it_keeps(single, assets):
    save, results, console = single
    candidates = results["candidates"]
    assert {c["name"] for c in candidates} == CANDIDATES and results["complete"]
    by_rank = sorted(candidates, key=lambda c: c["rank"])
    assert [c["rank"] for c in by_rank] == [1, 2, 3]
    post = [c["post_kd_loss"] for c in by_rank]
    assert post == sorted(post) and results["best"]["name"] == by_rank[0]["name"]
    zero = sorted(candidates, key=lambda c: c["zero_shot_rank"])
    assert [c["zero_shot_loss"] for c in zero] == sorted(c["zero_shot_loss"] for c in zero)
    agrees = [c["name"] for c in zero] == [c["name"] for c in by_rank]
    assert results["ranking_agrees_with_zero_shot"] == agrees

    # the recorded losses are those of the checkpoints, measured independently
    for c in candidates:
        directory = save / "candidates" / c["name"]
        assert _evaluate(directory / "pruned", assets["data"]) == pytest.approx(
            c["zero_shot_loss"], rel=1e-6)
        assert _evaluate(save / c["checkpoint"], assets["data"]) == pytest.approx(
            c["post_kd_loss"], rel=1e-6)
        steps = [json.loads(line) for line in (directory / "distilled" / "metrics.jsonl")
                 .read_text().splitlines()]
        assert [s["iteration"] for s in steps] == list(range(1, ITERS + 1))
        assert find_checkpoint(save / c["checkpoint"]).model_config.hidden_size == \
            c["shape"]["hidden_size"]

    table = (save / "search_results.md").read_text()
    for c in candidates:
        assert f"| {c['rank']} | {c['name']} |" in table
    assert ("is the same as" if agrees else "differs from") in table
    # progress: which candidate, its step, an ETA for the whole search
    assert "search: zero-shot 3/3 " in console
    assert f"search: candidate 2/3 {zero[1]['name']} | step 2/{ITERS} | " \
           f"search ETA 0:" in console
    assert f"search: done: best {by_rank[0]['name']}" in console


@pytest.mark.multiprocess
def test_search_on_two_ranks_matches_one_rank(single, assets, tmp_path):
    """TP=2 under torchrun: the same losses and ranking; only the best's checkpoint stays."""
    save = tmp_path / "tp2"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", "-m", "minitron_megatron",
                           *search_args(assets, save, "--tensor-model-parallel-size", "2")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((save / "search_results.json").read_text())
    expected = _losses(single[1])
    for name, (zero, post) in _losses(results).items():
        assert zero == pytest.approx(expected[name][0], abs=1e-5)
        assert post == pytest.approx(expected[name][1], abs=1e-5)
    ranks = {c["name"]: c["rank"] for c in results["candidates"]}
    assert ranks == {c["name"]: c["rank"] for c in single[1]["candidates"]}

    best = results["best"]
    for c in results["candidates"]:
        directory = save / "candidates" / c["name"]
        assert not (directory / "pruned").exists() and (directory / "prune_plan.json").is_file()
        assert (directory / "distilled" / "metrics.jsonl").is_file()
        kept = latest_iteration(directory / "distilled") is not None
        assert kept == (c["name"] == best["name"]) == (c["checkpoint"] is not None)
    # the best checkpoint, saved at TP=2, loads and evaluates on one process
    assert _evaluate(save / best["checkpoint"], assets["data"]) == pytest.approx(
        best["post_kd_loss"], abs=1e-5)


def _killed_search(env, args, kill_path):
    """The search on one spawned rank, SIGKILLed while the second distilled candidate's
    iteration-4 checkpoint is being written (its iteration 2 is saved)."""
    from megatron.core import dist_checkpointing

    original, seen = dist_checkpointing.save, []

    def save_then_die(state, directory, *a, **kw):
        result = original(state, directory, *a, **kw)
        if "distilled" in str(directory) and f"iter_{ITERS:07d}" in str(directory):
            seen.append(directory)
            if len(seen) == 2:
                helpers = [p.pid for p in psutil.Process().children(recursive=True)]
                Path(kill_path).write_text(" ".join(map(str, helpers)))
                os.kill(os.getpid(), signal.SIGKILL)
        return result

    dist_checkpointing.save = save_then_die
    cli.main(args)


@pytest.mark.multiprocess
def test_killed_search_resumes_without_redoing_finished_candidates(single, assets, tmp_path,
                                                                   monkeypatch):
    save = tmp_path / "search"
    args = search_args(assets, save, "--save-interval", "2")
    with pytest.raises(DistributedRunError):
        run_distributed(_killed_search, 1, args, str(tmp_path / "orphans.txt"))
    for pid in (tmp_path / "orphans.txt").read_text().split():
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(int(pid)).kill()
    before = json.loads((save / "search_results.json").read_text())
    finished = [c for c in before["candidates"] if c["post_kd_loss"] is not None]
    assert len(finished) == 1 and all(c["zero_shot_loss"] for c in before["candidates"])
    second = sorted(before["candidates"], key=lambda c: c["zero_shot_loss"])[1]["name"]
    assert latest_iteration(save / "candidates" / second / "distilled") == 2

    starts, pruned = [], []
    trainer = runner.Trainer

    class CountingTrainer(trainer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            starts.append((kwargs["student"].model_config, self.state.iteration))

    monkeypatch.setattr(runner, "Trainer", CountingTrainer)
    monkeypatch.setattr(runner, "apply_plan", lambda *a, **k: pruned.append(a))
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        cli.main(args)
    assert not pruned  # every zero-shot loss was recorded
    assert [iteration for _, iteration in starts] == [2, 0]  # second resumes, third fresh
    assert f"candidate 1/3 {finished[0]['name']}: done before" in console.getvalue()
    after = json.loads((save / "search_results.json").read_text())
    redone = next(c for c in after["candidates"] if c["name"] == finished[0]["name"])
    assert {k: redone[k] for k in finished[0] if "rank" not in k and k != "checkpoint"} == \
        {k: finished[0][k] for k in finished[0] if "rank" not in k and k != "checkpoint"}
    expected = _losses(single[1])
    for name, (zero, post) in _losses(after).items():
        assert zero == pytest.approx(expected[name][0], rel=1e-6)
        assert post == pytest.approx(expected[name][1], rel=1e-6)
    assert after["best"]["name"] == single[1]["best"]["name"] and after["complete"]


def test_resume_with_another_top_k_keeps_every_recorded_loss(single, assets, tmp_path):
    """--top-k may change on resume (a raised one distills the next candidates): nothing
    recorded is redone; without --keep-all only the best's checkpoint stays."""
    save = tmp_path / "search"
    shutil.copytree(single[0], save)
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        cli.main(search_args(assets, save, "--top-k", "1"))
    after = json.loads((save / "search_results.json").read_text())
    assert after["settings"]["search"]["top_k"] == 1 and after["complete"]
    assert _losses(after) == _losses(single[1])
    assert [c["rank"] for c in after["candidates"]] == [c["rank"] for c in single[1]["candidates"]]
    assert console.getvalue().count("done before") == 1 and "pruning and" not in console.getvalue()
    kept = [c["name"] for c in after["candidates"]
            if latest_iteration(save / "candidates" / c["name"] / "distilled") is not None]
    assert kept == [after["best"]["name"]]


def test_search_from_a_teacher_cache_ranks_as_the_live_top_k_search(assets, tmp_path, capsys):
    """Every candidate distilled from the cached top-k ends at the loss the live teacher with
    --kd-top-k gives, whether the cache was built by `minitron teacher-cache` or by the search
    itself (--cache-teacher: built once with the teacher it loaded for the zero-shot losses,
    its shards dealt to 2 data-parallel ranks under torchrun, removed when the search is done);
    a cache of another teacher is refused in one line."""
    top_k = ["--kd-top-k", "8"]
    cli.main(search_args(assets, tmp_path / "live", *top_k))
    cache = tmp_path / "cache"
    cli.main(["teacher-cache", "--teacher", assets["teacher"], "--save", str(cache),
              "--data-path", assets["data"], "--seq-length", "32", "--train-iters", str(ITERS),
              "--global-batch-size", "4", "--micro-batch-size", "2", "--cache-top-k", "8",
              "--cache-dtype", "fp32"])
    cli.main(search_args(assets, tmp_path / "cached", "--teacher-cache", str(cache)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", "-m", "minitron_megatron",
                           *search_args(assets, tmp_path / "built", "--cache-teacher",
                                        "--cache-top-k", "8", "--cache-dtype", "fp32",
                                        "--cache-samples-per-shard", "4")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout
    live, cached, built = (json.loads((tmp_path / d / "search_results.json").read_text())
                           for d in ("live", "cached", "built"))
    assert cached["settings"]["kd"]["top_k"] == built["settings"]["kd"]["top_k"] == 8
    for name, (zero, post) in _losses(live).items():
        for other in (cached, built):
            assert _losses(other)[name][0] == zero
            assert _losses(other)[name][1] == pytest.approx(post, rel=1e-5), name
    # rank 0 computed every other of the 4 shards (data-parallel rank 1 the rest)
    assert re.findall(r"samples (\d+-\d+) written", proc.stderr) == ["0-3", "8-11"]
    assert re.search(rf"teacher cache: top-8 fp32 logits of {ITERS * 4} training samples "
                     rf"written to .*teacher_cache", console), console
    assert not (tmp_path / "built" / "teacher_cache").exists()
    manifest = json.loads((cache / "cache.json").read_text())
    manifest["teacher_config"]["rotary_base"] = 500.0
    (cache / "cache.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(search_args(assets, tmp_path / "other", "--teacher-cache", str(cache)))
    assert "not by a model shaped like" in capsys.readouterr().err


def test_sigterm_mid_candidate_saves_its_distillation_and_resume_finishes_the_search(
        single, assets, tmp_path, monkeypatch, capsys):
    """A real SIGTERM during the second candidate's distillation: it finishes the step, saves,
    and the search exits 75 with one line; the same command then finishes with the losses of
    an uninterrupted search."""
    save = tmp_path / "search"
    args = search_args(assets, save)
    steps, step = [], runner.SearchProgress.step

    def step_then_signal(view, iteration, metrics):
        step(view, iteration, metrics)
        steps.append(iteration)
        if len(steps) == ITERS + 2:  # the second candidate's second step
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(runner.SearchProgress, "step", step_then_signal)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 75
    last = capsys.readouterr().err.strip().splitlines()[-1]
    stopped = re.fullmatch(r"minitron search: SIGTERM received: candidate (\S+)'s distillation "
                           r"saved at iteration 2 of 4 in (\S+); rerun the same command to "
                           r"continue the search from there", last)
    assert stopped, last
    assert latest_iteration(stopped[2]) == 2
    monkeypatch.undo()
    cli.main(args)
    after = json.loads((save / "search_results.json").read_text())
    assert after["complete"] and _losses(after) == _losses(single[1])


def _scores_variant(assets, tmp_path, **changes):
    """The assets' scores file with fields replaced (another model's, no depth metrics)."""
    import dataclasses

    from minitron_megatron.importance import Scores

    scores = Scores.load(assets["scores"])
    if "model_config" in changes:
        changes["model_config"] = scores.model_config.replace(**changes["model_config"])
    path = tmp_path / "variant.safetensors"
    dataclasses.replace(scores, **changes).save(path)
    return str(path)


BAD = {
    "budget": (["--target-params", "1000"],
               r"no candidate within 3% of 1.00k parameters; nearest feasible sizes: "
               r"{smallest} \(L3-H48-F48-A2-G2\)"),
    "space-vs-tp": (["--tensor-model-parallel-size", "2", "--search-space", "{tp_space}"],
                    r"no num_attention_heads choice \[3, 1\] is divisible by "
                    r"tensor-model-parallel-size 2"),
    "other-model": (["--scores", "{other_model}"], "scores were computed on another model"),
    "no-depth-metric": (["--scores", "{no_depth}"],
                        r"candidate L3-H64-F96-A2-G2 drops 1 of 4 layers by --depth-method bi, "
                        r"but the scores file has no 'bi' depth scores .*restrict the search "
                        r"space's num_layers to \[4\]"),
    "top-k": (["--top-k", "0"], "--top-k must be a positive number"),
    "kd-pairs": (["--kd-intermediate", "3:3"], "pair 3:3 is out of range: the student has 3"),
    "batch": (["--global-batch-size", "3"], "not divisible by --micro-batch-size 2"),
    "other-search": (["--candidate-train-iters", "2"],
                     r"holds a search with other settings \(recorded → now: "
                     r"train.train_iters 4 → 2\)"),
    "data-too-short": (["--candidate-eval-iters", "100000"],  # training cycles epochs
                       "valid split .* fewer than the 400000 requested.*"
                       "--candidate-eval-iters × --global-batch-size = 400000 held-out"),
    "two-caches": (["--cache-teacher", "--teacher-cache", "{tp_space}"],
                   "--cache-teacher builds the teacher cache this search reads; pass it or "
                   "--teacher-cache DIR, not both"),
    "cache-reverse": (["--cache-teacher", "--kd-reverse"],
                      "--kd-reverse cannot use a teacher cache"),
    "cache-k": (["--cache-teacher", "--cache-top-k", "4", "--kd-top-k", "8"],
                r"--kd-top-k 8 exceeds the teacher cache's k = 4"),
    "seq-length": (["--seq-length", "100000"],
                   "--seq-length 100000 exceeds the model's max_position_embeddings=256"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_with_one_actionable_error_before_any_work(case, assets, single,
                                                                   tmp_path, capsys,
                                                                   monkeypatch):
    flags, message = BAD[case]
    (tmp_path / "tp.yaml").write_text("num_attention_heads: [3, 1]\nnum_query_groups: [1]\n")
    values = {"tp_space": str(tmp_path / "tp.yaml"), "smallest": ""}
    if case == "budget":  # the smallest shape of the space, counted on the built model
        teacher = find_checkpoint(assets["teacher"]).model_config
        smallest = teacher.replace(num_layers=3, hidden_size=48, ffn_hidden_size=48,
                                   num_attention_heads=2, num_query_groups=2)
        with distributed(LaunchEnv(), ParallelConfig()) as ps:
            count = count_parameters(build_model(smallest, ps), ps)
        values["smallest"] = re.escape(f"{count / 1e3:.2f}k")
    if case == "other-model":
        values["other_model"] = _scores_variant(assets, tmp_path,
                                                model_config={"rotary_base": 500.0})
    if case == "no-depth-metric":
        values["no_depth"] = _scores_variant(assets, tmp_path, depth={})
    flags = [f.format(**values) for f in flags]
    message = message.replace("{smallest}", values["smallest"])
    if case != "data-too-short":  # the data is checked first thing in the distributed job
        def no_work(*args, **kwargs):
            raise AssertionError("distributed work started before the inputs were checked")

        monkeypatch.setattr("minitron_megatron.api.run_distributed", no_work)
    save = single[0] if case == "other-search" else tmp_path / "search"
    before = (single[0] / "search_results.json").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*search_args(assets, save), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minitron search: error: "), err
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "search").exists()
    assert (single[0] / "search_results.json").read_text() == before


def test_slurm_script_passes_flags_the_search_accepts():
    """launch/slurm/search.sbatch (dry run): its command line parses; --top-k only when set."""
    import shlex

    env = {"PATH": os.environ["PATH"], "TEACHER": "t", "SCORES": "s", "DATA": "d",
           "TARGET_PARAMS": "4B", "OUT": "o", "SLURM_PROCID": "0", "SLURM_NTASKS": "8",
           "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n1", "DRY_RUN": "1", "REPO": str(ROOT)}
    for extra, top_k in (({}, None), ({"TOP_K": "3"}, 3)):
        proc = subprocess.run(["bash", str(ROOT / "launch/slurm/search.sbatch")],
                              capture_output=True, text=True, env={**env, **extra})
        assert proc.returncode == 0, proc.stderr
        line = proc.stdout.strip().splitlines()[-1]
        args = cli.build_parser().parse_args(shlex.split(line.split("-m minitron_megatron ")[1]))
        assert args.func.__module__ == "minitron_megatron.cli.search"
        assert args.top_k == top_k and args.target_params == 4_000_000_000
        assert args.candidate_train_iters == 400 and args.save_interval == 100
