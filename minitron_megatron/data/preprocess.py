"""Text → Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``), one document per item.

Inputs: ``.jsonl`` (one JSON object per line), ``.json`` (an object or a list of documents) whose
documents are strings or objects with one of ``json_keys``, and ``.txt`` (documents separated by
blank lines). Each document is tokenized and followed by the end-of-document token. Records that
give no text (no key of ``json_keys``, a text that is not a string, an empty text) are skipped
and counted by reason; invalid JSON or non-UTF-8 input fails naming the file and line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path

import torch

from minitron_megatron.data.tokenizer import Tokenizer
from minitron_megatron.errors import MissingInputError, UserError
from minitron_megatron.output_paths import check_output_file

DEFAULT_JSON_KEYS = ("text", "extract", "content")
NO_KEY, NOT_STRING, EMPTY = "no text key", "text not a string", "empty text"

log = logging.getLogger(__name__)


@dataclass
class Skipped:
    """Records that gave no document, by reason (``NO_KEY``, ``NOT_STRING``, ``EMPTY``)."""

    counts: dict[str, int] = field(default_factory=dict)
    """How many records were skipped for each reason."""

    first: dict[str, str] = field(default_factory=dict)
    """Where the first record skipped for each reason is (e.g. ``line 3``)."""

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.first.setdefault(reason, where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self, keys: Sequence[str]) -> str:
        what = {NO_KEY: f"without any of the keys {list(keys)}",
                NOT_STRING: "whose text is not a string", EMPTY: "with an empty text"}
        return ", ".join(f"{n} {what[r]} (first at {self.first[r]})"
                         for r, n in self.counts.items())


@dataclass(frozen=True)
class PreprocessStats:
    documents: int
    tokens: int
    output_prefix: str
    skipped: dict[str, int] = field(default_factory=dict)
    """Records skipped, by reason."""


def _text_of(item: object, keys: Sequence[str], where: str) -> tuple[str | None, str | None]:
    """``(text, None)`` or ``(None, reason it was skipped)``."""
    if isinstance(item, str):
        return (item, None) if item.strip() else (None, EMPTY)
    if isinstance(item, dict):
        present = [key for key in keys if key in item]
        text = next((item[key] for key in present if isinstance(item[key], str)), None)
        if text is None:
            return None, NOT_STRING if present else NO_KEY
        return (text, None) if text.strip() else (None, EMPTY)
    raise UserError(f"{where}: expected a string or an object, got {type(item).__name__}; "
                    f"each record must be a document.")


def _decode(raw: bytes, path: Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        offset = err.start
        line += raw.count(b"\n", 0, offset)
        raise UserError(f"{path} line {line} is not UTF-8 text (byte 0x{raw[offset]:02x}); pass a "
                        f"UTF-8 .jsonl, .json or .txt file (is it a binary file?).") from None


def _jsonl_items(path: Path) -> Iterator[tuple[object, str]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            line = _decode(raw, path, number)
            if not line.strip():
                continue
            try:
                yield json.loads(line), f"line {number}"
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {number} is not valid JSON ({err.msg}: column "
                                f"{err.colno}); fix or remove that line.") from None


def _json_items(path: Path) -> Iterator[tuple[object, str]]:
    try:
        data = json.loads(_decode(path.read_bytes(), path, 1))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg}: line {err.lineno} column "
                        f"{err.colno}); fix the file (one JSON object per line belongs in a "
                        f".jsonl file).") from None
    if isinstance(data, dict):
        yield from ((value, f"key {key!r}") for key, value in data.items())
    elif isinstance(data, list):
        yield from ((value, f"item {i}") for i, value in enumerate(data))
    else:
        raise UserError(f"{path} holds a JSON {type(data).__name__}; expected an object or a "
                        f"list of documents.")


def read_documents(path: str | Path, json_keys: Sequence[str] = DEFAULT_JSON_KEYS,
                   skipped: Skipped | None = None) -> Iterator[str]:
    """Yield the non-empty documents of a .jsonl, .json or .txt file; records without one are
    counted in ``skipped``."""
    path = Path(path)
    suffix = path.suffix.lower()
    skipped = skipped if skipped is not None else Skipped()
    if suffix in (".jsonl", ".json"):
        items = _jsonl_items(path) if suffix == ".jsonl" else _json_items(path)
        yield from _documents(items, json_keys, path, skipped)
    elif suffix == ".txt":
        text = _decode(path.read_bytes(), path, 1)
        yield from (doc.strip() for doc in text.split("\n\n") if doc.strip())
    else:
        raise UserError(f"{path}: unsupported input type {suffix!r}; use .jsonl, .json or .txt.")


def _documents(items: Iterable[tuple[object, str]], keys: Sequence[str], path: Path,
               skipped: Skipped) -> Iterator[str]:
    for item, where in items:
        text, reason = _text_of(item, keys, f"{path} {where}")
        if text is None:
            skipped.add(reason, where)
        else:
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
    renamed into place, so a failed run leaves no half-written dataset and no temporary file)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    input_path = Path(input_path)
    if not input_path.is_file():
        raise MissingInputError(f"input {input_path} does not exist or is not a file.")
    prefix = str(output_prefix)
    check_output_file(f"{prefix}.bin", "--output-prefix")
    skipped = Skipped()
    documents = read_documents(input_path, json_keys, skipped)
    first = next(documents, None)
    n_docs = n_tokens = 0
    tmp = f"{prefix}.tmp{os.getpid()}"
    builder = None
    try:
        if first is None:
            what = f": {skipped.total} records skipped, {skipped.describe(json_keys)}" \
                if skipped.total else ""
            raise UserError(f"input {input_path} holds no documents{what}; check the file or "
                            f"pass --json-keys.")
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        builder = IndexedDatasetBuilder(f"{tmp}.bin",
                                        dtype=DType.optimal_dtype(tokenizer.vocab_size))
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
    finally:
        if builder is not None:  # finalize() closes it; a failed build must not leak it
            builder.data_file.close()
        for ext in (".bin", ".idx"):
            if os.path.exists(f"{tmp}{ext}"):
                os.remove(f"{tmp}{ext}")
    if skipped.total:
        log.warning("skipped %d of %d records of %s: %s", skipped.total, skipped.total + n_docs,
                    input_path, skipped.describe(json_keys))
    return PreprocessStats(documents=n_docs, tokens=n_tokens, output_prefix=prefix,
                           skipped=dict(skipped.counts))
