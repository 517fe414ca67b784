"""Checksums of a checkpoint's files, written at save and verified at load, and clear errors for
the ways a load fails on a damaged or mismatched checkpoint.

``iter_NNNNNNN/checksums.sha256`` lists the SHA-256 of every other file of the iteration
directory in ``sha256sum`` format, so ``cd iter_NNNNNNN && sha256sum -c checksums.sha256`` checks
a copy without Python. Hashing is split over the ranks: the files are dealt out by size (largest
first, to the least loaded rank), each rank hashes its share and rank 0 gathers the digests (at
save) or every rank gathers the failures (at load). Every file is read once per save and once per
load whatever the layout; a rank reads ``total / world_size`` bytes. (Verifying "only what a rank
reads" would re-read the same files on many ranks after a TP/PP change, since every rank reads
byte ranges of most shard files; verifying on rank 0 alone would make the whole job wait for one
reader.) Cost and an 8B extrapolation: ``docs/errors.md``.

A checkpoint without the file (written before checksums existed, or adopted from Megatron-LM)
loads with a one-line warning.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from minitron_megatron.errors import CheckpointError, CorruptCheckpointError

MANIFEST_FILE = "checksums.sha256"
_CHUNK = 8 << 20
_VERIFIED: set[tuple[str, int, int]] = set()
"""Manifests already verified by this process (path, mtime_ns, size): a search loads its
teacher once per candidate and re-hashes it only when the files changed."""

_WARNED: set[Path] = set()
"""Checkpoints without a manifest this process has already warned about."""

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(item: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [item]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, item)
    return out


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """This rank's files: largest first, each to the least loaded rank (the same on all ranks)."""
    load = [0] * world
    mine = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += sizes[name]
        if owner == rank:
            mine.append(name)
    return mine


def write_manifest(directory: str | Path) -> None:
    """Hash every file under ``directory`` (split over the ranks) and write the manifest.
    Collective over all ranks; call it once every file of the checkpoint is written."""
    directory = Path(directory)
    rank, world = _rank_world()
    files: list[Any] = [None]
    if rank == 0:
        files[0] = {p.relative_to(directory).as_posix(): p.stat().st_size
                    for p in sorted(directory.rglob("*"))
                    if p.is_file() and p.name != MANIFEST_FILE}
    if world > 1:
        dist.broadcast_object_list(files, src=0)
    sizes = files[0]
    digests = {name: sha256_of(directory / name) for name in _share(sizes, rank, world)}
    merged = {k: v for part in _gather(digests) for k, v in part.items()}
    if rank == 0:
        text = "".join(f"{merged[name]}  {name}\n" for name in sorted(merged))
        (directory / MANIFEST_FILE).write_text(text)


def read_manifest(directory: Path) -> dict[str, str] | None:
    """``{relative path: sha256}``, or ``None`` when the checkpoint has no manifest."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    entries = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line)
        if match is None:
            raise CorruptCheckpointError(
                f"{path} line {number} is not a '<sha256>  <file>' line: the checksum file is "
                f"damaged; copy the checkpoint again (or delete {MANIFEST_FILE} to load it "
                f"unverified).")
        entries[match.group(2)] = match.group(1)
    return entries


def verify_files(directory: str | Path) -> None:
    """Check every file listed in the manifest against its checksum (split over the ranks).

    Collective over all ranks; every rank raises the same ``CorruptCheckpointError`` naming the
    first bad file. Without a manifest: a warning (rank 0) and no check."""
    directory = Path(directory)
    rank, world = _rank_world()
    entries = read_manifest(directory)
    if entries is None:
        if rank == 0 and directory.resolve() not in _WARNED:  # once per process
            _WARNED.add(directory.resolve())
            log.warning("%s has no %s (saved before checksums existed, or by another tool): "
                        "loading it unverified", directory, MANIFEST_FILE)
        return
    stat = (directory / MANIFEST_FILE).stat()
    key = (str(directory.resolve()), stat.st_mtime_ns, stat.st_size)
    if key in _VERIFIED:
        return
    sizes = {name: _size(directory / name) for name in entries}
    problems = []
    for name in _share(sizes, rank, world):
        if sizes[name] < 0:
            problems.append((name, "is missing"))
        elif sha256_of(directory / name) != entries[name]:
            problems.append((name, f"is corrupt or truncated ({sizes[name]} bytes): its "
                                   f"SHA-256 differs from the one recorded at save"))
    failed = sorted(p for part in _gather(problems) for p in part)
    if failed:
        name, what = failed[0]
        more = f" ({len(failed) - 1} more bad file(s))" if len(failed) > 1 else ""
        raise CorruptCheckpointError(
            f"checkpoint file {directory / name} {what}{more}; copy the checkpoint again from "
            f"a good copy, or re-create it (`sha256sum -c {MANIFEST_FILE}` in {directory} "
            f"lists every bad file).")
    _VERIFIED.add(key)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else -1


# ---------------------------------------------------------------------- load errors
def _unwrap(err: BaseException) -> list[BaseException]:
    """The per-rank exceptions inside torch's ``CheckpointException`` (or ``err`` itself)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        return [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return [err]


