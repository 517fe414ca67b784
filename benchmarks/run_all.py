"""Every benchmark in one run on the real SmolLM2-135M teacher and Wikipedia text: a ratio table.

Prepares the teacher and the data in ``--work-dir`` (import + preprocess, reused when present),
then runs each benchmark as its own process (so they do not share allocator state or threads)
and prints one table. Ratios are measured side by side inside each benchmark; nothing is asserted.

    python benchmarks/run_all.py [--work-dir runs/bench] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


STEADY_ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
                    "MALLOC_TOP_PAD_": str(1 << 30)}
"""glibc malloc keeps freed memory for reuse instead of unmapping it. Without this every
logits-sized temporary (≥ 32 MB: always its own mmap) is page-faulted in afresh on each
micro-batch, and how many smaller ones are depends on the heap's history: the same forward then
varies by 10-20 % within one process (0.1-0.9 M minor faults, 1-3 s of system time per 8
samples). GPU runs never pay this (the CUDA caching allocator reuses blocks). Used for the
timing benchmarks, not the memory one; a value already in the environment wins."""


def _run(args: list[str], *, module: bool = False, steady: bool = False) -> dict:
    cmd = [sys.executable, "-m", *args] if module else [sys.executable, *args]
    env = {**(STEADY_ALLOCATOR if steady else {}), **os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    print("[bench]", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise RuntimeError(f"benchmark {args[0]} failed (exit {proc.returncode})")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    out = json.loads(lines[-1]) if lines else {}
    out["_seconds"] = time.perf_counter() - start
    return out


def prepare(work: Path) -> tuple[Path, Path]:
    from minitron_megatron.data.assets import smollm2_gguf, wikipedia_corpus

    teacher, data = work / "teacher", work / "data" / "wiki"
    if not (teacher / "latest_checkpointed_iteration.txt").is_file():
        _run(["minitron_megatron", "import-hf", "--hf-path", str(smollm2_gguf()),
              "--save", str(teacher)], module=True)
    if not Path(f"{data}.idx").is_file():
        _run(["minitron_megatron", "preprocess", "--input", str(wikipedia_corpus()),
              "--tokenizer", str(teacher), "--output-prefix", str(data)], module=True)
    return teacher, data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default="runs/bench")
    p.add_argument("--quick", action="store_true", help="small sample counts (smoke run)")
    args = p.parse_args()
    work = Path(args.work_dir)
    teacher, data = prepare(work)
    small = args.quick
    common = ["--load", str(teacher), "--data-path", str(data)]
    rows = []

    side = _run(["benchmarks/vs_modelopt.py", *common, "--save", str(work / "pruned"),
                 "--calib-samples", "8" if small else "64",
                 "--eval-samples", "8" if small else "32"], steady=True)
    if "modelopt_seconds" in side:
        stages = side["ours_stages_seconds"]
        rows.append(("prune vs ModelOpt 0.43.0 (same target, samples): wall time ours / ModelOpt "
                     "— the paper's method (scores, sliced), ModelOpt's work "
                     f"[medians of {len(side['runs_seconds']['plain'])} alternating runs, "
                     f"{side['timing_threads']} thread(s)]",
                     f"{side['time_ratio_ours_paper_over_modelopt']:.3f}", "≤ 1.0"))
        rows.append(("  — each / a plain forward over the same batches: ours (paper's method) | "
                     "ModelOpt's prune call",
                     f"{side['time_ratio_ours_paper_over_plain']:.3f} | "
                     f"{side['time_ratio_modelopt_over_plain']:.3f}", "reference"))
        rows.append(("  — ours by default (+ Gram statistics, least-squares refit) "
                     f"[calibration {stages['importance']:.0f} s, prune {stages['prune']:.0f} s]",
                     f"{side['time_ratio_ours_over_modelopt']:.3f}", "reference"))
        rows.append(("zero-shot held-out loss, ours | ours paper's method | ModelOpt "
                     f"({side['pruned_parameters'] / 1e6:.1f}M params)",
                     f"{side['ours_loss']:.3f} | {side['ours_paper_loss']:.3f} | "
                     f"{side['modelopt_loss']:.3f}", "ours lower"))
        rows.append(("zero-shot window-start spread (nats), ours | ModelOpt",
                     f"{side['ours_window_starts']['spread']:.3f} | "
                     f"{side['modelopt_window_starts']['spread']:.3f}", "ours ≤ 0.2"))
    imp = _run(["benchmarks/bench_importance.py", *common, "--samples", "8" if small else "16",
                "--repeats", "2" if small else "5", "--stats"], steady=True)
    rows.append(("importance pass / plain forward (same batches)", f"{imp['ratio']:.3f}",
                 "≤ 1.03"))
    rows.append(("  — with the reconstruction statistics (the default `importance`)",
                 f"{imp['ratio_with_stats']:.3f}", "reference"))
    prune = _run(["benchmarks/bench_prune.py", "--load", str(teacher), "--work-dir",
                  str(work / "bench_prune"), "--repeats", "1" if small else "3"], steady=True)
    rows.append(("prune + save / load + save", f"{prune['ratio']:.3f}", "≤ 1.5"))
    step = _run(["benchmarks/kd_step_time.py", "--teacher", str(teacher), "--student",
                 str(work / "pruned"), "--data-path", str(data), "--steps",
                 "2" if small else "6"], steady=True)
    rows.append(("KD step / CE step ÷ FLOP-ideal (2·N_t + 6·N_s)/(6·N_s)",
                 f"{step['ratio_over_ideal']:.3f}", "≤ 1.05"))
    memory = _run(["benchmarks/kd_loss_memory.py", *(["--tokens", "512"] if small else [])])
    for name, copies in memory["copies"].items():
        rows.append((f"KD loss peak extra memory, {name} (copies of the logits)",
                     f"{copies:.2f}", "≤ 1.0" if name.startswith("ours") else "reference"))

    width = max(len(r[0]) for r in rows)
    print(f"\n{'benchmark':{width}} | measured | goal")
    print(f"{'-' * width}-|----------|------")
    for name, value, goal in rows:
        print(f"{name:{width}} | {value:>8} | {goal}")
    (work / "benchmarks.json").write_text(json.dumps(
        {"vs_modelopt": side, "importance": imp, "prune": prune, "kd_step": step,
         "kd_memory": memory}, indent=2))


if __name__ == "__main__":
    main()
