"""``minitron search``: enumerate pruned shapes of a teacher within a parameter budget, distill
each briefly, rank them by the loss after distillation (paper §2.3 / §4.3)."""

from __future__ import annotations

import argparse
import sys

from minitron_megatron.cli.common import (
    KD,
    SCHEDULE,
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
from minitron_megatron.cli.teacher_cache import CACHE
from minitron_megatron.search.config import SearchConfig


def _param_count(text: str) -> int:
    from minitron_megatron.search.space import parse_param_count

    try:
        return parse_param_count(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


SEARCH = ConfigOptions(SearchConfig, types={"target_params": _param_count})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="architecture search: prune every shape within a "
                                      "parameter budget, distill each briefly, rank them")
    p.add_argument("--load", required=True, help="teacher checkpoint")
    p.add_argument("--scores", required=True, help="scores file of `minitron importance` on "
                                                   "the teacher")
    g = p.add_argument_group("search")
    SEARCH.add(g)
    g.add_argument("--search-space", default=None, metavar="YAML",
                   help="choices per axis overriding the defaults, e.g. {num_layers: [30, 28], "
                        "hidden_size: [448, 384]}; axes: num_layers, hidden_size, "
                        "ffn_hidden_size, num_attention_heads, num_query_groups")
    g.add_argument("--candidate-train-iters", type=int, default=400,
                   help="distillation steps per candidate (the paper: rankings settle after "
                        "~300-400) (default: 400)")
    g.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="the teacher's top-k logits from `minitron teacher-cache` for the "
                        "candidates' training samples: every candidate distills from them "
                        "instead of running the teacher")
    g.add_argument("--cache-teacher", action="store_true",
                   help="build that cache within the search, once, with the teacher it loads "
                        "for the zero-shot losses (in SAVE/teacher_cache, removed at the end "
                        "unless --keep-all; settings: --cache-top-k, --cache-dtype)")
    CACHE.add(p.add_argument_group("teacher cache (with --cache-teacher)"))
    g.add_argument("--candidate-eval-iters", type=int, default=1,
                   help="global batches of held-out samples every loss is measured on "
                        "(default: 1)")
    g = p.add_argument_group("distillation schedule (each candidate)")
    SCHEDULE.add(g)
    add_params_dtype(g, auto=True)
    add_distributed_optimizer(g)
    KD.add(p.add_argument_group("distillation"))
    add_data_args(p)
    add_parallel_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from minitron_megatron.api import search
    from minitron_megatron.checkpoint import find_checkpoint
    from minitron_megatron.importance import Scores
    from minitron_megatron.runtime.signals import EXIT_INTERRUPTED, RunInterrupted

    teacher, scores = find_checkpoint(args.load), Scores.load(args.scores)  # before the data
    train = train_config(args, save=args.save, train_iters=args.candidate_train_iters,
                         eval_iters=args.candidate_eval_iters)
    launch = launch_env()
    try:
        search(load=teacher, scores=scores, config=SEARCH.build(args), train=train,
               kd=KD.build(args), data=data_config(args), space=args.search_space,
               parallel=parallel_config(args), params_dtype=params_dtype(args), launch=launch,
               teacher_cache=args.teacher_cache,
               cache_teacher=CACHE.build(args) if args.cache_teacher else None)
    except RunInterrupted as stop:
        if launch.rank == 0:
            print(f"minitron search: {stop}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
