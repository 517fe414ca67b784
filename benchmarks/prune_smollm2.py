"""Real-model study: SmolLM2-135M pruned to about half its parameters, importance vs random.

Held-out (zero-shot, no retraining) LM loss on the Wikipedia validation split of:

* **width** — hidden 576→384, ffn 1536→960, heads 9→6 in 3 query groups (2 per group):
  65.3M of 134.5M parameters (48.6 %); TP-friendly (every sharded dim divisible by 3, the
  teacher's TP size). Importance-based plan (with and without the head residual) vs plans from
  random scores of the same shape (several seeds), plus one axis at a time;
* **depth** — 30→15 layers (half the layers, 81.4M parameters; ``--depth-layers 15,11`` adds
  30→11, 67.3M, the parameter-matched half): layers dropped by block importance (``bi``), by
  single-layer loss increase (``loss``), as the contiguous block with the least loss increase
  (``block``), vs random layer subsets.

Width scores come from ``--calib-samples`` samples (one pass with hooks); the loss-based depth
metrics need one pass per layer / block start and use ``--depth-calib-samples`` samples. All
samples come from the train split; evaluation uses the validation split. The defaults keep the
run to a few minutes on 2 cores (32 / 4 calibration samples, 16 evaluation samples of 256 tokens);
the fuller run in RESULTS_pruning.md used
``--calib-samples 64 --depth-calib-samples 8 --eval-samples 32 --random-seeds 3
--depth-layers 15,11``.

    python benchmarks/prune_smollm2.py --load /tmp/smol --data-path /tmp/wiki/wiki
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

WIDTH = dict(hidden_size=384, ffn_hidden_size=960, num_attention_heads=6, num_query_groups=3)
ABLATIONS = {"ffn only": dict(ffn_hidden_size=960), "hidden only": dict(hidden_size=384),
             "heads only": dict(num_attention_heads=6, num_query_groups=3)}


def random_like(scores, seed: int):
    """Scores of the same shapes, uniformly random (a random-index plan)."""
    g = torch.Generator().manual_seed(seed)
    rand = {k: torch.rand(v.shape, generator=g) for k, v in scores.tensors().items()}
    return replace(scores, ffn=rand["ffn"], heads=rand["heads"],
                   query_groups=rand["query_groups"], hidden_norms=rand["hidden_norms"],
                   depth={k[len("depth."):]: v for k, v in rand.items()
                          if k.startswith("depth.")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", default="/tmp/smol")
    parser.add_argument("--data-path", default="/tmp/wiki/wiki")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--depth-calib-samples", type=int, default=4)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--random-seeds", type=int, default=2)
    parser.add_argument("--depth-layers", default="15",
                        help="comma-separated layer counts to keep, e.g. 15,11")
    args = parser.parse_args()

    from minitron_megatron.checkpoint import find_checkpoint, load_checkpoint
    from minitron_megatron.config import ParallelConfig
    from minitron_megatron.data.loaders import DataConfig, build_datasets
    from minitron_megatron.evaluate import eod_id_of, evaluate_model
    from minitron_megatron.importance import ImportanceConfig, estimate_importance
    from minitron_megatron.model.build import build_model
    from minitron_megatron.pruning import PruneTargets, apply_plan, make_plan
    from minitron_megatron.runtime.distributed import LaunchEnv, distributed

    started = time.perf_counter()
    info = find_checkpoint(args.load)
    cfg = info.model_config
    keep_layers = [int(x) for x in args.depth_layers.split(",")]
    data = DataConfig(data_path=args.data_path, seq_length=args.seq_length)
    run = dict(micro_batch_size=args.micro_batch_size, seq_length=args.seq_length)
    rows = []
    with distributed(LaunchEnv(), ParallelConfig()) as ps:
        datasets = build_datasets(
            data, eod_id=eod_id_of(info), vocab_size=cfg.vocab_size,
            num_samples={"train": max(args.calib_samples, args.depth_calib_samples),
                         "valid": args.eval_samples})
        teacher = build_model(cfg, ps, init_weights=False)
        load_checkpoint(info, model=teacher)

        def evaluate(model) -> float:
            return evaluate_model(model, ps, datasets["valid"], num_samples=args.eval_samples,
                                  **run).loss

        def record(axis, name, plan=None, model=None):
            if model is None:
                model, _ = apply_plan(teacher, plan, ps)
            target = plan.target if plan is not None else cfg
            rows.append({"axis": axis, "method": name, "loss": round(evaluate(model), 4),
                         "parameters": target.num_parameters(), "layers": target.num_layers})
            print(json.dumps(rows[-1]), flush=True)

        record("none", "teacher", model=teacher)
        t0 = time.perf_counter()
        scores = estimate_importance(teacher, ps, datasets["train"], model_config=cfg,
                                     num_samples=args.calib_samples, **run,
                                     config=ImportanceConfig(depth_metrics=("bi",)))
        width_s = time.perf_counter() - t0
        depth_metrics = ("loss",) + tuple(f"block:{cfg.num_layers - k}" for k in keep_layers)
        t0 = time.perf_counter()
        depth = estimate_importance(teacher, ps, datasets["train"], model_config=cfg,
                                    num_samples=args.depth_calib_samples, **run,
                                    config=ImportanceConfig(depth_metrics=depth_metrics)).depth
        depth_s = time.perf_counter() - t0
        scores = replace(scores, depth={**scores.depth, **depth})

        seeds = range(args.random_seeds)
        width = PruneTargets(**WIDTH)
        record("width", "importance", make_plan(scores, width))
        record("width", "importance + head residual",
               make_plan(scores, PruneTargets(**WIDTH, head_residual=True)))
        for seed in seeds:
            record("width", f"random (seed {seed})", make_plan(random_like(scores, seed), width))
        for name, targets in ABLATIONS.items():
            record(name, "importance", make_plan(scores, PruneTargets(**targets)))
            record(name, "random (seed 0)",
                   make_plan(random_like(scores, 0), PruneTargets(**targets)))
        for keep in keep_layers:
            for method in ("bi", "loss", "block"):
                plan = make_plan(scores, PruneTargets(num_layers=keep, depth_method=method))
                record(f"depth {keep}", f"{method} (drops {_dropped(plan, cfg)})", plan)
            for seed in seeds:
                g = torch.Generator().manual_seed(seed)
                drop = tuple(sorted(torch.randperm(cfg.num_layers, generator=g)[
                    :cfg.num_layers - keep].tolist()))
                record(f"depth {keep}", f"random (seed {seed})",
                       make_plan(scores, PruneTargets(drop_layers=drop)))
    print(json.dumps({"summary": rows, "calib_samples": args.calib_samples,
                      "depth_calib_samples": args.depth_calib_samples,
                      "eval_samples": args.eval_samples, "seq_length": args.seq_length,
                      "width_scores_s": round(width_s, 1), "depth_scores_s": round(depth_s, 1),
                      "total_s": round(time.perf_counter() - started, 1)}))


def _dropped(plan, cfg) -> str:
    kept = {layer.source for layer in plan.layers}
    return ",".join(str(i) for i in range(cfg.num_layers) if i not in kept)


if __name__ == "__main__":
    main()
