"""Preemption: a real SIGTERM sent to ONE rank of a 2-rank distillation at a random step stops
every rank after the same step with a saved checkpoint; the resumed run (which crosses an epoch
boundary of a small dataset) ends bit-identical to an uninterrupted one — losses, evaluations
and weights. From the command line: SIGINT (Ctrl-C) saves, says so in one line and exits 75."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from minitron_megatron.checkpoint import find_checkpoint, latest_iteration
from minitron_megatron.config import ParallelConfig
from minitron_megatron.data.loaders import DataConfig
from minitron_megatron.distill.config import KDConfig, TrainConfig
from minitron_megatron.distill.progress import METRICS_FILE
from minitron_megatron.distill.training import Trainer
from minitron_megatron.runtime.distributed import init_distributed, shutdown
from minitron_megatron.runtime.signals import EXIT_INTERRUPTED
from minitron_megatron.testing.multiprocess import run_distributed
from tests import distill_helpers

ITERS, BATCH, SPLIT = 12, 4, "75,25,0"  # small_dataset: 21 training samples, 2.29 epochs
TIMING_KEYS = ("tokens_per_s", "step_time")


@pytest.fixture(scope="module")
def assets(tmp_path_factory, llama_ckpt_untied, small_dataset):
    student = distill_helpers.make_student(tmp_path_factory.mktemp("student"), llama_ckpt_untied)
    return str(llama_ckpt_untied), str(student), small_dataset


def _train(env, assets, save):
    teacher, student, data = assets
    ps = init_distributed(env, ParallelConfig())  # data-parallel over both ranks
    trainer = Trainer(
        train=TrainConfig(save=save, load=save, train_iters=ITERS, global_batch_size=BATCH,
                          micro_batch_size=1, lr=3e-3, min_lr=3e-4, lr_warmup_iters=1,
                          eval_interval=3),
        kd=KDConfig(), data=DataConfig(data_path=data, seq_length=32, split=SPLIT),
        student=find_checkpoint(student), teacher=find_checkpoint(teacher), ps=ps)
    result = trainer.run()
    return {"history": [{k: v for k, v in r.items() if k not in TIMING_KEYS}
                        for r in result.history],
            "interrupted": result.interrupted, "iteration": result.state.iteration,
            "weights": torch.cat([p.detach().flatten() for p in trainer.student.parameters()])}


def runs(env, assets, saves, pid_dir=None):
    """Runs one after the other on this rank (each resumes its save dir if it holds one)."""
    if pid_dir is not None:
        Path(pid_dir, f"rank{env.rank}").write_text(str(os.getpid()))
    try:
        return [_train(env, assets, save) for save in saves]
    finally:
        shutdown()


def _wait_for_step(metrics: Path, step: int, job, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.done():
            job.result()  # raises what went wrong
            raise AssertionError(f"the run ended before step {step}")
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        done = [json.loads(line)["iteration"] for line in lines[:-1] if '"loss"' in line]
        if done and max(done) >= step:
            return
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached in {timeout:.0f}s")


@pytest.mark.multiprocess
def test_sigterm_to_one_rank_stops_all_at_one_step_and_resumes_bit_exactly(assets, tmp_path):
    save, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    step = random.randint(1, 4)  # the first epoch ends within step 6
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(run_distributed, runs, 2, assets, [str(save)], pid_dir=str(pids))
        _wait_for_step(save / METRICS_FILE, step, job)
        os.kill(int((pids / "rank1").read_text()), signal.SIGTERM)  # rank 0 gets nothing
        first = [rank[0] for rank in job.result()]
    stopped = first[0]["iteration"]
    where = f"SIGTERM after step {step}, stopped at {stopped}"
    assert [(r["interrupted"], r["iteration"]) for r in first] == [("SIGTERM", stopped)] * 2, where
    assert step <= stopped and latest_iteration(save) == stopped, where
    assert stopped * BATCH < 2 * 21, where  # what is left crosses an epoch boundary

    per_rank = run_distributed(runs, 2, assets, [str(save), str(tmp_path / "full")])
    for resumed, full in per_rank:
        assert full["interrupted"] is None and resumed["interrupted"] is None
        assert resumed["iteration"] == full["iteration"] == ITERS
        # bit-exact: floats compared with ==, every step and evaluation after the stop
        assert resumed["history"] == [r for r in full["history"] if r["iteration"] > stopped]
        assert first[0]["history"] == [r for r in full["history"] if r["iteration"] <= stopped]
        assert torch.equal(resumed["weights"], full["weights"])


def test_ctrl_c_on_the_command_line_saves_and_exits_75(assets, tmp_path):
    teacher, student, data = assets
    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "minitron_megatron", "finetune", "--model", student,
           "--data-path", data, "--split", SPLIT, "--seq-length", "32", "--save", str(save),
           "--train-iters", "100", "--global-batch-size", str(BATCH), "--lr", "1e-3"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out_file, err_file = tmp_path / "stdout", tmp_path / "stderr"
    with out_file.open("w") as out, err_file.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        try:
            step = random.randint(1, 5)
            _wait_for_step(save / METRICS_FILE, step, _Alive(proc, err_file))
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            proc.kill()
    out, err = out_file.read_text(), err_file.read_text()
    stopped = latest_iteration(save)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert step <= stopped < 100
    assert json.loads(out.splitlines()[-1]) == {"save": str(save), "iteration": stopped,
                                               "interrupted": "SIGINT"}
    last = err.strip().splitlines()[-1]
    assert last == (f"minitron finetune: SIGINT received: saved iteration {stopped} of 100 in "
                    f"{save}; rerun the same command with --load {save} to continue")
    assert "training data: 400 samples of 32 tokens = 19.05 epochs of the train split (21 " \
           "distinct samples)" in err


class _Alive:
    """``_wait_for_step``'s view of a subprocess."""

    def __init__(self, proc: subprocess.Popen, stderr: Path):
        self.proc, self.stderr = proc, stderr

    def done(self) -> bool:
        return self.proc.poll() is not None

    def result(self) -> None:
        raise AssertionError(f"exited {self.proc.returncode}: {self.stderr.read_text()[-2000:]}")
