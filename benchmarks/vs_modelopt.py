"""Side by side: our Minitron pruning vs NVIDIA ModelOpt 0.43.0's, same model, target and samples.

Both start from the same loaded checkpoint (one process, TP=1: ModelOpt's only layout), calibrate
on the same TRAIN-split samples and produce the same target shape; timed is what each needs from
a loaded model to a pruned one (ours: calibration with hooks + Gram statistics + scoring + plan +
position-0 fold + least-squares refit; ModelOpt: its whole ``mtp.prune`` call). Ours is also timed
with the paper's method (scores only, sliced: the same work as ModelOpt's call), and per stage
(calibration pass; plan + prune + refit). Then the pruned
models are evaluated on the same VALID-split samples, with the loss by window start. Our pruned
model is also saved (``--save``) for the other benchmarks.

    python benchmarks/vs_modelopt.py --load ckpt/teacher --data-path data/wiki --save ckpt/pruned
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from benchmarks.modelopt_baseline import MODELOPT_INSTALL, modelopt_prune

TARGET = {"hidden_size": 448, "ffn_hidden_size": 768, "num_attention_heads": 6}


def main(argv: list[str] | None = None) -> dict:
    from minitron_megatron.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
    from minitron_megatron.config import ParallelConfig
    from minitron_megatron.data.loaders import DataConfig, build_datasets, micro_batches
    from minitron_megatron.data.tokenizer import Tokenizer
    from minitron_megatron.data.windows import DocumentStartWindows
    from minitron_megatron.evaluate import (
        WindowStarts,
        eod_id_of,
        evaluate_model,
        first_token_ids,
    )
    from minitron_megatron.importance import ImportanceConfig, estimate_importance
    from minitron_megatron.model.build import build_model
    from minitron_megatron.pruning import PruneTargets, apply_plan, make_plan
    from minitron_megatron.pruning.reconstruct import ReconstructConfig, Reconstructor
    from minitron_megatron.runtime.distributed import LaunchEnv, distributed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True)
    p.add_argument("--data-path", required=True)
    p.add_argument("--save", default=None, help="also save our pruned checkpoint here")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    args = p.parse_args(argv)

    info = find_checkpoint(args.load)
    cfg = info.model_config
    data = DataConfig(data_path=args.data_path, seq_length=args.seq_length)
    mb, seq = args.micro_batch_size, args.seq_length
    result = {"target": TARGET, "calib_samples": args.calib_samples,
              "eval_samples": args.eval_samples, "seq_length": seq,
              "teacher_parameters": cfg.num_parameters(),
              "pruned_parameters": cfg.replace(**TARGET).num_parameters()}
    with distributed(LaunchEnv(), ParallelConfig()) as ps:
        datasets = build_datasets(data, eod_id=eod_id_of(info), vocab_size=cfg.vocab_size,
                                  num_samples={"train": args.calib_samples,
                                               "valid": args.eval_samples})

        def loaded():
            model = build_model(cfg, ps, init_weights=False, spec="local")
            load_checkpoint(info, model=model)
            return model

        starts = WindowStarts(first_tokens=first_token_ids(Tokenizer.load(info.tokenizer_dir)),
                              doc_starts=DocumentStartWindows(datasets["valid"], seq))

        def loss(model, name) -> float:
            r = evaluate_model(model, ps, datasets["valid"], num_samples=args.eval_samples,
                               micro_batch_size=mb, seq_length=seq, window_starts=starts)
            result[f"{name}_window_starts"] = r.window_starts
            return r.loss

        def prune_ours(robust: bool):
            """Ours from a loaded model: (pruned, config, {stage: seconds}). ``robust``: the
            default (Gram statistics in the calibration pass, least-squares refit); else the
            paper's method (scores only, sliced), the same work as ModelOpt's prune call."""
            model = loaded()
            seconds = {}
            with tempfile.TemporaryDirectory() as stats:
                start = time.perf_counter()
                scores = estimate_importance(
                    model, ps, datasets["train"], model_config=cfg,
                    num_samples=args.calib_samples, micro_batch_size=mb, seq_length=seq,
                    config=ImportanceConfig(depth_metrics=()), stats_dir=stats if robust else None)
                seconds["importance"] = time.perf_counter() - start
                refit = Reconstructor(ReconstructConfig(stats=stats)) if robust else None
                pruned, pruned_cfg = apply_plan(model, make_plan(scores, PruneTargets(**TARGET)),
                                                ps, reconstruct=refit)
                seconds["prune"] = time.perf_counter() - start - seconds["importance"]
            seconds["total"] = time.perf_counter() - start
            return pruned, pruned_cfg, seconds

        paper, _, paper_seconds = prune_ours(robust=False)
        result["ours_paper_seconds"] = paper_seconds
        result["ours_paper_loss"] = loss(paper, "ours_paper")
        del paper
        ours, ours_cfg, ours_seconds = prune_ours(robust=True)
        result["ours_stages_seconds"] = ours_seconds
        result["ours_seconds"] = ours_seconds["total"]
        result["ours_loss"] = loss(ours, "ours")
        if args.save:
            save_checkpoint(args.save, model=ours, model_config=ours_cfg,
                            tokenizer_dir=info.tokenizer_dir)
        del ours

        try:
            model = loaded()
            calibration = list(micro_batches(datasets["train"], range(args.calib_samples), mb))
            peer, seconds = modelopt_prune(model, cfg, ps, TARGET, calibration, seq_length=seq,
                                           micro_batch_size=mb)
            result["modelopt_seconds"] = seconds["wall"]
            result["modelopt_loss"] = loss(peer, "modelopt")
            result["time_ratio_ours_over_modelopt"] = (result["ours_seconds"]
                                                       / result["modelopt_seconds"])
            result["time_ratio_ours_paper_over_modelopt"] = (
                result["ours_paper_seconds"]["total"] / result["modelopt_seconds"])
        except ImportError:
            result["modelopt"] = f"not installed: {MODELOPT_INSTALL}"
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
