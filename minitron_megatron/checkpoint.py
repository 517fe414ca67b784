"""Sharded checkpoints: Megatron-Core ``dist_checkpointing`` (torch_dist) in a Megatron-LM layout.

::

    CKPT/
      latest_checkpointed_iteration.txt       # "0"
      iter_0000000/
        metadata.json  .metadata  __*_*.distcp  common.pt      # dist_checkpointing
        model_config.yaml                                      # ModelConfig: dims travel along
        tokenizer/ (tokenizer.json | tokenizer.model, tokenizer.yaml)

The sharded state is ``{"model": model.sharded_state_dict(), "iteration": N, ...}`` as
Megatron-LM writes it, so a checkpoint saved at one TP/PP loads at any other. Saves are atomic:
every rank writes into ``CKPT/.iter_NNNNNNN.tmp``, rank 0 renames it into place and only then
updates ``latest_checkpointed_iteration.txt``; a crash mid-save leaves the previous checkpoint as
the latest.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from minitron_megatron.checkpoint_manifest import verified_load, write_manifest
from minitron_megatron.config import ModelConfig
from minitron_megatron.errors import CheckpointError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
MODEL_CONFIG_FILE = "model_config.yaml"
TOKENIZER_DIR = "tokenizer"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint directory holds, read without loading any tensor."""

    root: Path
    """The directory given by the user (holds the tracker file)."""

    path: Path
    """The ``iter_NNNNNNN`` directory that is loaded."""

    iteration: int
    model_config: ModelConfig

    @property
    def tokenizer_dir(self) -> Path | None:
        directory = self.path / TOKENIZER_DIR
        return directory if directory.is_dir() else None


def latest_iteration(root: str | Path) -> int | None:
    """The iteration named by the tracker file, or ``None`` when there is no checkpoint yet."""
    tracker = Path(root) / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number; fix or delete "
                              f"it to point at one of the iter_* directories.")
    return int(text)


def find_checkpoint(path: str | Path, iteration: int | None = None) -> CheckpointInfo:
    """Resolve ``path`` (a checkpoint root or an ``iter_*`` directory) to what will be loaded.

    Raises ``CheckpointError`` with an actionable message for a missing or foreign directory.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path, or create one "
                              f"with `minitron import-hf --hf-path MODEL --save {path}`.")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a file; pass the checkpoint directory (the "
                              f"one holding {TRACKER_FILE}).")
    if _ITER_RE.match(path.name) and (path / MODEL_CONFIG_FILE).is_file():
        root, it_dir = path.parent, path
        iteration = int(_ITER_RE.match(path.name).group(1))
    else:
        root = path
        if iteration is None:
            iteration = latest_iteration(path)
        if iteration is None:
            raise CheckpointError(
                f"{path} is not a minitron checkpoint: no {TRACKER_FILE} in it. Pass a directory "
                f"written by `minitron import-hf`, `prune` or `distill` (or its iter_* folder)."
            )
        it_dir = iteration_dir(path, iteration)
    config_file = it_dir / MODEL_CONFIG_FILE
    interrupted = root / f".{it_dir.name}.old"
    if not it_dir.exists() and interrupted.is_dir():
        raise CheckpointError(f"a save of {it_dir.name} was interrupted between its renames: the "
                              f"checkpoint is in {interrupted}; rename it back with `mv "
                              f"{interrupted} {it_dir}` (a later save of it also does).")
    if not config_file.is_file():
        raise CheckpointError(f"{it_dir} has no {MODEL_CONFIG_FILE}: the checkpoint is incomplete "
                              f"or was not written by minitron; re-create it.")
    return CheckpointInfo(root=root, path=it_dir, iteration=iteration,
                          model_config=ModelConfig.load(config_file))


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path``'s contents all at once (temporary file + rename): a reader or a crash
    sees the old text or the new, never a partial file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _finish_interrupted_swap(final: Path, old: Path) -> None:
    """A save killed between its renames leaves ``.iter_N.old``: drop it if ``iter_N`` is in
    place (only its deletion was cut short), else put it back (the swap was cut in half)."""
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)


def save_checkpoint(
    root: str | Path,
    *,
    model: torch.nn.Module,
    model_config: ModelConfig,
    iteration: int = 0,
    tokenizer_dir: str | Path | None = None,
    extra_sharded_state: dict[str, Any] | None = None,
    common_state: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Save this rank's shard of ``model`` (collective over all ranks) and return the iter dir.

    ``extra_sharded_state`` holds further sharded items (an optimizer's sharded state dict),
    ``common_state`` plain picklable items stored once (scheduler, data position), ``files``
    small text files written into the iteration directory. ``tokenizer_dir`` is copied inside.
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = root / f".{final.name}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save that was killed
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()

    state: dict[str, Any] = {"model": model.sharded_state_dict(), "iteration": iteration,
                             "checkpoint_version": 3.0}
    state.update(extra_sharded_state or {})
    state.update(common_state or {})
    dist_checkpointing.save(state, str(tmp))
    _barrier()

    if _rank() == 0:
        model_config.save(tmp / MODEL_CONFIG_FILE)
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    _barrier()
    write_manifest(tmp)  # collective: each rank hashes a share of the files

    if _rank() == 0:
        old = root / f".{final.name}.old"
        _finish_interrupted_swap(final, old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
        write_text_atomic(root / TRACKER_FILE, str(iteration))
    _barrier()
    return final


EXTRA_STATE_SUFFIX = "_extra_state"
"""TransformerEngine modules keep FP8 metadata under this key. It is the only state that may be
absent on one side: a checkpoint written with the local spec has none, and TE's attention puts one
in ``state_dict()`` that Megatron-Core's ``sharded_state_dict`` never writes."""


