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
    add_params_dtype(p)
    add_data_args(p)
    add_parallel_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from minitron_megatron.api import estimate_importance
    from minitron_megatron.checkpoint import find_checkpoint

    info = find_checkpoint(args.load)  # the checkpoint's errors first, then the data's
    launch = launch_env()
    scores = estimate_importance(load=info, data=data_config(args),
                                 calibration=CALIBRATION.build(args),
                                 config=IMPORTANCE.build(args), parallel=parallel_config(args),
                                 params_dtype=DTYPES[args.params_dtype],
                                 save_scores=args.save_scores, launch=launch)
    if launch.rank == 0:
        print(json.dumps({"scores": args.save_scores, "calibration_loss":
                          scores.calibration_loss, "samples": scores.num_samples,
                          "tokens": scores.num_tokens, "depth_metrics": list(scores.depth)}),
              flush=True)
