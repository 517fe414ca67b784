"""Options shared by several subcommands, generated from their configs (Megatron-LM names where
one exists; ``cli/options.py``), and the run edge (``minitron_megatron.api``)."""

from __future__ import annotations

import argparse

import torch

from minitron_megatron.api import default_params_dtype, launch_env, run_distributed  # noqa: F401
from minitron_megatron.cli.options import ConfigOptions
from minitron_megatron.config import ParallelConfig
from minitron_megatron.data.loaders import DataConfig
from minitron_megatron.distill.config import KDConfig, TrainConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

PARALLEL = ConfigOptions(ParallelConfig,
                         flags={"timeout_minutes": "--distributed-timeout-minutes"})
DATA = ConfigOptions(DataConfig, skip=("seed",), flags={"cache_path": "--data-cache-path"})
KD = ConfigOptions(KDConfig, prefix="kd-", flags={"intermediate_pairs": "--kd-intermediate"},
                   convert={"intermediate_pairs": KDConfig.parse_pairs},
                   aliases={"ce_weight": "--kd-alpha"})
SCHEDULE_FIELDS = ("global_batch_size", "micro_batch_size", "lr", "min_lr", "lr_warmup_iters",
                   "lr_decay_iters", "lr_decay_style", "weight_decay", "adam_beta1",
                   "adam_beta2", "adam_eps", "clip_grad", "save_interval", "log_interval",
                   "wandb_project", "wandb_run_name")
"""Optimizer, LR schedule and bookkeeping of every training run: distill, finetune and each
candidate of ``minitron search``."""

SCHEDULE = ConfigOptions(TrainConfig, only=SCHEDULE_FIELDS)


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    PARALLEL.add(parser.add_argument_group("parallelism"))


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    return PARALLEL.build(args)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    DATA.add(parser.add_argument_group("data"))


def data_config(args: argparse.Namespace) -> DataConfig:
    """The data options → ``DataConfig``; its shuffle seed is ``--seed``."""
    return DATA.build(args, seed=args.seed)


def add_params_dtype(parser, *, auto: bool = False) -> None:
    """``--params-dtype``: the dtype the model's weights are loaded (and trained) in."""
    choices = ("auto", *DTYPES) if auto else tuple(DTYPES)
    parser.add_argument("--params-dtype", choices=choices, default=choices[0],
                        help="dtype of the model's parameters" + (
                            " (default: auto: bf16 on GPU, fp32 on CPU)" if auto
                            else " (default: fp32)"))


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    if args.params_dtype == "auto":
        return default_params_dtype()
    return DTYPES[args.params_dtype]


def add_distributed_optimizer(group) -> None:
    group.add_argument("--no-distributed-optimizer", action="store_true",
                       help="keep whole optimizer states on every rank (by default they are "
                            "sharded over the data-parallel ranks whenever the parameters are "
                            "bf16/fp16)")


def train_config(args: argparse.Namespace, options: ConfigOptions = SCHEDULE, **fields):
    """``TrainConfig`` from ``options``' parsed values; ``fields`` are the run's own settings."""
    dtype = params_dtype(args)
    return options.build(args, use_distributed_optimizer=(
        dtype != torch.float32 and not args.no_distributed_optimizer), **fields)


def single_process() -> ParallelConfig:
    return ParallelConfig()
