"""Importance pass (calibration forward with hooks + scoring) vs a plain forward, same batches.

Both sides run Megatron's forward-only schedule over the same calibration micro-batches with
labels (the importance pass needs the loss for its depth metrics; the plain side computes the
same loss), built from the dataset inside the timed region. Runs alternate so that machine load
affects both alike; printed: the ratio of medians, of the fastest runs, and the median of the
per-pair ratios, the ratio of median process CPU times, and the share of the importance pass
spent inside the hooks and the final reduction (timed directly, so it does not depend on other
jobs sharing the machine). Goal: ≤ 1.03 (all width axes + block importance, default aggregation).
With ``--profile``, one more run of each under ``torch.profiler`` gives the self CPU time per
operator of both passes side by side, largest difference first: where the extra time goes.

    python benchmarks/bench_importance.py --load /tmp/smol --data-path /tmp/wiki/wiki
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def _time_hooks() -> list[float]:
    """Wrap the recorder's hooks with a timer; returns a list that gets each pass's seconds."""
    from minitron_megatron.importance import hooks as hooks_module

    recorder = hooks_module.ActivationRecorder
    per_pass: list[float] = []
    spent = [0.0]

    def timed(fn):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return wrapped

    add, layer_hook, finalize = recorder._add, recorder._layer_hook, recorder.finalize
    recorder._add = timed(add)
    recorder._layer_hook = lambda self, index: timed(layer_hook(self, index))

    def finalize_and_record(self):
        result = timed(finalize)(self)
        per_pass.append(spent[0])
        spent[0] = 0.0
        return result

    recorder.finalize = finalize_and_record
    return per_pass


def _profile_difference(plain, importance, rows: int) -> dict:
    """Self CPU seconds per operator in one profiled run of each pass, and their difference."""
    from torch.profiler import ProfilerActivity, profile

    per_op: dict[str, dict[str, float]] = {}
    totals = {}
    for name, fn in (("plain", plain), ("importance", importance)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            fn()
            totals[name] = time.perf_counter() - start
        for event in prof.key_averages():
            per_op.setdefault(event.key, {"plain": 0.0, "importance": 0.0})[name] += (
                event.self_cpu_time_total / 1e6)
    diff = sorted(per_op.items(), key=lambda kv: -abs(kv[1]["importance"] - kv[1]["plain"]))
    table = [f"{'operator':40} {'plain s':>9} {'import. s':>9} {'extra s':>9}"]
    for op, t in diff[:rows]:
        table.append(f"{op[:40]:40} {t['plain']:9.3f} {t['importance']:9.3f} "
                     f"{t['importance'] - t['plain']:+9.3f}")
    print("\n".join(table), flush=True)
    return {"wall_s": totals, "extra_by_operator_s": {
        op: round(t["importance"] - t["plain"], 4) for op, t in diff[:rows]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", default="/tmp/smol")
    parser.add_argument("--data-path", default="/tmp/wiki/wiki")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-agg", default="l2")
    parser.add_argument("--seq-agg", default="mean")
    parser.add_argument("--stats", action="store_true",
                        help="also time the pass with the reconstruction statistics (the input "
                             "Gram matrices `importance` writes by default)")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="also profile one run of each and print the ROWS operators whose "
                             "self CPU time differs most between the passes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1, as under torchrun: steadier on a shared machine)")
    args = parser.parse_args()

    from minitron_megatron.checkpoint import find_checkpoint, load_checkpoint
    from minitron_megatron.config import ParallelConfig
    from minitron_megatron.data.loaders import DataConfig, build_datasets, micro_batches
    from minitron_megatron.evaluate import eod_id_of
    from minitron_megatron.importance import ImportanceConfig, estimate_importance
    from minitron_megatron.importance.depth import masked_loss_sum, reduce_loss
    from minitron_megatron.model.build import build_model
    from minitron_megatron.model.forward import pipeline_forward
    from minitron_megatron.runtime.distributed import LaunchEnv, distributed

    torch.set_num_threads(args.threads)
    info = find_checkpoint(args.load)
    cfg = info.model_config
    data = DataConfig(data_path=args.data_path, seq_length=args.seq_length)
    settings = ImportanceConfig(batch_agg=args.batch_agg, seq_agg=args.seq_agg,
                                depth_metrics=("bi",))
    run = dict(seq_length=args.seq_length, micro_batch_size=args.micro_batch_size)
    with distributed(LaunchEnv(), ParallelConfig()) as ps:
        dataset = build_datasets(data, eod_id=eod_id_of(info), vocab_size=cfg.vocab_size,
                                 num_samples={"train": args.samples})["train"]
        model = build_model(cfg, ps, init_weights=False)
        load_checkpoint(info, model=model)

        def plain() -> float:
            batches = micro_batches(dataset, range(args.samples), args.micro_batch_size)
            sums = pipeline_forward(model, ps, batches, on_output=masked_loss_sum,
                                    with_labels=True, **run)
            return reduce_loss(sums, ps)

        def importance(stats_dir=None) -> float:
            return estimate_importance(model, ps, dataset, model_config=cfg, config=settings,
                                       num_samples=args.samples, stats_dir=stats_dir,
                                       **run).calibration_loss

        def with_stats() -> float:
            with tempfile.TemporaryDirectory() as stats:
                return importance(stats)

        passes = {"plain": plain, "importance": importance,
                  **({"importance + stats": with_stats} if args.stats else {})}

        hook_s = _time_hooks()
        assert abs(plain() - importance()) < 1e-6  # warm-up; same batches, same loss
        times = {name: [] for name in passes}
        cpu = {name: [] for name in passes}
        hooks = []
        for _ in range(args.repeats):
            for name, fn in passes.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
                if name == "importance":
                    hooks.append(hook_s.pop())
                elif name == "importance + stats":
                    hook_s.pop()
        profile = _profile_difference(plain, importance, args.profile) if args.profile else None
    plain_s, imp_s = (statistics.median(times[k]) for k in ("plain", "importance"))
    pairs = [i / p for i, p in zip(times["importance"], times["plain"], strict=True)]
    print(json.dumps({
        "model": str(args.load), "samples": args.samples, "seq_length": args.seq_length,
        "micro_batch_size": args.micro_batch_size, "settings": settings.to_dict(),
        "plain_forward_s": round(plain_s, 3), "importance_pass_s": round(imp_s, 3),
        "ratio": round(imp_s / plain_s, 4), "goal": 1.03,
        "ratio_of_fastest": round(min(times["importance"]) / min(times["plain"]), 4),
        "ratio_per_pair_median": round(statistics.median(pairs), 4),
        "cpu_time_ratio": round(statistics.median(cpu["importance"])
                                / statistics.median(cpu["plain"]), 4),
        "hook_share_of_importance_pass": round(statistics.median(
            h / t for h, t in zip(hooks, times["importance"], strict=True)), 4),
        "all_plain_s": [round(t, 3) for t in times["plain"]],
        "all_importance_s": [round(t, 3) for t in times["importance"]],
        **({"importance_with_stats_s": round(statistics.median(times["importance + stats"]), 3),
            "ratio_with_stats": round(statistics.median(times["importance + stats"]) / plain_s,
                                      4)} if args.stats else {}),
        **({"profile": profile} if profile else {})}))


if __name__ == "__main__":
    main()
