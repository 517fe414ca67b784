"""``minitron prune``: a checkpoint + scores + targets → the pruned checkpoint at its new shape."""

from __future__ import annotations

import argparse
import json

from minitron_megatron.cli.common import (
    DTYPES,
    add_parallel_args,
    add_params_dtype,
    launch_env,
    parallel_config,
)
from minitron_megatron.cli.options import ConfigOptions
from minitron_megatron.pruning.reconstruct import ReconstructConfig
from minitron_megatron.pruning.targets import TARGET_FLAGS, PruneTargets

TARGETS = ConfigOptions(PruneTargets, flags=TARGET_FLAGS)
RECONSTRUCT = ConfigOptions(ReconstructConfig, prefix="reconstruct-", skip=("stats",),
                            flags={"kinds": "--reconstruct-layers"})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a checkpoint by importance scores and save it at the "
                                     "new shape")
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--scores", required=True, help="scores file from `minitron importance`")
    p.add_argument("--save", required=True, help="directory for the pruned checkpoint")
    TARGETS.add(p.add_argument_group("targets"))
    g = p.add_argument_group("reconstruction")
    refit = g.add_mutually_exclusive_group()
    refit.add_argument("--reconstruct", default=None, metavar="STATS_DIR",
                       help="refit the layers that read pruned units by least squares so they "
                            "reproduce the unpruned layers' outputs on the calibration tokens, "
                            "from the statistics of `importance --save-stats STATS_DIR` (default: "
                            "the statistics `importance` saved next to --scores, SCORES.stats, "
                            "when present)")
    refit.add_argument("--no-reconstruct", action="store_true",
                       help="slice the readers of pruned units as the paper does, even when "
                            "statistics are present")
    RECONSTRUCT.add(g)
    add_params_dtype(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a --save directory that already holds files (atomically)")
    add_parallel_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from minitron_megatron.api import prune
    from minitron_megatron.pruning.preflight import saved_stats

    stats = None if args.no_reconstruct else args.reconstruct or saved_stats(args.scores)
    reconstruct = RECONSTRUCT.build(args, stats=stats) if stats else None
    launch = launch_env()
    result = prune(load=args.load, scores=args.scores, targets=TARGETS.build(args), save=args.save,
                   reconstruct=reconstruct, parallel=parallel_config(args),
                   params_dtype=DTYPES[args.params_dtype], overwrite=args.overwrite,
                   launch=launch)
    if launch.rank == 0:
        plan = result.plan
        print(json.dumps({"save": str(result.path), "source_parameters":
                          plan.source.num_parameters(), "parameters":
                          plan.target.num_parameters(), "target": plan.target.to_dict(),
                          "reconstruct": stats}),
              flush=True)
