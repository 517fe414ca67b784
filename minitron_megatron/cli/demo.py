"""``minitron demo``: the end-to-end run on the real teacher and corpus (the README's main job)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="end-to-end run on SmolLM2-135M and Wikipedia text")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="tiny budgets (CI smoke test)")
    p.add_argument("--nproc", type=int, default=3,
                   help="tensor-parallel ranks of the evaluate/importance/prune stages (1 or 3)")
    p.add_argument("--distill-nproc", type=int, default=2,
                   help="data-parallel ranks of the distillation")
    p.add_argument("--distill-iters", type=int, default=None,
                   help="distillation steps (default 80; a longer run recovers more)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from minitron_megatron.demo import Demo, DemoConfig

    extra = {} if args.distill_iters is None else {"distill_iters": args.distill_iters}
    Demo(DemoConfig(output_dir=Path(args.output_dir), quick=args.quick, nproc=args.nproc,
                    distill_nproc=args.distill_nproc, **extra)).run()
