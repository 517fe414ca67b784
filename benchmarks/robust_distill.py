"""The same short distillation of several pruned students, then the same held-out evaluation.

Each student (a minitron checkpoint: ours, or ModelOpt's pruned model imported into our format by
``prune_robust.py --save-checkpoints``) is distilled from the same teacher with the same flags —
data order, steps, LR schedule, layout — by the ``minitron distill`` CLI, then scored by
``minitron evaluate --window-starts`` on the same held-out windows::

    python benchmarks/robust_distill.py --teacher runs/teacher --data-path runs/data/wiki \\
        --student robust=runs/robust/ckpt-robust --student modelopt=runs/robust/ckpt-modelopt \\
        --work-dir runs/robust/kd --output benchmarks/robust_run/distill.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cli(args: list[str], nproc: int) -> dict:
    cmd = [sys.executable, "-m", "minitron_megatron", *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "minitron_megatron", *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print("[robust-distill]", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"{args[0]} failed (exit {proc.returncode})")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="runs/teacher")
    p.add_argument("--data-path", default="runs/data/wiki")
    p.add_argument("--student", action="append", required=True, metavar="NAME=CKPT")
    p.add_argument("--work-dir", default="runs/robust/kd")
    p.add_argument("--output", default="benchmarks/robust_run/distill.json")
    p.add_argument("--train-iters", type=int, default=64)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--eval-samples", type=int, default=48)
    p.add_argument("--nproc", type=int, default=2, help="data-parallel distillation ranks")
    p.add_argument("--skip-zero-shot", action="store_true",
                   help="evaluate only the distilled students (the zero-shot losses are in "
                        "prune_robust.py's table, on the same windows)")
    args = p.parse_args(argv)

    out = Path(args.output)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result["settings"] = {"train_iters": args.train_iters, "global_batch_size":
                          args.global_batch_size, "seq_length": 256, "lr": args.lr,
                          "nproc": args.nproc, "eval_samples": args.eval_samples}
    for spec in args.student:
        name, ckpt = spec.split("=", 1)
        if name in result.get("students", {}):
            continue  # finished in an earlier run
        save = Path(args.work_dir) / name
        start = time.perf_counter()
        _cli(["distill", "--teacher", args.teacher, "--student", ckpt, "--data-path",
              args.data_path, "--save", str(save), "--seq-length", "256",
              "--micro-batch-size", "2", "--global-batch-size", str(args.global_batch_size),
              "--train-iters", str(args.train_iters), "--lr", str(args.lr),
              "--min-lr", str(args.lr / 10),
              "--lr-warmup-iters", str(max(1, args.train_iters // 20)),
              "--lr-decay-style", "cosine", "--clip-grad", "1.0",
              "--eval-interval", str(args.train_iters), "--eval-iters", "1",
              "--save-interval", str(args.train_iters), "--log-interval", "8"], args.nproc)
        seconds = time.perf_counter() - start
        evaluated = {}
        todo = (("distilled", str(save)),) if args.skip_zero_shot else (
            ("zero_shot", ckpt), ("distilled", str(save)))
        for which, path in todo:
            evaluated[which] = _cli(["evaluate", "--load", path, "--data-path", args.data_path,
                                     "--seq-length", "256", "--eval-samples",
                                     str(args.eval_samples), "--micro-batch-size", "4",
                                     "--window-starts"], 1)
        result.setdefault("students", {})[name] = {"checkpoint": ckpt, **evaluated,
                                                   "distill_seconds": seconds}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps({name: result["students"][name]}), flush=True)
    return result


if __name__ == "__main__":
    main()
