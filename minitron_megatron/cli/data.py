"""``minitron preprocess``."""

from __future__ import annotations

import argparse
import json

from minitron_megatron.data.preprocess import DEFAULT_JSON_KEYS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="text (.jsonl/.json/.txt) → Megatron indexed dataset")
    p.add_argument("--input", required=True,
                   help="text file: .jsonl (one JSON object per line), .json or .txt")
    p.add_argument("--tokenizer", required=True,
                   help="SentencePiece .model, HF tokenizer.json, or a checkpoint directory")
    p.add_argument("--output-prefix", required=True,
                   help="dataset prefix to write: PREFIX.bin and PREFIX.idx")
    p.add_argument("--json-keys", default=",".join(DEFAULT_JSON_KEYS),
                   help="keys tried, in order, for a document's text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from minitron_megatron.data.preprocess import preprocess
    from minitron_megatron.data.tokenizer import Tokenizer

    stats = preprocess(args.input, Tokenizer.load(args.tokenizer), args.output_prefix,
                       json_keys=tuple(args.json_keys.split(",")))
    print(json.dumps({"documents": stats.documents, "tokens": stats.tokens,
                      "output_prefix": stats.output_prefix, "skipped": stats.skipped}))