def untrusted_reason(err: BaseException) -> str:
    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    return f"it references {match.group(1)}" if match else "it holds objects a safe load refuses"


def explain_load_error(err: BaseException, directory: Path) -> CheckpointError | None:
    """A one-line ``CheckpointError`` for a load failure caused by the checkpoint's files, or
    ``None`` when ``err`` is not one (a bug keeps its traceback)."""
    from megatron.core.dist_checkpointing.core import CheckpointingException

    for inner in _unwrap(err):
        if isinstance(inner, pickle.UnpicklingError):
            return CorruptCheckpointError(
                f"{directory} is not a trusted checkpoint: a safe load refused one of its files "
                f"({untrusted_reason(inner)}); do not load it, re-create it from a source you "
                f"trust.")
        if isinstance(inner, EOFError) or (isinstance(inner, RuntimeError)
                                           and "PytorchStreamReader" in str(inner)):
            return CorruptCheckpointError(
                f"checkpoint {directory} has a truncated or corrupt file "
                f"({_short_files(directory)}); copy the checkpoint again or re-create it.")
        if isinstance(inner, CheckpointingException):
            message = " ".join(str(inner).split())
            if len(message) > 400:
                message = message[:400] + " ..."
            if "shape mismatch" in message or "not found in the checkpoint" in message:
                return CheckpointError(
                    f"checkpoint {directory} does not fit the model its {_CONFIG} describes: "
                    f"{message}; the config and the tensors disagree (an edited or swapped "
                    f"{_CONFIG}, or a wrong --model-config): restore the config saved with "
                    f"these tensors.")
    return None


_CONFIG = "model_config.yaml"


def _short_files(directory: Path) -> str:
    """Which shard files are shorter than the checkpoint's own index says (DCP ``.metadata``);
    a hint for a checkpoint without checksums."""
    try:
        from torch.distributed.checkpoint import FileSystemReader

        ends: dict[str, int] = {}
        for info in FileSystemReader(str(directory)).read_metadata().storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0),
                                           info.offset + info.length)
    except Exception:  # noqa: BLE001 - only a hint: the index itself may be what is damaged
        return "its index cannot be read"
    short = [f"{name}: {_size(directory / name)} of {end} bytes"
             for name, end in sorted(ends.items()) if _size(directory / name) < end]
    return ", ".join(short) if short else "no shard is shorter than its index says"


def verified_load(load: F) -> F:
    """Decorate ``load_checkpoint(info, ...)``: verify the files first, and turn failures caused
    by the checkpoint's files into one-line ``CheckpointError``s."""

    @functools.wraps(load)
    def wrapper(info, *args, **kwargs):
        verify_files(info.path)
        try:
            return load(info, *args, **kwargs)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # torch's CheckpointException is a BaseException
            explained = explain_load_error(err, Path(info.path))
            if explained is None:
                raise
            raise explained from None

    return wrapper  # type: ignore[return-value]
