"""What the teacher cache buys and costs on SmolLM2-135M, side by side in one run.

1. **Search time**: the same 4-candidate search (4 shapes within 67M ± 3 %, each distilled for
   ``--candidate-train-iters`` steps) with the live teacher and ``--kd-top-k 64``, and with
   ``teacher-cache --cache-top-k 64`` once followed by ``search --teacher-cache`` (two
   commands), and with ``search --cache-teacher`` (the search builds the cache itself with the
   teacher it loads for the zero-shot losses). With ``T`` the cache build and ``S`` one
   candidate of the cached search, the goal is
   ``(T + search_cached) / search_live ≤ (T + N·S) / (N·(T + S)) × 1.1``.
2. **Quality of top-k**: one pruned candidate distilled for ``--quality-iters`` steps with the
   full-vocabulary KD, the live ``--kd-top-k k`` and the cached top-k (one k = 256 fp16 cache
   read at k), k ∈ {16, 64, 256}; every student evaluated with ``--window-starts`` on the same
   held-out windows (as sampled and at document starts).
3. **Bytes per token** of the caches, stated and measured on disk.

Every stage is the ``minitron`` CLI, as a user runs it::

    python benchmarks/teacher_cache.py --teacher runs/teacher --data-path runs/data/wiki \\
        --work-dir runs/tcache --output benchmarks/teacher_cache_run/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPACE = ("num_layers: [30, 27]\nhidden_size: [448, 512]\nffn_hidden_size: [576, 768]\n"
         "num_attention_heads: [6, 9]\n")
"""Four shapes of SmolLM2 within 67M ± 3 % (L30-H448-F576-A9, L27-H448-F768-A9,
L30-H448-F768-A6, L27-H512-F576-A6)."""
TOP_K = (16, 64, 256)
LOGS: list[Path] = []
"""Where ``cli`` keeps each command's output (the per-step times of a search), set by ``main``."""


def cli(args: list[str]) -> tuple[dict, float]:
    """``minitron ARGS`` in a fresh process: (its last JSON line, wall seconds)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print("[teacher-cache]", " ".join(args), flush=True)
    # the previous command's checkpoints (GBs with --keep-all) are written back before this one
    # starts, not while it runs: else whichever command comes later pays for that writeback
    os.sync()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "minitron_megatron", *args],
                          capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if LOGS:
        LOGS[0].mkdir(parents=True, exist_ok=True)
        n = len(list(LOGS[0].iterdir()))
        (LOGS[0] / f"{n:02d}-{args[0]}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"minitron {args[0]} failed (exit {proc.returncode})")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return (json.loads(lines[-1]) if lines else {}), seconds


def disk_bytes_per_token(cache: Path, tokens: int) -> float:
    return sum(f.stat().st_size for f in (cache / "shards").iterdir()) / tokens


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="runs/teacher")
    p.add_argument("--data-path", default="runs/data/wiki")
    p.add_argument("--work-dir", default="runs/tcache")
    p.add_argument("--output", default="benchmarks/teacher_cache_run/results.json")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--candidate-train-iters", type=int, default=16)
    p.add_argument("--quality-iters", type=int, default=32)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--parts", default="search,quality",
                   help="which halves to run (each merges into --output)")
    p.add_argument("--live-top-k", default=",".join(map(str, TOP_K)),
                   help="the k of the live --kd-top-k runs beside the cached ones")
    p.add_argument("--quality-runs", default="",
                   help="only these quality rows (e.g. 'cached top-256,live top-16'), kept "
                        "beside those already in --output; the k=256 cache is reused if there")
    p.add_argument("--cached-first", action="store_true",
                   help="run the cache build and the cached search before the live search "
                        "(the default order is live first): a second run in the other order "
                        "shows what the position in the run costs")
    p.add_argument("--cache-ways", default="command,in-search",
                   help="how the cached searches get their cache: 'command' (teacher-cache, "
                        "then search --teacher-cache), 'in-search' (search --cache-teacher); "
                        "each listed runs after the live search (before it with --cached-first)")
    p.add_argument("--quick", action="store_true", help="tiny budgets (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.seq_length, args.candidate_train_iters, args.quality_iters = 64, 2, 2
        args.eval_samples, args.calib_samples = 4, 4
    work, out = Path(args.work_dir), Path(args.output)
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "logs", ignore_errors=True)
    LOGS[:] = [work / "logs"]
    out.parent.mkdir(parents=True, exist_ok=True)
    gbs, seq = args.global_batch_size, args.seq_length
    data = ["--data-path", args.data_path, "--seq-length", str(seq)]
    sched = ["--global-batch-size", str(gbs), "--micro-batch-size", str(min(gbs, 4)),
             "--lr", "6e-4", "--min-lr", "6e-5", "--lr-decay-style", "cosine",
             "--clip-grad", "1.0"]

    def warmup(steps: int) -> list[str]:
        return ["--lr-warmup-iters", str(min(2, steps - 1))]

    parts = set(args.parts.split(","))
    result: dict = json.loads(out.read_text()) if out.is_file() and parts != {
        "search", "quality"} else {}
    result["settings"] = vars(args)

    # 1. the search, live vs cached
    scores, space = work / "scores.safetensors", work / "space.yaml"
    space.write_text(SPACE)
    if not scores.is_file():
        cli(["importance", "--load", args.teacher, *data, "--calib-samples",
             str(args.calib_samples), "--micro-batch-size", "4", "--save-scores", str(scores)])
    if "search" in parts:
        search_part(args, result, work, out, data, sched, warmup(args.candidate_train_iters))
    if "quality" in parts:
        quality_part(args, result, work, out, data, sched, warmup(args.quality_iters))
    print(report(result), flush=True)
    return result


def _goal(build_s: float, cached_s: float, n: int) -> float:
    """``(T + N·S) / (N·(T + S)) × 1.1`` with ``T = build_s`` and ``S`` one cached candidate."""
    per_candidate = cached_s / n
    return (build_s + n * per_candidate) / (n * (build_s + per_candidate)) * 1.1


def _in_search_build_s(log: Path) -> float:
    """The cache build's seconds as the search reports them ("teacher cache: ... (12.3 s")."""
    match = re.search(r"teacher cache: top-\d+ \w+ logits .*?\(([\d.]+) s,", log.read_text())
    if match is None:
        raise RuntimeError(f"{log} has no teacher-cache line")
    return float(match.group(1))


