"""``minitron evaluate``: held-out loss of a checkpoint at any TP × PP × DP."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minitron_megatron.cli.common import (
    DTYPES,
    add_data_args,
    add_parallel_args,
    data_config,
    launch_env,
    parallel_config,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="validation loss / perplexity of a checkpoint")
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--eval-samples", type=int, required=True)
    p.add_argument("--output-json", default=None, help="also write the result here")
    p.add_argument("--params-dtype", choices=DTYPES, default="fp32")
    add_data_args(p)
    add_parallel_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from minitron_megatron.api import evaluate
    from minitron_megatron.evaluate import EvalConfig
    from minitron_megatron.output_paths import check_output_file

    if args.output_json:
        check_output_file(args.output_json, "--output-json")
    launch = launch_env()
    result = evaluate(load=args.load, data=data_config(args),
                      config=EvalConfig(num_samples=args.eval_samples,
                                        micro_batch_size=args.micro_batch_size),
                      parallel=parallel_config(args), params_dtype=DTYPES[args.params_dtype],
                      launch=launch)
    if launch.rank == 0:
        line = json.dumps(result.to_dict())
        print(line, flush=True)
        if args.output_json:
            Path(args.output_json).write_text(line + "\n")
