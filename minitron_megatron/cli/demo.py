"""``minitron demo``: the end-to-end run on the real teacher and corpus (the README's main job)."""

from __future__ import annotations

import argparse
from pathlib import Path

from minitron_megatron.cli.options import ConfigOptions


def _options() -> ConfigOptions:
    from minitron_megatron.demo import DemoConfig

    return ConfigOptions(DemoConfig, only=("quick", "nproc", "distill_nproc", "distill_iters"))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="end-to-end run on SmolLM2-135M and Wikipedia text")
    p.add_argument("--output-dir", default="runs/demo",
                   help="directory of every stage's checkpoints, data, report and plot "
                        "(default: runs/demo)")
    _options().add(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from minitron_megatron.demo import Demo

    Demo(_options().build(args, output_dir=Path(args.output_dir))).run()
