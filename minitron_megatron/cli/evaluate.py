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
    parallel_config,
    run_distributed,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="validation loss / perplexity of a checkpoint")
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--eval-samples", type=int, required=True)
    p.add_argument("--output-json", default=None, help="also write the result here")
    p.add_argument("--window-starts", action="store_true",
                   help="also report the loss by window start: as sampled, with the first token "
                        "replaced by a comma, a period and end-of-document, and on windows that "
                        "start at a document start (positions 1..S-1; five forward passes)")
    p.add_argument("--params-dtype", choices=DTYPES, default="fp32")
    add_data_args(p)
    add_parallel_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from minitron_megatron.checkpoint import find_checkpoint
    from minitron_megatron.evaluate import EvalConfig, evaluate_checkpoint
    from minitron_megatron.output_paths import check_output_file

    info = find_checkpoint(args.load)
    if args.output_json:
        check_output_file(args.output_json, "--output-json")
    data = data_config(args)
    run = EvalConfig(num_samples=args.eval_samples, micro_batch_size=args.micro_batch_size)
    parallel = parallel_config(args)
    info.model_config.check_parallel(tensor_parallel=parallel.tensor_model_parallel_size,
                                     pipeline_parallel=parallel.pipeline_model_parallel_size)
    info.model_config.check_seq_length(data.seq_length)
    with run_distributed(parallel) as ps:
        result = evaluate_checkpoint(info, ps, data, num_samples=run.num_samples,
                                     micro_batch_size=run.micro_batch_size,
                                     params_dtype=DTYPES[args.params_dtype],
                                     window_starts=args.window_starts)
        if ps.rank == 0:
            line = json.dumps(result.to_dict())
            print(line, flush=True)
            if args.output_json:
                Path(args.output_json).write_text(line + "\n")
