"""``minitron importance``: calibration scores of a checkpoint, at any TP × PP × DP."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from minitron_megatron.cli.common import (
    DTYPES,
    add_data_args,
    add_parallel_args,
    data_config,
    parallel_config,
    run_distributed,
)
from minitron_megatron.errors import UserError

log = logging.getLogger("minitron")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("importance", help="activation importance of neurons, heads, channels, "
                                          "layers → a layout-free scores file")
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--calib-samples", type=int, required=True,
                   help="calibration samples (from the train split), split over DP ranks")
    p.add_argument("--save-scores", required=True, help="scores file to write (.safetensors)")
    p.add_argument("--batch-agg", choices=("l2", "mean", "var"), default="l2")
    p.add_argument("--seq-agg", choices=("mean", "l2", "var", "max"), default="mean")
    p.add_argument("--calib-doc-starts", type=float, default=0.0, metavar="FRACTION",
                   help="fraction of calibration samples that start at a document's first token "
                        "(interleaved with the dataset's mid-document windows)")
    p.add_argument("--ffn-hook", choices=("fc2-input", "fc1-output"), default="fc2-input")
    p.add_argument("--depth-metrics", default="bi",
                   help="comma-separated: bi, loss, block:K (loss and block cost one forward "
                        "pass over the calibration samples per layer / block start)")
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
    p.add_argument("--params-dtype", choices=DTYPES, default="fp32")
    add_data_args(p)
    add_parallel_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from minitron_megatron.checkpoint import find_checkpoint
    from minitron_megatron.importance import ImportanceConfig, importance_checkpoint
    from minitron_megatron.importance.config import CalibrationConfig
    from minitron_megatron.importance.stats import default_stats_dir

    info = find_checkpoint(args.load)
    config = ImportanceConfig(batch_agg=args.batch_agg, seq_agg=args.seq_agg,
                              ffn_hook=args.ffn_hook, calib_doc_starts=args.calib_doc_starts,
                              depth_metrics=tuple(m for m in args.depth_metrics.split(",") if m))
    config.check_model(info.model_config.num_layers)
    out = Path(args.save_scores)
    if out.is_dir() or not out.parent.is_dir():
        raise UserError(f"--save-scores {out} must be a file in an existing directory.")
    calibration = CalibrationConfig(num_samples=args.calib_samples,
                                    micro_batch_size=args.micro_batch_size)
    stats_dir = None if args.no_save_stats else Path(args.save_stats or default_stats_dir(out))
    data = data_config(args)
    parallel = parallel_config(args)
    info.model_config.check_parallel(tensor_parallel=parallel.tensor_model_parallel_size,
                                     pipeline_parallel=parallel.pipeline_model_parallel_size)
    info.model_config.check_seq_length(data.seq_length)
    with run_distributed(parallel) as ps:
        scores = importance_checkpoint(info, ps, data, num_samples=calibration.num_samples,
                                       micro_batch_size=calibration.micro_batch_size,
                                       config=config,
                                       params_dtype=DTYPES[args.params_dtype],
                                       stats_dir=stats_dir)
        if ps.rank == 0:
            scores.save(out)
            print(json.dumps({"scores": str(out), "calibration_loss": scores.calibration_loss,
                              "samples": scores.num_samples, "tokens": scores.num_tokens,
                              "depth_metrics": list(scores.depth),
                              "stats": None if stats_dir is None else str(stats_dir)}),
                  flush=True)
