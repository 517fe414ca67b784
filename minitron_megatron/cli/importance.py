"""``minitron importance``: calibration scores of a checkpoint, at any TP × PP × DP."""

from __future__ import annotations

import argparse
import json
import logging

from minitron_megatron.cli.common import (
    DTYPES,
    add_data_args,
    add_parallel_args,
    data_config,
    launch_env,
    parallel_config,
)

log = logging.getLogger("minitron")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("importance", help="activation importance of neurons, heads, channels, "
                                          "layers → a layout-free scores file")
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--calib-samples", type=int, required=True,
                   help="calibration samples (from the train split), split over DP ranks")
    p.add_argument("--save-scores", required=True, help="scores file to write (.safetensors)")
    p.add_argument("--batch-agg", choices=("l2", "mean", "var"), default="l2")
    p.add_argument("--seq-agg", choices=("mean", "l2", "var"), default="mean")
    p.add_argument("--ffn-hook", choices=("fc2-input", "fc1-output"), default="fc2-input")
    p.add_argument("--depth-metrics", default="bi",
                   help="comma-separated: bi, loss, block:K (loss and block cost one forward "
                        "pass over the calibration samples per layer / block start)")
    p.add_argument("--params-dtype", choices=DTYPES, default="fp32")
    add_data_args(p)
    add_parallel_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from minitron_megatron.api import estimate_importance
    from minitron_megatron.importance import ImportanceConfig
    from minitron_megatron.importance.config import CalibrationConfig

    config = ImportanceConfig(batch_agg=args.batch_agg, seq_agg=args.seq_agg,
                              ffn_hook=args.ffn_hook,
                              depth_metrics=tuple(m for m in args.depth_metrics.split(",") if m))
    calibration = CalibrationConfig(num_samples=args.calib_samples,
                                    micro_batch_size=args.micro_batch_size)
    launch = launch_env()
    scores = estimate_importance(load=args.load, data=data_config(args), calibration=calibration,
                                 config=config, parallel=parallel_config(args),
                                 params_dtype=DTYPES[args.params_dtype],
                                 save_scores=args.save_scores, launch=launch)
    if launch.rank == 0:
        print(json.dumps({"scores": args.save_scores, "calibration_loss":
                          scores.calibration_loss, "samples": scores.num_samples,
                          "tokens": scores.num_tokens, "depth_metrics": list(scores.depth)}),
              flush=True)
