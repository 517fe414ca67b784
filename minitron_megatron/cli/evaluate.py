"""``minitron evaluate``: held-out loss of a checkpoint at any TP × PP × DP."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
from minitron_megatron.evaluate import EvalConfig

EVAL = ConfigOptions(EvalConfig, flags={"num_samples": "--eval-samples"})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="validation loss / perplexity of a checkpoint")
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--output-json", default=None, help="also write the result here")
    EVAL.add(p.add_argument_group("evaluation"))
    add_params_dtype(p)
    add_data_args(p)
    add_parallel_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from minitron_megatron.api import evaluate
    from minitron_megatron.checkpoint import find_checkpoint
    from minitron_megatron.output_paths import check_output_file

    info = find_checkpoint(args.load)  # the checkpoint's errors first, then the paths and data
    if args.output_json:
        check_output_file(args.output_json, "--output-json")
    launch = launch_env()
    result = evaluate(load=info, data=data_config(args),
                      config=EVAL.build(args),
                      parallel=parallel_config(args), params_dtype=DTYPES[args.params_dtype],
                      launch=launch)
    if launch.rank == 0:
        line = json.dumps(result.to_dict())
        print(line, flush=True)
        if args.output_json:
            Path(args.output_json).write_text(line + "\n")
