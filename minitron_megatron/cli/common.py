"""Flags shared by several subcommands (Megatron-LM names where one exists) and the run edge."""

from __future__ import annotations

import argparse

import torch

from minitron_megatron.api import launch_env, run_distributed  # noqa: F401  (the run edge)
from minitron_megatron.config import ParallelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallelism")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1, metavar="TP")
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1, metavar="PP")
    group.add_argument("--sequence-parallel", action="store_true")
    group.add_argument("--seed", type=int, default=1234)
    group.add_argument("--distributed-timeout-minutes", type=int, default=30)


def add_data_args(parser: argparse.ArgumentParser, *, seq_length: int | None = None) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data-path", required=True, help="indexed dataset prefix (.bin/.idx)")
    group.add_argument("--seq-length", type=int, required=seq_length is None, default=seq_length)
    group.add_argument("--split", default="98,2,0", help="train,valid,test document shares")
    group.add_argument("--data-cache-path", default=None)
    group.add_argument("--micro-batch-size", type=int, default=1)


def data_config(args: argparse.Namespace):
    """``add_data_args``' flags → the loaders' ``DataConfig``."""
    from minitron_megatron.data.loaders import DataConfig

    return DataConfig(data_path=args.data_path, seq_length=args.seq_length, split=args.split,
                      seed=args.seed, cache_path=args.data_cache_path)


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        seed=args.seed,
        timeout_minutes=args.distributed_timeout_minutes,
    )


def single_process() -> ParallelConfig:
    return ParallelConfig()
