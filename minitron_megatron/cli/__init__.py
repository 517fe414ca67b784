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
    teacher_cache,
)
from minitron_megatron.errors import UserError

COMMANDS = (convert, data, importance, prune, search, teacher_cache, distill, evaluate, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minitron",
        description="Prune and distill Megatron-Core GPT models the Minitron way.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def quiet_third_party_warnings() -> None:
    """Silence warnings a user cannot act on: those of Megatron-Core (TransformerEngine/apex
    absent, ``cuda_graph_scope``, ``load_state_dict`` deprecations, ...), torch and every other
    library; warnings raised by this package's own modules still show. Only at this edge, and
    only when the user set no ``-W``/``PYTHONWARNINGS`` of their own: library code and the
    tests see every warning."""
    if sys.warnoptions:
        return
    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", module=r"minitron_megatron(\.|$)")


class _NoLibraryDeprecations(logging.Filter):
    """Drops Megatron-Core's logged deprecation notices (0.19 logs "GPTModel IS DEPRECATED ..."
    at every model build): about its own API, nothing a user of this package can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("megatron")
                    and "deprecat" in record.getMessage().lower())


def main(argv: list[str] | None = None) -> None:
    quiet_third_party_warnings()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # dataset/checkpoint chatter
    for handler in logging.getLogger().handlers:
        handler.addFilter(_NoLibraryDeprecations())
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as err:
        # a user mistake: one line, no traceback (anything else is a bug and keeps its traceback)
        message = " ".join(str(err).split("\n"))
        print(f"minitron {args.command}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