def _not_extra_state(keys: Any) -> list[str]:
    return sorted(k for k in keys if not k.endswith(EXTRA_STATE_SUFFIX))


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (so every rank raises together, none waits)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, flag)
    return any(flags)


@verified_load  # checksums checked first; damaged or mismatched files give one-line errors
def load_checkpoint(
    info: CheckpointInfo,
    *,
    model: torch.nn.Module,
    extra_sharded_state: dict[str, Any] | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Load ``info``'s tensors into this rank's ``model`` (any TP/PP, local or TE layer spec) and
    return the loaded state (common items and the loaded ``extra_sharded_state``).

    Every model tensor must be in the checkpoint and every checkpoint tensor of the model must
    fit it, with one exception: TransformerEngine ``_extra_state`` entries may be absent on either
    side (a local-spec checkpoint loaded into a TE model, or the other way round). With ``strict``
    the same holds for ``extra_sharded_state``; without it, its items the checkpoint lacks are
    skipped. Items the checkpoint holds beyond the request (a training run's optimizer and RNG
    states when only the model is loaded) are left unread."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    request: dict[str, Any] = {"model": model.sharded_state_dict()}
    request.update(extra_sharded_state or {})
    # Unexpected = requested but not in the checkpoint; they are dropped from the request.
    loaded, _, unexpected = dist_checkpointing.load(
        request, str(info.path), strict=StrictHandling.RETURN_UNEXPECTED)
    lacking = _not_extra_state(unexpected)
    if not strict:
        lacking = [k for k in lacking if k in _not_extra_state(_sharded_keys(request["model"]))]
    if _any_rank(bool(lacking)):
        named = ", ".join(lacking[:4]) + (" …" if len(lacking) > 4 else "")
        raise CheckpointError(
            f"{info.path} lacks tensors this model needs ({named or 'on another rank'}): it was "
            f"written for another model or is incomplete; re-create it, or load the checkpoint "
            f"it was pruned or distilled from.")
    result = model.load_state_dict(loaded.pop("model"), strict=False)
    mismatched = _not_extra_state([*result.missing_keys, *result.unexpected_keys])
    if mismatched:
        raise RuntimeError(f"model state and checkpoint disagree on {mismatched}")
    return loaded


def _sharded_keys(sharded_state: dict[str, Any]) -> set[str]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return {item.key for item in nested_values(sharded_state)}
