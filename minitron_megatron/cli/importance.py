"""``minitron importance``: calibration scores of a checkpoint, at any TP × PP × DP."""

from __future__ import annotations

import argparse
import json
import logging

from minitron_megatron.cli.common import (
    DTYPES,
    add_data_args,
    add_parallel_args,
    add_params_dtype,
    data_config,
    launch_env,
    parallel_config,
)
from minitron_megatron.cli.options import ConfigOptions
from minitron_megatron.importance.config import CalibrationConfig, ImportanceConfig

log = logging.getLogger("minitron")

CALIBRATION = ConfigOptions(CalibrationConfig, flags={"num_samples": "--calib-samples"})
IMPORTANCE = ConfigOptions(ImportanceConfig)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("importance", help="activation importance of neurons, heads, channels, "
                                          "layers → a layout-free scores file")
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--save-scores", required=True, help="scores file to write (.safetensors)")
    CALIBRATION.add(p.add_argument_group("calibration"))
    IMPORTANCE.add(p.add_argument_group("importance"))
    stats = p.add_mutually_exclusive_group()
    stats.add_argument("--save-stats", default=None, metavar="DIR",
                       help="where to write the input Gram matrices of linear_proj, linear_fc2 "
                            "and (RMSNorm models) the norm inputs of linear_qkv/linear_fc1, "
                            "gathered in the same pass, that `prune` refits those layers from "
                            "(default: the --save-scores path with its suffix replaced by "
                            ".stats; sharded over TP, one file per TP rank and stage, read at "
                            "any layout; fp32, 32.7 GB for Llama-3.1-8B, 1/TP per rank)")
    stats.add_argument("--no-save-stats", action="store_true",
                       help="skip the statistics (the paper's pass; `prune` then slices)")
    add_params_dtype(p)
    add_data_args(p)
    add_parallel_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from minitron_megatron.api import estimate_importance
    from minitron_megatron.checkpoint import find_checkpoint
    from minitron_megatron.importance.stats import default_stats_dir

    info = find_checkpoint(args.load)  # the checkpoint's errors first, then the data's
    stats = None if args.no_save_stats else args.save_stats or default_stats_dir(args.save_scores)
    launch = launch_env()
    scores = estimate_importance(load=info, data=data_config(args),
                                 calibration=CALIBRATION.build(args),
                                 config=IMPORTANCE.build(args), parallel=parallel_config(args),
                                 params_dtype=DTYPES[args.params_dtype],
                                 save_scores=args.save_scores, save_stats=stats, launch=launch)
    if launch.rank == 0:
        print(json.dumps({"scores": args.save_scores, "calibration_loss":
                          scores.calibration_loss, "samples": scores.num_samples,
                          "tokens": scores.num_tokens, "depth_metrics": list(scores.depth),
                          "stats": None if stats is None else str(stats)}),
              flush=True)
