"""Importance pass (calibration forward with hooks + scoring) vs a plain forward, same batches.

Both sides run Megatron's forward-only schedule over the same calibration micro-batches with
labels (the importance pass needs the loss for its depth metrics; the plain side computes the
same loss), built from the dataset inside the timed region. Runs alternate so that machine load
affects both alike; printed: the ratio of medians, of the fastest runs, and the median of the
per-pair ratios, the ratio of median process CPU times, and the share of the importance pass
spent inside the hooks and the final reduction (timed directly, so it does not depend on other
jobs sharing the machine). Goal: ≤ 1.03 (all width axes + block importance, default aggregation).

    python benchmarks/bench_importance.py --load /tmp/smol --data-path /tmp/wiki/wiki
"""

from __future__ import annotations

import argparse
import json
import statistics
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

        def importance() -> float:
            return estimate_importance(model, ps, dataset, model_config=cfg, config=settings,
                                       num_samples=args.samples, **run).calibration_loss

        hook_s = _time_hooks()
        assert abs(plain() - importance()) < 1e-6  # warm-up; same batches, same loss
        times = {"plain": [], "importance": []}
        cpu = {"plain": [], "importance": []}
        hooks = []
        for _ in range(args.repeats):
            for name, fn in (("plain", plain), ("importance", importance)):
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
                if name == "importance":
                    hooks.append(hook_s.pop())
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
        "all_importance_s": [round(t, 3) for t in times["importance"]]}))


if __name__ == "__main__":
    main()
