"""Prune + save vs a plain load + save of the same checkpoint (goal: ratio ≤ 1.5).

Each run is a fresh process (so neither side profits from the other's caches): the plain side
builds the model, loads the checkpoint and saves it again; the prune side builds, loads, applies a
plan (SmolLM2-135M to about half its parameters: hidden 384, ffn 960, 6 heads in 3 query groups)
and saves the pruned checkpoint. The plan is made from random scores of the right shapes (which
indices are kept does not change the work). Runs alternate; printed: median wall and CPU times,
their ratios, and each side's peak resident memory.

    python benchmarks/bench_prune.py --load /tmp/smol --work-dir /tmp/bench_prune
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import time
from pathlib import Path

import torch

TARGETS = dict(hidden_size=384, ffn_hidden_size=960, num_attention_heads=6, num_query_groups=3)


def random_scores(cfg, seed: int = 0):
    from minitron_megatron.importance import ImportanceConfig, Scores

    g = torch.Generator().manual_seed(seed)
    L = cfg.num_layers
    return Scores(model_config=cfg, settings=ImportanceConfig(),
                  ffn=torch.rand(L, cfg.ffn_hidden_size, generator=g),
                  heads=torch.rand(L, cfg.num_attention_heads, generator=g),
                  query_groups=torch.rand(L, cfg.num_query_groups, generator=g),
                  hidden_norms=torch.rand(L, 2, cfg.hidden_size, generator=g),
                  depth={"bi": torch.rand(L, generator=g)})


def one_run(env, kind: str, load: str, out: str):
    """In a fresh process: (wall s, cpu s, peak RSS MiB, parameters written)."""
    from minitron_megatron.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
    from minitron_megatron.config import ParallelConfig
    from minitron_megatron.model.build import build_model
    from minitron_megatron.pruning import PruneTargets, make_plan, prune_checkpoint
    from minitron_megatron.runtime.distributed import distributed

    with distributed(env, ParallelConfig()) as ps:
        info = find_checkpoint(load)
        plan = make_plan(random_scores(info.model_config), PruneTargets(**TARGETS))
        start, start_cpu = time.perf_counter(), time.process_time()
        if kind == "plain":
            model = build_model(info.model_config, ps, init_weights=False)
            load_checkpoint(info, model=model)
            save_checkpoint(out, model=model, model_config=info.model_config,
                            tokenizer_dir=info.tokenizer_dir)
            params = info.model_config.num_parameters()
        else:
            prune_checkpoint(info, plan, out, ps)
            params = plan.target.num_parameters()
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return [wall, cpu, peak_mib, params]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", default="/tmp/smol")
    parser.add_argument("--work-dir", default="/tmp/bench_prune")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from minitron_megatron.testing.multiprocess import run_distributed

    work = Path(args.work_dir)
    results: dict[str, list] = {"plain": [], "prune": []}
    for i in range(args.repeats):
        for kind in ("plain", "prune"):
            out = work / f"{kind}_{i}"
            results[kind].append(run_distributed(one_run, 1, kind, args.load, str(out),
                                                 timeout=1800)[0])
            shutil.rmtree(out, ignore_errors=True)

    def median(kind, col):
        return statistics.median(r[col] for r in results[kind])

    print(json.dumps({
        "model": args.load, "targets": TARGETS,
        "source_parameters": results["plain"][0][3], "pruned_parameters": results["prune"][0][3],
        "plain_load_save_s": round(median("plain", 0), 2),
        "prune_save_s": round(median("prune", 0), 2),
        "ratio": round(median("prune", 0) / median("plain", 0), 3), "goal": 1.5,
        "cpu_time_ratio": round(median("prune", 1) / median("plain", 1), 3),
        "peak_rss_mib": {"plain": round(median("plain", 2)), "prune": round(median("prune", 2))},
        "all_wall_s": {k: [round(r[0], 2) for r in v] for k, v in results.items()}}))


if __name__ == "__main__":
    main()
