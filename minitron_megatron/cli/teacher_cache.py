"""``minitron teacher-cache``: the teacher's top-k logits over a distillation's training samples,
computed once, for ``minitron distill --teacher-cache`` and ``minitron search --teacher-cache``."""

from __future__ import annotations

import argparse
import json

from minitron_megatron.cli.common import (
    add_data_args,
    add_parallel_args,
    add_params_dtype,
    data_config,
    launch_env,
    parallel_config,
    params_dtype,
)
from minitron_megatron.cli.options import ConfigOptions
from minitron_megatron.distill.config import TrainConfig
from minitron_megatron.distill.teacher_cache import TeacherCacheConfig

CACHE = ConfigOptions(TeacherCacheConfig, prefix="cache-")
SAMPLES = ConfigOptions(TrainConfig, only=("train_iters", "global_batch_size", "micro_batch_size"))
"""The distillation's own flags: its samples, in its order (and the teacher's micro-batch)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teacher-cache", help="run the teacher once over a distillation's "
                                             "training samples and store its top-k logits")
    p.add_argument("--teacher", required=True, help="teacher checkpoint")
    p.add_argument("--save", required=True, help="cache directory (resumed when it holds an "
                                                 "incomplete cache of the same settings)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a cache of other settings (or other files) in --save")
    SAMPLES.add(p.add_argument_group("the samples (the distillation's own flags: the same "
                                     "order)"))
    CACHE.add(p.add_argument_group("cache"))
    add_params_dtype(p, auto=True)
    add_data_args(p)
    add_parallel_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from minitron_megatron.api import teacher_cache
    from minitron_megatron.data.loaders import positive_int

    for flag in ("train_iters", "global_batch_size", "micro_batch_size"):
        positive_int(f"--{flag.replace('_', '-')}", getattr(args, flag), "a count")
    launch = launch_env()
    config = CACHE.build(args)
    num_samples = args.train_iters * args.global_batch_size
    root = teacher_cache(load=args.teacher, data=data_config(args), num_samples=num_samples,
                         save=args.save, config=config, micro_batch_size=args.micro_batch_size,
                         overwrite=args.overwrite, parallel=parallel_config(args),
                         params_dtype=params_dtype(args), launch=launch)
    if launch.rank == 0:
        print(json.dumps({"save": str(root), "samples": num_samples, "top_k": config.top_k,
                          "bytes_per_token": config.bytes_per_token}), flush=True)
