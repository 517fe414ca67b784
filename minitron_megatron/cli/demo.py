"""``minitron demo``: the end-to-end run on the real teacher and corpus (the README's main job)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="end-to-end run on SmolLM2-135M and Wikipedia text")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="tiny budgets (CI smoke test)")
    p.add_argument("--nproc", type=int, default=3, help="ranks of the parallel stages")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from minitron_megatron.demo import Demo, DemoConfig

    Demo(DemoConfig(output_dir=Path(args.output_dir), quick=args.quick, nproc=args.nproc)).run()