def search_part(args, result, work, out, data, sched, warmup) -> None:
    """The same search with the live teacher and from a cache built for it: wall times."""
    gbs, seq = args.global_batch_size, args.seq_length
    scores, space = work / "scores.safetensors", work / "space.yaml"
    search = ["search", "--load", args.teacher, "--scores", str(scores), "--search-space",
              str(space), "--target-params", "67M", "--params-tolerance", "0.03",
              "--candidate-train-iters", str(args.candidate_train_iters),
              "--candidate-eval-iters", str(max(1, args.eval_samples // gbs)), "--keep-all",
              *data, *sched, *warmup]
    iters = args.candidate_train_iters
    cache64 = work / "cache-k64"
    ways = [w.strip() for w in args.cache_ways.split(",") if w.strip()]
    for stale in ("search-live", "search-cached", "search-in-search", cache64.name):
        shutil.rmtree(work / stale, ignore_errors=True)  # every time below is a fresh run
    times: dict[str, float] = {}

    def run_live() -> None:
        times["live"] = cli([*search, "--save", str(work / "search-live"),
                             "--kd-top-k", "64"])[1]

    def run_command() -> None:
        times["build"] = cli(["teacher-cache", "--teacher", args.teacher, "--save",
                              str(cache64), "--cache-top-k", "64", "--train-iters", str(iters),
                              "--global-batch-size", str(gbs), "--micro-batch-size", "4",
                              *data])[1]
        times["cached"] = cli([*search, "--save", str(work / "search-cached"),
                               "--teacher-cache", str(cache64)])[1]

    def run_in_search() -> None:
        times["in_search"] = cli([*search, "--save", str(work / "search-in-search"),
                                  "--cache-teacher", "--cache-top-k", "64"])[1]
        times["in_search_build"] = _in_search_build_s(sorted(LOGS[0].iterdir())[-1])

    runs = [{"command": run_command, "in-search": run_in_search}[w] for w in ways]
    for run in ([*runs, run_live] if args.cached_first else [run_live, *runs]):
        run()
    live = json.loads((work / "search-live" / "search_results.json").read_text())
    n = len(live["candidates"])

    def ranking(d: str) -> list[str]:
        found = json.loads((work / d / "search_results.json").read_text())["candidates"]
        return [c["name"] for c in sorted(found, key=lambda c: c["rank"])]

    def post_kd(d: str) -> dict[str, float]:
        found = json.loads((work / d / "search_results.json").read_text())["candidates"]
        return {c["name"]: c["post_kd_loss"] for c in found}

    result["search"] = {
        "order": "cached first" if args.cached_first else "live first", "ways": ways,
        "malloc": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "candidates": n, "live_s": times["live"], "ranking_live": ranking("search-live"),
        "post_kd_live": post_kd("search-live")}
    if "build" in times:
        result["search"].update({
            "cache_build_s": times["build"], "cached_s": times["cached"],
            "ratio": (times["build"] + times["cached"]) / times["live"],
            "goal": _goal(times["build"], times["cached"], n),
            "ranking_cached": ranking("search-cached"),
            "post_kd_cached": post_kd("search-cached")})
        result["bytes_per_token"] = {"k=64 fp16": {
            "stated": 64 * 6 + 4, "on_disk": disk_bytes_per_token(cache64, iters * gbs * seq)}}
    if "in_search" in times:
        build = times["in_search_build"]
        result["search"]["in_search"] = {
            "total_s": times["in_search"], "cache_build_s": build,
            "ratio": times["in_search"] / times["live"],
            "goal": _goal(build, times["in_search"] - build, n),
            "ranking": ranking("search-in-search"), "post_kd": post_kd("search-in-search")}
    out.write_text(json.dumps(result, indent=1))


def quality_part(args, result, work, out, data, sched, warmup) -> None:
    """One pruned candidate distilled with full KD, live top-k and cached top-k: held-out loss."""
    gbs, seq = args.global_batch_size, args.seq_length
    cache256 = work / "cache-k256"
    student = work / "search-cached" / "candidates" / result["search"]["ranking_live"][0] \
        / "pruned"
    wanted = {name.strip() for name in args.quality_runs.split(",") if name.strip()}
    old = result.get("quality") or {}
    if not wanted or old.get("student") != str(student):  # every row from a fresh cache
        shutil.rmtree(cache256, ignore_errors=True)
        old = {}
    q = args.quality_iters
    _, build256 = cli(["teacher-cache", "--teacher", args.teacher, "--save", str(cache256),
                       "--cache-top-k", "256", "--train-iters", str(q),
                       "--global-batch-size", str(gbs), "--micro-batch-size", "4", *data])
    runs = {"full KD": ["--teacher", args.teacher]}
    live = {int(k) for k in args.live_top_k.split(",") if k}
    for k in TOP_K:
        if k in live:
            runs[f"live top-{k}"] = ["--teacher", args.teacher, "--kd-top-k", str(k)]
        runs[f"cached top-{k}"] = ["--teacher-cache", str(cache256), "--kd-top-k", str(k)]
    quality = result["quality"] = {"student": str(student), "cache_build_s": build256, **old}
    for name, source in runs.items():
        if wanted and name not in wanted:
            continue
        save = work / "kd" / name.replace(" ", "-")
        shutil.rmtree(save, ignore_errors=True)
        _, seconds = cli(["distill", "--student", str(student), *source, "--save", str(save),
                          "--train-iters", str(q), *data,
                          *sched, *warmup, "--save-interval", str(q),
                          "--log-interval", str(q)])
        evaluated, _ = cli(["evaluate", "--load", str(save), *data, "--eval-samples",
                            str(args.eval_samples), "--micro-batch-size", "4",
                            "--window-starts"])
        quality[name] = {"seconds": seconds, "loss": evaluated["loss"],
                         **evaluated.get("window_starts", {})}
        out.write_text(json.dumps(result, indent=1))

    result.setdefault("bytes_per_token", {})["k=256 fp16"] = {
        "stated": 256 * 6 + 4, "on_disk": disk_bytes_per_token(cache256, q * gbs * seq)}
    out.write_text(json.dumps(result, indent=1))


def report(r: dict) -> str:
    s = r["search"]
    lines = ["| measure | value |", "|---|---:|",
             f"| search, live teacher + --kd-top-k 64 (s) | {s['live_s']:.1f} |"]
    if "cached_s" in s:
        lines += [f"| teacher-cache build T (s) | {s['cache_build_s']:.1f} |",
                  f"| search reading the cache (s) | {s['cached_s']:.1f} |",
                  f"| (T + cached) / live | **{s['ratio']:.3f}** (goal ≤ {s['goal']:.3f}) |",
                  f"| same ranking | {s['ranking_live'] == s['ranking_cached']} |"]
    if "in_search" in s:
        i = s["in_search"]
        lines += [f"| search --cache-teacher (s; its build T) | {i['total_s']:.1f} "
                  f"({i['cache_build_s']:.1f}) |",
                  f"| in-search / live | **{i['ratio']:.3f}** (goal ≤ {i['goal']:.3f}) |",
                  f"| same ranking | {s['ranking_live'] == i['ranking']} |"]
    lines += ["", "| distillation | loss | as sampled | doc start | s |",
              "|---|---:|---:|---:|---:|"]
    for name, q in r.get("quality", {}).items():
        if isinstance(q, dict):
            lines.append(f"| {name} | {q['loss']:.4f} | {q.get('as_sampled', float('nan')):.4f} "
                         f"| {q.get('doc_start', float('nan')):.4f} | {q['seconds']:.0f} |")
    lines += ["", "| cache | bytes/token stated | on disk |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['stated']} | {v['on_disk']:.1f} |"
              for k, v in r.get("bytes_per_token", {}).items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
