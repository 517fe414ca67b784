"""The ``minitron`` command: parses flags, builds configs and calls library functions."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from minitron_megatron.cli import (
    convert,
    data,
    demo,
    distill,
    evaluate,
    importance,
    prune,
    search,
)

COMMANDS = (convert, data, importance, prune, search, distill, evaluate, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minitron",
        description="Prune and distill Megatron-Core GPT models the Minitron way.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def _quiet_optional_extras() -> None:
    """Megatron warns at import when TransformerEngine/apex are absent (the CPU case)."""
    for message in (".*Transformer Engine and Apex are not installed.*",
                    ".*Apex is not installed.*", ".*Transformer Engine is not installed.*"):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", module="torch.distributed.checkpoint")  # DCP deprecations


def main(argv: list[str] | None = None) -> None:
    _quiet_optional_extras()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # dataset/checkpoint chatter
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        # user mistakes: one line, no traceback
        print(f"minitron {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
