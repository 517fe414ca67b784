"""Text → Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``), one document per item.

Inputs: ``.jsonl`` (one JSON object per line), ``.json`` (an object or a list of documents) whose
documents are strings or objects with one of ``json_keys``, and ``.txt`` (documents separated by
blank lines). Each document is tokenized and followed by the end-of-document token.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path

import torch

from minitron_megatron.data.tokenizer import Tokenizer
from minitron_megatron.errors import MissingInputError, UserError

DEFAULT_JSON_KEYS = ("text", "extract", "content")


@dataclass(frozen=True)
class PreprocessStats:
    documents: int
    tokens: int
    output_prefix: str


def _text_of(item: object, keys: Sequence[str], where: str) -> str | None:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in keys:
            if isinstance(item.get(key), str):
                return item[key]
        return None
    raise UserError(f"{where}: expected a string or an object, got {type(item).__name__}")


def read_documents(path: str | Path, json_keys: Sequence[str] = DEFAULT_JSON_KEYS
                   ) -> Iterator[str]:
    """Yield the non-empty documents of a .jsonl, .json or .txt file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            items: Iterable[object] = (json.loads(line) for line in handle if line.strip())
            yield from _non_empty(items, json_keys, path)
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        items = data.values() if isinstance(data, dict) else data
        yield from _non_empty(items, json_keys, path)
    elif suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        yield from (doc.strip() for doc in text.split("\n\n") if doc.strip())
    else:
        raise UserError(f"{path}: unsupported input type {suffix!r}; use .jsonl, .json or .txt.")


def _non_empty(items: Iterable[object], keys: Sequence[str], path: Path) -> Iterator[str]:
    for i, item in enumerate(items):
        text = _text_of(item, keys, f"{path} item {i}")
        if text and text.strip():
            yield text


def preprocess(
    input_path: str | Path,
    tokenizer: Tokenizer,
    output_prefix: str | Path,
    *,
    json_keys: Sequence[str] = DEFAULT_JSON_KEYS,
    batch_size: int = 1000,
) -> PreprocessStats:
    """Tokenize ``input_path`` into ``output_prefix.{bin,idx}`` (written to temporary names and
    renamed into place, so a failed run leaves no half-written dataset)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    input_path = Path(input_path)
    if not input_path.is_file():
        raise MissingInputError(f"input {input_path} does not exist or is not a file.")
    documents = read_documents(input_path, json_keys)
    first = next(documents, None)
    if first is None:
        raise UserError(f"input {input_path} holds no documents (keys tried: {list(json_keys)});"
                         f" check the file or pass --json-keys.")
    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    n_docs = n_tokens = 0
    docs = chain([first], documents)
    while batch := list(islice(docs, batch_size)):
        for ids in tokenizer.encode_batch(batch):
            ids.append(tokenizer.eod_id)
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            n_docs += 1
            n_tokens += len(ids)
    builder.finalize(f"{tmp}.idx")
    for ext in (".bin", ".idx"):
        os.replace(f"{tmp}{ext}", f"{prefix}{ext}")
    return PreprocessStats(documents=n_docs, tokens=n_tokens, output_prefix=prefix)

