"""Tokenizers: a SentencePiece ``.model`` or a Hugging Face ``tokenizer.json`` (``tokenizers``).

A checkpoint carries its tokenizer in ``tokenizer/`` (the file plus ``tokenizer.yaml`` with the
special ids), so ``--tokenizer CKPT`` works anywhere a tokenizer file does.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from minitron_megatron.errors import MissingInputError, UserError

TokenizerKind = Literal["sentencepiece", "huggingface"]
_FILES = {"sentencepiece": "tokenizer.model", "huggingface": "tokenizer.json"}
_META = "tokenizer.yaml"
_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


@dataclass
class Tokenizer:
    """Text ⇄ token ids, with the end-of-document id used between documents."""

    kind: TokenizerKind
    path: Path
    eod_id: int
    bos_id: int | None = None
    add_bos: bool = False

    def __post_init__(self) -> None:
        if self.kind == "sentencepiece":
            import sentencepiece

            self._impl = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        else:
            import tokenizers

            self._impl = tokenizers.Tokenizer.from_file(str(self.path))

    @property
    def vocab_size(self) -> int:
        if self.kind == "sentencepiece":
            return self._impl.get_piece_size()
        return self._impl.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if self.kind == "sentencepiece":
            ids = self._impl.encode(text)
        else:
            ids = self._impl.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "sentencepiece":
            batch = self._impl.encode(texts)
        else:
            batch = [e.ids for e in self._impl.encode_batch(texts, add_special_tokens=False)]
        prefix = [self.bos_id] if self.add_bos and self.bos_id is not None else []
        return [prefix + ids for ids in batch]

    def decode(self, ids: list[int]) -> str:
        return self._impl.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        if self.kind == "sentencepiece":
            piece = self._impl.piece_to_id(token)
            return piece if self._impl.id_to_piece(piece) == token else None
        return self._impl.token_to_id(token)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer file and its special ids into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / _FILES[self.kind]
        if self.path.resolve() != target.resolve():
            shutil.copyfile(self.path, target)
        meta = {"kind": self.kind, "eod_id": self.eod_id, "bos_id": self.bos_id,
                "add_bos": self.add_bos}
        (directory / _META).write_text(yaml.safe_dump(meta, sort_keys=False))
        return directory

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a ``.model`` / ``tokenizer.json`` file, a directory holding one, or a
        checkpoint (its ``tokenizer/`` folder)."""
        path = Path(path)
        if not path.exists():
            raise MissingInputError(f"tokenizer {path} does not exist; pass a SentencePiece "
                                    f".model, a tokenizer.json, or a checkpoint directory.")
        if path.is_dir():
            return cls._load_dir(path)
        if path.suffix == ".model":
            return cls.from_file(path, "sentencepiece")
        if path.suffix == ".json":
            return cls.from_file(path, "huggingface")
        raise UserError(f"cannot tell the tokenizer type of {path}: expected a SentencePiece "
                        f".model or a Hugging Face tokenizer.json.")

    @classmethod
    def _load_dir(cls, directory: Path) -> Tokenizer:
        from minitron_megatron.checkpoint import TOKENIZER_DIR, CheckpointError, find_checkpoint

        if (directory / _META).is_file():
            meta = yaml.safe_load((directory / _META).read_text())
            return cls(path=directory / _FILES[meta["kind"]], **meta)
        for kind, name in _FILES.items():
            if (directory / name).is_file():
                return cls.from_file(directory / name, kind)
        try:
            info = find_checkpoint(directory)
        except CheckpointError:
            info = None
        if info is not None and info.tokenizer_dir is not None:
            return cls._load_dir(info.tokenizer_dir)
        raise MissingInputError(
            f"no tokenizer in {directory}: expected tokenizer.model, tokenizer.json or a "
            f"checkpoint with a {TOKENIZER_DIR}/ folder; pass --tokenizer explicitly."
        )

    @classmethod
    def from_file(cls, path: str | Path, kind: TokenizerKind) -> Tokenizer:
        """Load a tokenizer file, finding its end-of-document and BOS ids by name."""
        probe = cls(kind=kind, path=Path(path), eod_id=0)
        if kind == "sentencepiece":
            eod = probe._impl.eos_id()
            bos = probe._impl.bos_id()
            return cls(kind=kind, path=Path(path), eod_id=eod, bos_id=bos if bos >= 0 else None,
                       add_bos=bos >= 0)
        eod = next((i for t in _EOD_CANDIDATES if (i := probe.token_to_id(t)) is not None), None)
        if eod is None:
            raise UserError(f"{path} has none of the end-of-document tokens {_EOD_CANDIDATES}; "
                            f"add one to the tokenizer.")
        return cls(kind=kind, path=Path(path), eod_id=eod)


def byte_level_bpe_from_vocab(
    tokens: list[str], merges: list[str], special: list[int], *, digits: bool
) -> "tokenizers.Tokenizer":  # noqa: F821
    """A GPT-2 style byte-level BPE from a vocabulary and merges (as GGUF files store them)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if digits else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i in special])
    return tok
