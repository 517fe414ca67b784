"""``minitron search``: enumerate pruned shapes of a teacher within a parameter budget, distill
each briefly, rank them by the loss after distillation (paper §2.3 / §4.3)."""

from __future__ import annotations

import argparse
import sys

from minitron_megatron.cli.common import (
    add_data_args,
    add_parallel_args,
    data_config,
    launch_env,
    parallel_config,
)
from minitron_megatron.cli.distill import add_kd_args, add_schedule_args


def _param_count(text: str) -> int:
    from minitron_megatron.search.space import parse_param_count

    try:
        return parse_param_count(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="architecture search: prune every shape within a "
                                      "parameter budget, distill each briefly, rank them")
    p.add_argument("--load", required=True, help="teacher checkpoint")
    p.add_argument("--scores", required=True, help="scores file of `minitron importance` on "
                                                   "the teacher")
    p.add_argument("--save", required=True,
                   help="search directory: search_results.{md,json}, candidates/<name>/ "
                        "(relaunch with the same flags to resume)")
    g = p.add_argument_group("search")
    g.add_argument("--target-params", type=_param_count, required=True,
                   help="parameter budget, e.g. 70M or 4B (exact count: padded vocabulary and "
                        "tied embeddings included)")
    g.add_argument("--params-tolerance", type=float, default=0.05,
                   help="candidates within target × (1 ± tolerance)")
    g.add_argument("--search-space", default=None, metavar="YAML",
                   help="choices per axis overriding the defaults, e.g. {num_layers: [30, 28], "
                        "hidden_size: [448, 384]}; axes: num_layers, hidden_size, "
                        "ffn_hidden_size, num_attention_heads, num_query_groups")
    g.add_argument("--top-k", type=int, default=None,
                   help="distill only the K candidates with the lowest zero-shot loss "
                        "(default: all, as the paper); may be raised when resuming")
    g.add_argument("--candidate-train-iters", type=int, default=400,
                   help="distillation steps per candidate (the paper: rankings settle after "
                        "~300-400)")
    g.add_argument("--candidate-eval-iters", type=int, default=1,
                   help="global batches of held-out samples every loss is measured on")
    g.add_argument("--depth-method", choices=("bi", "loss", "block"), default="bi",
                   help="which layers shallower candidates drop (the metric must be in the "
                        "scores)")
    g.add_argument("--keep-all", action="store_true",
                   help="keep every candidate's pruned and distilled checkpoint (default: only "
                        "the best's distilled one)")
    add_schedule_args(p.add_argument_group("distillation schedule (each candidate)"))
    add_kd_args(p)
    add_data_args(p)
    add_parallel_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from minitron_megatron.api import search
    from minitron_megatron.cli.distill import kd_config, params_dtype, train_config
    from minitron_megatron.runtime.signals import EXIT_INTERRUPTED, RunInterrupted
    from minitron_megatron.search import SearchConfig

    dtype = params_dtype(args)
    config = SearchConfig(save=args.save, target_params=args.target_params,
                          params_tolerance=args.params_tolerance, top_k=args.top_k,
                          depth_method=args.depth_method, keep_all=args.keep_all)
    train = train_config(args, dtype, save=args.save, train_iters=args.candidate_train_iters,
                         eval_iters=args.candidate_eval_iters)
    launch = launch_env()
    try:
        search(load=args.load, scores=args.scores, config=config, train=train,
               kd=kd_config(args), data=data_config(args), space=args.search_space,
               parallel=parallel_config(args), params_dtype=dtype, launch=launch)
    except RunInterrupted as stop:
        if launch.rank == 0:
            print(f"minitron search: {stop}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
