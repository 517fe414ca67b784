"""Resuming with another LR schedule (here: another --train-iters, and a new --lr) is refused
with one line naming both values, unless --override-opt-param-scheduler (this command's
schedule from the saved step on) or --use-checkpoint-opt-param-scheduler (the saved one) says
which to follow — Megatron-LM's choice."""

from __future__ import annotations

import shutil

import pytest

from minitron_megatron.checkpoint import find_checkpoint
from minitron_megatron.cli import main
from minitron_megatron.config import ParallelConfig
from minitron_megatron.data.loaders import DataConfig
from minitron_megatron.distill.config import TrainConfig
from minitron_megatron.distill.training import Trainer
from minitron_megatron.errors import UserError
from minitron_megatron.runtime.distributed import LaunchEnv, distributed
from tests import distill_helpers

LR, MIN_LR = 3e-3, 3e-4


@pytest.fixture(scope="module")
def student(tmp_path_factory, llama_ckpt_untied):
    return distill_helpers.make_student(tmp_path_factory.mktemp("student"), llama_ckpt_untied)


def finetune(student, data, save, **train) -> dict[int, float]:
    """A fine-tuning run (resuming from ``save`` if it holds a checkpoint): LR per step."""
    cfg = dict(save=save, load=save, global_batch_size=4, micro_batch_size=4, lr=LR,
               min_lr=MIN_LR, lr_warmup_iters=1)
    cfg.update(train)
    with distributed(LaunchEnv(), ParallelConfig()) as ps:
        trainer = Trainer(train=TrainConfig(**cfg), kd=None, student=find_checkpoint(student),
                          data=DataConfig(data_path=data, seq_length=32, split="75,25,0"),
                          teacher=None, ps=ps)
        return {r["iteration"]: r["lr"] for r in trainer.run().history if "lr" in r}


def test_resume_with_another_schedule_is_refused_or_follows_the_chosen_one(
        student, small_dataset, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    finetune(student, small_dataset, run, train_iters=4)
    for name in ("override", "keep"):
        shutil.copytree(run, tmp_path / name)

    with pytest.raises(UserError, match=r"LR decay steps 4 saved, 8 now \(--train-iters 8\)\)\. "
                                        r"Pass --override-opt-param-scheduler .* iteration 4 "
                                        r"on, or --use-checkpoint-opt-param-scheduler"):
        finetune(student, small_dataset, run, train_iters=8)
    # the command line refuses it before any work: one line, exit 2
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", str(student), "--data-path", small_dataset,
              "--seq-length", "32", "--save", str(run), "--load", str(run),
              "--split", "75,25,0", "--train-iters", "4", "--global-batch-size", "4",
              "--micro-batch-size", "4", "--lr", "1e-3",
              "--min-lr", str(MIN_LR), "--lr-warmup-iters", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert "peak LR 0.003 saved, 0.001 now (--lr 0.001)" in err[0]

    # keep the saved schedule: its cosine ended at step 4, the minimum LR from then on
    kept = finetune(student, small_dataset, tmp_path / "keep", train_iters=8,
                    use_checkpoint_opt_param_scheduler=True)
    assert kept == {i: MIN_LR for i in range(5, 9)}
    # 16 → 32 samples of a 21-sample train split: the multi-epoch index changed with the length
    assert ("asks for 32 training samples instead of 16 over 21-sample epochs: Megatron's "
            "multi-epoch index is built for the run's length, so the samples from iteration 5 "
            "on follow another order") in caplog.text
    # take the new one (8 steps, peak LR 1e-3): the LRs of an 8-step run with it from scratch
    fresh = finetune(student, small_dataset, tmp_path / "fresh", train_iters=8, lr=1e-3)
    overridden = finetune(student, small_dataset, tmp_path / "override", train_iters=8, lr=1e-3,
                          override_opt_param_scheduler=True)
    assert overridden == {i: fresh[i] for i in range(5, 9)}
    assert len(set(overridden.values())) == 4 and max(overridden.values()) < 1e-3


def test_both_schedule_flags_are_refused(tmp_path):
    with pytest.raises(UserError, match="pass one of them"):
        TrainConfig(save=tmp_path, train_iters=2, global_batch_size=1,
                    override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=True)
