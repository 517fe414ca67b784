"""``minitron prune``: a checkpoint + scores + targets → the pruned checkpoint at its new shape."""

from __future__ import annotations

import argparse
import json

from minitron_megatron.cli.common import DTYPES, add_parallel_args, parallel_config, run_distributed


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
    p.add_argument("--no-position0-fold", dest="position0_fold", action="store_false",
                   help="slice pruned heads away as the paper does, instead of folding their "
                        "output projection into their group's kept heads (which keeps the "
                        "attention output at position 0 exact)")
    refit = p.add_mutually_exclusive_group()
    refit.add_argument("--reconstruct", default=None, metavar="STATS_DIR",
                       help="refit the layers that read pruned units by least squares so they "
                            "reproduce the unpruned layers' outputs on the calibration tokens, "
                            "from the statistics of `importance --save-stats STATS_DIR` (default: "
                            "the statistics `importance` saved next to --scores, SCORES.stats, "
                            "when present)")
    refit.add_argument("--no-reconstruct", action="store_true",
                       help="slice the readers of pruned units as the paper does, even when "
                            "statistics are present")
    p.add_argument("--reconstruct-ridge", type=float, default=1e-3,
                   help="ridge, relative to the mean diagonal of the kept units' Gram block")
    p.add_argument("--reconstruct-layers", default="proj,fc2,qkv,fc1",
                   help="which readers to refit: proj (after head pruning), fc2 (neurons), "
                        "qkv and fc1 (hidden channels; RMSNorm models)")
    p.add_argument("--params-dtype", choices=DTYPES, default="fp32")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a --save directory that already holds files (atomically)")
    add_parallel_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from minitron_megatron.checkpoint import find_checkpoint
    from minitron_megatron.importance import Scores
    from minitron_megatron.importance.stats import default_stats_dir, has_stats
    from minitron_megatron.pruning import PruneTargets, make_plan, prune_checkpoint
    from minitron_megatron.pruning.apply import check_prune_inputs, check_same_model
    from minitron_megatron.pruning.reconstruct import ReconstructConfig

    info = find_checkpoint(args.load)
    scores = Scores.load(args.scores)
    targets = PruneTargets(
        ffn_hidden_size=args.target_ffn_hidden_size, hidden_size=args.target_hidden_size,
        num_attention_heads=args.target_num_attention_heads,
        num_query_groups=args.target_num_query_groups, num_layers=args.target_num_layers,
        depth_method=args.depth_method, drop_layers=args.drop_layers,
        head_residual=args.head_residual, position0_fold=args.position0_fold)
    parallel = parallel_config(args)
    layout = dict(tensor_parallel=parallel.tensor_model_parallel_size,
                  pipeline_parallel=parallel.pipeline_model_parallel_size)
    info.model_config.check_parallel(**layout)
    check_same_model(scores.model_config, info)
    plan = make_plan(scores, targets)
    stats = args.reconstruct
    if stats is None and not args.no_reconstruct and has_stats(default_stats_dir(args.scores)):
        stats = str(default_stats_dir(args.scores))
    reconstruct = None
    if stats is not None:
        reconstruct = ReconstructConfig(
            stats=stats, ridge=args.reconstruct_ridge,
            kinds=tuple(k for k in args.reconstruct_layers.split(",") if k))
    check_prune_inputs(info, plan, args.save, reconstruct=reconstruct,
                       overwrite=args.overwrite, **layout)
    with run_distributed(parallel) as ps:
        path = prune_checkpoint(info, plan, args.save, ps, params_dtype=DTYPES[args.params_dtype],
                                overwrite=args.overwrite, reconstruct=reconstruct)
        if ps.rank == 0:
            print(json.dumps({"save": str(path), "source_parameters":
                              plan.source.num_parameters(), "parameters":
                              plan.target.num_parameters(), "target": plan.target.to_dict(),
                              "reconstruct": stats}),
                  flush=True)
