"""``minitron prune``: a checkpoint + scores + targets → the pruned checkpoint at its new shape."""

from __future__ import annotations

import argparse
import json

from minitron_megatron.cli.common import DTYPES, add_parallel_args, launch_env, parallel_config


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer "
                                         f"indices, e.g. 3,4,5") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a checkpoint by importance scores and save it at the "
                                     "new shape")
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--scores", required=True, help="scores file from `minitron importance`")
    p.add_argument("--save", required=True, help="directory for the pruned checkpoint")
    p.add_argument("--target-ffn-hidden-size", type=int)
    p.add_argument("--target-hidden-size", type=int)
    p.add_argument("--target-num-attention-heads", type=int)
    p.add_argument("--target-num-query-groups", type=int)
    p.add_argument("--target-num-layers", type=int)
    p.add_argument("--depth-method", choices=("bi", "loss", "block"), default="bi")
    p.add_argument("--drop-layers", type=_layers, default=None, help="e.g. 20,21,22 (0-based)")
    p.add_argument("--head-residual", action="store_true",
                   help="fold pruned query heads into kept ones (paper §2.3)")
    p.add_argument("--params-dtype", choices=DTYPES, default="fp32")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a --save directory that already holds files (atomically)")
    add_parallel_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from minitron_megatron.api import prune
    from minitron_megatron.pruning import PruneTargets

    targets = PruneTargets(
        ffn_hidden_size=args.target_ffn_hidden_size, hidden_size=args.target_hidden_size,
        num_attention_heads=args.target_num_attention_heads,
        num_query_groups=args.target_num_query_groups, num_layers=args.target_num_layers,
        depth_method=args.depth_method, drop_layers=args.drop_layers,
        head_residual=args.head_residual)
    launch = launch_env()
    result = prune(load=args.load, scores=args.scores, targets=targets, save=args.save,
                   parallel=parallel_config(args), params_dtype=DTYPES[args.params_dtype],
                   overwrite=args.overwrite, launch=launch)
    if launch.rank == 0:
        plan = result.plan
        print(json.dumps({"save": str(result.path), "source_parameters":
                          plan.source.num_parameters(), "parameters":
                          plan.target.num_parameters(), "target": plan.target.to_dict()}),
              flush=True)
