"""``minitron distill`` (student from a frozen teacher) and ``minitron finetune`` (the same loop,
cross entropy only, no teacher: the teacher correction of the follow-up paper)."""

from __future__ import annotations

import argparse
import json
import sys

from minitron_megatron.cli.common import (
    DTYPES,
    add_data_args,
    add_parallel_args,
    data_config,
    launch_env,
    parallel_config,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distill a student from a frozen teacher (logit KD)")
    p.add_argument("--teacher", required=True, help="teacher checkpoint (frozen)")
    p.add_argument("--student", required=True, help="student checkpoint to start from")
    _add_training_args(p)
    add_kd_args(p)
    p.set_defaults(func=run_distill)

    p = sub.add_parser("finetune", help="fine-tune a model with cross entropy (teacher "
                                        "correction before distillation)")
    p.add_argument("--model", required=True, help="checkpoint to fine-tune")
    _add_training_args(p)
    p.set_defaults(func=run_finetune)


def add_kd_args(p: argparse.ArgumentParser) -> None:
    """The distillation objective's flags (``kd_config`` reads them)."""
    g = p.add_argument_group("distillation")
    g.add_argument("--kd-temperature", type=float, default=1.0,
                   help="softmax temperature τ; the KL is scaled by τ²")
    g.add_argument("--kd-alpha", type=float, default=0.0,
                   help="weight α of the ground-truth cross entropy: α·CE + (1−α)·KD")
    g.add_argument("--kd-reverse", action="store_true", help="KL(student ‖ teacher)")
    g.add_argument("--kd-top-k", type=int, default=None,
                   help="keep only the teacher's top-k logits (renormalised)")
    g.add_argument("--kd-intermediate", default=None, metavar="S:T,...",
                   help="0-based (student layer:teacher layer) pairs for a cosine hidden-state "
                        "loss, weighted by the loss balancer")


def add_schedule_args(g) -> None:
    """Optimizer, LR schedule and bookkeeping flags shared by every training run (distill,
    finetune, and each candidate of ``minitron search``); ``train_config`` reads them."""
    g.add_argument("--global-batch-size", type=int, required=True)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-style", choices=("cosine", "linear", "constant"), default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--save-interval", type=int, default=0)
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--params-dtype", choices=("auto", *DTYPES), default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU")
    g.add_argument("--no-distributed-optimizer", action="store_true",
                   help="keep whole optimizer states per rank even with bf16 on GPU")
    g.add_argument("--wandb-project", default=None)
    g.add_argument("--wandb-run-name", default=None)


def _add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--save", required=True, help="run directory: checkpoints, metrics.jsonl")
    g.add_argument("--load", default=None,
                   help="resume from the latest checkpoint here (usually the --save directory; "
                        "a run starts fresh while it holds none)")
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--eval-interval", type=int, default=0)
    g.add_argument("--eval-iters", type=int, default=1)
    g.add_argument("--exit-interval", type=int, default=0)
    g.add_argument("--no-exit-signal-handler", action="store_true",
                   help="let SIGTERM/SIGINT kill the run at once (default: finish the step, "
                        "save, exit with status 75; resume with --load)")
    g.add_argument("--override-opt-param-scheduler", "--override-opt_param-scheduler",
                   action="store_true", dest="override_opt_param_scheduler",
                   help="on resume, use this command's LR schedule instead of the saved one")
    g.add_argument("--use-checkpoint-opt-param-scheduler", "--use-checkpoint-opt_param-scheduler",
                   action="store_true", dest="use_checkpoint_opt_param_scheduler",
                   help="on resume, keep the saved LR schedule even where the flags differ")
    add_schedule_args(g)
    add_data_args(p)
    add_parallel_args(p)


def params_dtype(args):
    import torch

    if args.params_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return DTYPES[args.params_dtype]


def train_config(args, dtype, **run):
    """``TrainConfig`` from the schedule flags; ``run`` gives the run's own fields (save, load,
    train_iters, eval_interval, eval_iters, exit_interval)."""
    import torch

    from minitron_megatron.distill.config import TrainConfig

    return TrainConfig(
        global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size,
        lr=args.lr, min_lr=args.min_lr, lr_warmup_iters=args.lr_warmup_iters,
        lr_decay_iters=args.lr_decay_iters, lr_decay_style=args.lr_decay_style,
        weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        clip_grad=args.clip_grad, save_interval=args.save_interval,
        log_interval=args.log_interval,
        use_distributed_optimizer=dtype != torch.float32 and not args.no_distributed_optimizer,
        wandb_project=args.wandb_project, wandb_run_name=args.wandb_run_name, **run)


def kd_config(args):
    from minitron_megatron.distill.config import KDConfig

    return KDConfig(temperature=args.kd_temperature, ce_weight=args.kd_alpha,
                    reverse=args.kd_reverse, top_k=args.kd_top_k,
                    intermediate_pairs=KDConfig.parse_pairs(args.kd_intermediate))


def _run(args, *, student_path: str, teacher_path: str | None, kd) -> None:
    from minitron_megatron.api import distill
    from minitron_megatron.runtime.signals import EXIT_INTERRUPTED

    dtype = params_dtype(args)
    train = train_config(args, dtype, save=args.save, load=args.load,
                         train_iters=args.train_iters, eval_interval=args.eval_interval,
                         eval_iters=args.eval_iters, exit_interval=args.exit_interval,
                         exit_signal_handler=not args.no_exit_signal_handler,
                         override_opt_param_scheduler=args.override_opt_param_scheduler,
                         use_checkpoint_opt_param_scheduler=(
                             args.use_checkpoint_opt_param_scheduler))
    launch = launch_env()
    result = distill(student=student_path, teacher=teacher_path, train=train, kd=kd,
                     data=data_config(args), parallel=parallel_config(args), params_dtype=dtype,
                     launch=launch)
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
    _run(args, student_path=args.student, teacher_path=args.teacher, kd=kd_config(args))


def run_finetune(args: argparse.Namespace) -> None:
    _run(args, student_path=args.model, teacher_path=None, kd=None)
