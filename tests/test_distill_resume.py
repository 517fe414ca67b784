"""Resume: a run stopped after a save, or killed (SIGKILL) in the middle of one, continues with
bit-exactly the same losses as an uninterrupted run (CPU, PP=2 on 2 gloo ranks); a NaN loss stops
the run and leaves the last good checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import psutil
import pytest

from minitron_megatron.checkpoint import find_checkpoint, latest_iteration
from minitron_megatron.config import ParallelConfig
from minitron_megatron.data.loaders import DataConfig
from minitron_megatron.distill import schedule
from minitron_megatron.distill.config import KDConfig, TrainConfig
from minitron_megatron.distill.progress import read_metrics
from minitron_megatron.distill.training import Trainer, TrainingDiverged
from minitron_megatron.errors import CorruptCheckpointError
from minitron_megatron.evaluate import evaluate_checkpoint
from minitron_megatron.runtime.distributed import LaunchEnv, distributed, init_distributed, shutdown
from minitron_megatron.testing.multiprocess import DistributedRunError, run_distributed
from tests import distill_helpers

ITERS = 6
KEYS = ("loss", "kd_loss", "grad_norm", "lr", "val_loss", "val_kd_loss")


def _train(env, assets, save, *, layout=(1, 2), exit_interval=0, kill_at=None, **overrides):
    """One run (a fresh Trainer) in save dir ``save``; returns its history. The caller shuts
    the process group down (``init_distributed`` may be called again in between)."""
    teacher, student, data = assets
    if kill_at is not None:  # SIGKILL rank 0 once the shards of iteration `kill_at` are written
        from megatron.core import dist_checkpointing

        original = dist_checkpointing.save

        def save_then_die(state, directory, *args, **kwargs):
            result = original(state, directory, *args, **kwargs)
            if f"iter_{kill_at:07d}" in str(directory) and env.rank == 0:
                import psutil  # its helper processes outlive a SIGKILL: the test reaps them

                helpers = [p.pid for p in psutil.Process().children(recursive=True)]
                Path(save, "..", "orphans.txt").write_text(" ".join(map(str, helpers)))
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        dist_checkpointing.save = save_then_die
    ps = init_distributed(env, ParallelConfig(tensor_model_parallel_size=layout[0],
                                              pipeline_model_parallel_size=layout[1]))
    train = dict(save=save, load=save, train_iters=ITERS, global_batch_size=4,
                     micro_batch_size=1, lr=3e-3, min_lr=3e-4, lr_warmup_iters=1,
                     eval_interval=3, save_interval=2, exit_interval=exit_interval)
    train.update(overrides)
    trainer = Trainer(train=TrainConfig(**train), kd=KDConfig(intermediate_pairs=((1, 2),)),
                      data=DataConfig(data_path=data, seq_length=32),
                      student=find_checkpoint(student), teacher=find_checkpoint(teacher), ps=ps)
    return [{k: r[k] for k in ("iteration", *KEYS) if k in r} for r in trainer.run().history]


def runs(env, assets, jobs):
    """Several runs in one process group: ``jobs`` are (save dir, options) pairs."""
    try:
        return [_train(env, assets, save, **options) for save, options in jobs]
    finally:
        shutdown()


def by_iteration(history, kind):
    """Training-step (kind="step") or evaluation (kind="eval") records keyed by iteration."""
    return {r["iteration"]: r for r in history if ("loss" in r) == (kind == "step")}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, llama_ckpt_untied, tiny_dataset):
    student = distill_helpers.make_student(tmp_path_factory.mktemp("student"), llama_ckpt_untied)
    return str(llama_ckpt_untied), str(student), tiny_dataset


@pytest.mark.multiprocess
def test_stopped_or_killed_run_resumes_bit_exactly(assets, tmp_path):
    root = str(tmp_path)
    full, stopped = run_distributed(runs, 2, assets, [(f"{root}/full", {}),
                                                      (f"{root}/stop", {"exit_interval": 4})])[0]
    assert max(r["iteration"] for r in stopped) == 4 and latest_iteration(f"{root}/stop") == 4

    with pytest.raises(DistributedRunError):  # rank 0 died; rank 1 lost its peer
        run_distributed(runs, 2, assets, [(f"{root}/kill", {"kill_at": 4})])
    for pid in (tmp_path / "orphans.txt").read_text().split():
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(int(pid)).kill()
    kill = tmp_path / "kill"
    assert latest_iteration(kill) == 2  # the interrupted save never became the latest
    assert (kill / ".iter_0000004.tmp").exists() and not (kill / "iter_0000004").exists()

    resumed_stop, resumed_kill = run_distributed(runs, 2, assets, [(f"{root}/stop", {}),
                                                                   (f"{root}/kill", {})])[0]
    for resumed, start in ((resumed_stop, 4), (resumed_kill, 2)):
        for kind in ("step", "eval"):
            expected = {i: r for i, r in by_iteration(full, kind).items() if i > start}
            assert by_iteration(resumed, kind) == expected  # bit-exact: floats compared with ==
    assert latest_iteration(kill) == ITERS and not (kill / ".iter_0000004.tmp").exists()
    # metrics.jsonl: one record per step, what the killed run logged past its checkpoint dropped
    steps = [r["iteration"] for r in read_metrics(kill) if "loss" in r]
    assert steps == list(range(1, ITERS + 1))

    # the run directory is a plain student checkpoint: the foundation's evaluate reads it
    with distributed(LaunchEnv(), ParallelConfig()) as ps:
        result = evaluate_checkpoint(find_checkpoint(kill), ps,
                                     DataConfig(data_path=assets[2], seq_length=32),
                                     num_samples=4, micro_batch_size=1)
    assert result.loss == pytest.approx(by_iteration(full, "eval")[ITERS]["val_loss"], abs=1e-5)
    config = json.loads((kill / f"iter_{ITERS:07d}" / "run_config.json").read_text())
    assert config["layout"] == {"tp": 1, "pp": 2, "dp": 1}


def test_nan_loss_stops_and_keeps_last_good_checkpoint(assets, tmp_path, monkeypatch):
    calls = {"n": 0}
    objective = schedule.objective

    def nan_on_third_step(*args):
        calls["n"] += 1
        loss, tokens, report = objective(*args)
        if calls["n"] == 3:
            loss = loss * float("nan")
            report = {"report": report["report"] * float("nan")}
        return loss, tokens, report

    monkeypatch.setattr(schedule, "objective", nan_on_third_step)
    with pytest.raises(TrainingDiverged, match="iteration 3: the loss is nan.*last good "
                                               "checkpoint is iteration 2"):
        runs(LaunchEnv(), assets, [(str(tmp_path / "run"),
                                    {"layout": (1, 1), "global_batch_size": 1,
                                     "eval_interval": 0})])
    assert latest_iteration(tmp_path / "run") == 2
    assert sorted(p.name for p in (tmp_path / "run").glob("iter_*")) == ["iter_0000002"]
    # a resume from a damaged training checkpoint is refused before it reads any state
    monkeypatch.undo()
    iteration = tmp_path / "run" / "iter_0000002"
    # common.pt up to megatron-core 0.16; from 0.17 the common state is inside the shards
    common = iteration / "common.pt"
    if not common.exists():
        common = sorted(iteration.glob("__*.distcp"))[-1]
    common.write_bytes(common.read_bytes()[:-8])
    with pytest.raises(CorruptCheckpointError, match=f"{common} is corrupt or truncated"):
        runs(LaunchEnv(), assets, [(str(tmp_path / "run"), {"layout": (1, 1),
                                                            "global_batch_size": 1})])
