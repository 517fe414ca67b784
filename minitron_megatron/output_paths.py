"""Output paths: checked before any work, never mixed with what was there, replaced atomically.

* ``check_output_dir`` / ``check_output_file``: the path can be created (no regular file where
  a directory must be), with the flag named in the error.
* ``check_replaceable``: a directory that already holds files is refused unless ``overwrite``.
* ``replacing_directory``: write into a staging sibling, then swap it into place with renames,
  so the target is either the old contents or the new ones, never a mix or a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from minitron_megatron.errors import UserError


def _blocking_file(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` that is not a directory (``None`` if none)."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output_dir(path: str | Path, flag: str) -> None:
    """``path`` is, or can be created as, a directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; pass a directory (a new or empty one).")
    _check_parents(path, flag)


def check_output_file(path: str | Path, flag: str) -> None:
    """``path`` is, or can be created as, a regular file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; pass a file path.")
    _check_parents(path, flag)


def _check_parents(path: Path, flag: str) -> None:
    blocker = _blocking_file(path)
    if blocker is not None:
        raise UserError(f"{flag} {path} cannot be created: {blocker} is a file, not a directory; "
                        f"choose a path under a directory.")


def check_replaceable(path: str | Path, flag: str, *, overwrite: bool) -> None:
    """Refuse a directory that already holds something unless ``overwrite``."""
    path = Path(path)
    check_output_dir(path, flag)
    if path.is_dir() and not overwrite:
        entries = sorted(p.name for p in path.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise UserError(f"{flag} {path} already holds files ({shown}); pass --overwrite to "
                            f"replace it (atomically), or choose a new or empty directory.")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def replacing_directory(path: str | Path) -> Iterator[Path]:
    """Yield a staging directory to write ``path``'s new contents into; on success it becomes
    ``path``.

    The staging sibling ``.NAME.staging`` is renamed into place (an existing ``path`` first
    moves aside to ``.NAME.replaced``, deleted once the swap is done): a crash leaves the old
    directory or the new one, never a mix or a half-written one. On failure the staging
    directory is removed and ``path`` is untouched. Collective when distributed (rank 0 moves
    directories, every rank may write)."""
    path = Path(path)
    existed = path.exists()
    staging = path.with_name(f".{path.name}.staging")
    replaced = path.with_name(f".{path.name}.replaced")
    if _rank() == 0:
        for leftover in (staging, replaced):  # from a run that was killed
            if leftover.exists():
                shutil.rmtree(leftover)
        staging.mkdir(parents=True)
    _barrier()
    try:
        yield staging
    except BaseException:
        if _rank() == 0 and staging.exists():
            shutil.rmtree(staging)
        raise
    _barrier()
    if _rank() == 0:
        if existed:
            os.replace(path, replaced)
        os.replace(staging, path)
        if existed:
            shutil.rmtree(replaced)
    _barrier()
