"""``minitron distill`` (student from a frozen teacher) and ``minitron finetune`` (the same loop,
cross entropy only, no teacher: the teacher correction of the follow-up paper)."""

from __future__ import annotations

import argparse
import json
import sys

from minitron_megatron.cli.common import (
    KD,
    add_data_args,
    add_distributed_optimizer,
    add_parallel_args,
    add_params_dtype,
    data_config,
    launch_env,
    parallel_config,
    params_dtype,
    train_config,
)
from minitron_megatron.cli.options import ConfigOptions
from minitron_megatron.distill.config import TrainConfig

TRAIN = ConfigOptions(TrainConfig, skip=("use_distributed_optimizer",), aliases={
    # Megatron-LM's own spelling, accepted as well
    "override_opt_param_scheduler": "--override-opt_param-scheduler",
    "use_checkpoint_opt_param_scheduler": "--use-checkpoint-opt_param-scheduler"})
"""Every field of the training run (the distributed optimizer follows ``--params-dtype``)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distill a student from a frozen teacher (logit KD)")
    teacher = p.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--teacher", help="teacher checkpoint (frozen)")
    teacher.add_argument("--teacher-cache", default=None, metavar="DIR",
                         help="the teacher's top-k logits from `minitron teacher-cache` for this "
                              "run's samples, read instead of running the teacher")
    p.add_argument("--student", required=True, help="student checkpoint to start from")
    _add_training_args(p)
    KD.add(p.add_argument_group("distillation"))
    p.set_defaults(func=run_distill)

    p = sub.add_parser("finetune", help="fine-tune a model with cross entropy (teacher "
                                        "correction before distillation)")
    p.add_argument("--model", required=True, help="checkpoint to fine-tune")
    _add_training_args(p)
    p.set_defaults(func=run_finetune)


def _add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    TRAIN.add(g)
    add_params_dtype(g, auto=True)
    add_distributed_optimizer(g)
    add_data_args(p)
    add_parallel_args(p)


def _run(args, *, student_path: str, teacher_path: str | None, kd,
         teacher_cache: str | None = None) -> None:
    from minitron_megatron.api import distill
    from minitron_megatron.runtime.signals import EXIT_INTERRUPTED

    train = train_config(args, TRAIN)
    launch = launch_env()
    result = distill(student=student_path, teacher=teacher_path, train=train, kd=kd,
                     data=data_config(args), parallel=parallel_config(args),
                     params_dtype=params_dtype(args), launch=launch,
                     teacher_cache=teacher_cache)
    if launch.rank == 0:  # one JSON summary line, like evaluate / importance / prune
        evals = [h for h in result.history if "val_loss" in h]
        summary = {"save": str(train.save), "iteration": result.state.iteration}
        if evals:
            summary["val_loss"] = evals[-1]["val_loss"]
        if result.interrupted:
            summary["interrupted"] = result.interrupted
        print(json.dumps(summary), flush=True)
    if result.interrupted:
        if launch.rank == 0:
            how = "" if train.load == train.save else f" with --load {train.save}"
            print(f"minitron {args.command}: {result.interrupted} received: saved iteration "
                  f"{result.state.iteration} of {train.train_iters} in {train.save}; rerun "
                  f"the same command{how} to continue", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED)


def run_distill(args: argparse.Namespace) -> None:
    _run(args, student_path=args.student, teacher_path=args.teacher, kd=KD.build(args),
         teacher_cache=args.teacher_cache)


def run_finetune(args: argparse.Namespace) -> None:
    _run(args, student_path=args.model, teacher_path=None, kd=None)
