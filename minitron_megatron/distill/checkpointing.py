"""Training checkpoints of a distillation run: the student plus everything a resume needs.

Written through ``minitron_megatron.checkpoint.save_checkpoint`` (atomic: temp dir + rename), so
a run killed mid-save resumes from the previous good checkpoint. Layout inside ``iter_NNNNNNN/``:

* ``model``: the student (sharded; loads as a plain student anywhere: evaluate, export, prune);
* ``optimizer``: Megatron's optimizer sharded state (``optimizer.sharded_state_dict``);
* ``kd_projection``: the learned intermediate-state projection, if any;
* ``rng_state``: per-rank RNG states (Python, NumPy, torch, CUDA, Megatron's tracker), one
  ``ShardedObject`` per (PP, TP, DP) rank;
* common: ``opt_param_scheduler`` and ``train_state`` (iteration, consumed samples, layout).

The teacher is never part of it.
"""

from __future__ import annotations

import logging
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minitron_megatron.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    find_checkpoint,
    latest_iteration,
    load_checkpoint,
    save_checkpoint,
)
from minitron_megatron.checkpoint_manifest import explain_load_error, verify_files
from minitron_megatron.config import ModelConfig
from minitron_megatron.distill.config import TrainConfig
from minitron_megatron.errors import UserError
from minitron_megatron.runtime.distributed import ParallelState

log = logging.getLogger("minitron.distill")


@dataclass(frozen=True)
class TrainState:
    """Where a run stands."""

    iteration: int = 0
    consumed_samples: int = 0


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(ps: ParallelState, state: Any):
    from megatron.core.dist_checkpointing import ShardedObject

    return ShardedObject("rng_state", state, (ps.pp_size, ps.tp_size, ps.dp_size),
                         (ps.pp_rank, ps.tp_rank, ps.dp_rank), replica_id=0)


def _layout(ps: ParallelState) -> list[int]:
    return [ps.tp_size, ps.pp_size, ps.dp_size]


OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
"""How Megatron's distributed optimizer writes its state: as one tensor per parameter, like the
plain optimizer, so a run resumes at another TP × PP × DP (Megatron-LM's
``--dist-ckpt-optim-fully-reshardable``; its default ``dp_reshardable`` reshards only over DP).
Saving gathers each model-parallel shard's optimizer state on its DP rank 0."""


def _sharded_items(student, projection, optimizer, *, loading: bool) -> dict[str, Any]:
    """The optimizer's sharded state refers to the parameters through the model's sharded
    tensors: the student's and the projection's."""
    params = {"model": student.sharded_state_dict()}
    items: dict[str, Any] = {}
    if projection is not None:
        items["kd_projection"] = projection.sharded_state_dict(prefix="kd_projection.")
        params["kd_projection"] = items["kd_projection"]
    items["optimizer"] = optimizer.sharded_state_dict(params, is_loading=loading,
                                                      metadata=OPTIMIZER_METADATA)
    return items


def save_training_checkpoint(
    root: Path, *, student, model_config: ModelConfig, projection, optimizer, scheduler,
    state: TrainState, ps: ParallelState, tokenizer_dir: Path | None, files: dict[str, str],
) -> Path:
    """Collective: every rank writes its shards; returns the iteration directory."""
    extra = _sharded_items(student, projection, optimizer, loading=False)
    extra["rng_state"] = _rng_sharded(ps, _rng_state())
    common = {"opt_param_scheduler": scheduler.state_dict(),
              "train_state": {"iteration": state.iteration,
                              "consumed_samples": state.consumed_samples,
                              "layout": _layout(ps)}}
    return save_checkpoint(root, model=student, model_config=model_config,
                           iteration=state.iteration, tokenizer_dir=tokenizer_dir,
                           extra_sharded_state=extra, common_state=common, files=files)


def resumable_checkpoint(load: Path | None, student_config: ModelConfig) -> CheckpointInfo | None:
    """The checkpoint a run resumes from, or ``None`` (no ``--load``, or nothing saved yet).

    Raises an actionable ``CheckpointError`` when it holds a model of another shape."""
    if load is None or not Path(load).exists() or latest_iteration(load) is None:
        return None
    info = find_checkpoint(load)
    if info.model_config != student_config:
        ours, theirs = student_config.to_dict(), info.model_config.to_dict()
        diff = ", ".join(f"{k}: checkpoint {theirs[k]} vs student {ours[k]}"
                         for k in ours if ours[k] != theirs.get(k))
        raise CheckpointError(
            f"cannot resume from {info.path}: it holds a model of another shape ({diff}). "
            f"Resume with the --student the run started from, or write to a new --save/--load "
            f"directory.")
    return info


def _schedule_of(train: TrainConfig) -> dict[str, tuple[Any, str]]:
    """The LR schedule a ``TrainConfig`` gives, as Megatron's ``OptimizerParamScheduler`` saves
    it: state key → (value, the flag that sets it)."""
    decay_flag = (f"--lr-decay-iters {train.lr_decay_iters}" if train.lr_decay_iters is not None
                  else f"--train-iters {train.train_iters}")
    return {"max_lr": (train.lr, f"--lr {train.lr:g}"),
            "min_lr": (train.min_lr, f"--min-lr {train.min_lr:g}"),
            "lr_warmup_steps": (train.lr_warmup_iters,
                                f"--lr-warmup-iters {train.lr_warmup_iters}"),
            "lr_decay_steps": (train.decay_iters, decay_flag),
            "lr_decay_style": (train.lr_decay_style, f"--lr-decay-style {train.lr_decay_style}"),
            "start_wd": (train.weight_decay, f"--weight-decay {train.weight_decay:g}")}


_SCHEDULE_NAMES = {"max_lr": "peak LR", "min_lr": "minimum LR", "lr_warmup_steps": "warmup steps",
                   "lr_decay_steps": "LR decay steps", "lr_decay_style": "decay style",
                   "start_wd": "weight decay"}


def check_schedule(info: CheckpointInfo, train: TrainConfig) -> None:
    """Refuse (``UserError``) to resume from ``info`` when its saved LR schedule differs from
    ``train``'s, unless ``train`` says which one to follow (Megatron-LM's
    ``--override-opt_param-scheduler`` / ``--use-checkpoint-opt_param-scheduler``)."""
    from megatron.core import dist_checkpointing

    if train.override_opt_param_scheduler or train.use_checkpoint_opt_param_scheduler:
        return
    verify_files(info.path)  # the first read of a resume: checksums before unpickling
    try:
        common = dist_checkpointing.load_common_state_dict(str(info.path))
    except pickle.UnpicklingError as err:
        raise explain_load_error(err, info.path) from None
    saved = common.get("opt_param_scheduler")
    if saved is None:
        return  # not a training checkpoint: load_training_checkpoint says so
    diff = [f"{_SCHEDULE_NAMES[key]} {saved[key]} saved, {value} now ({flag})"
            for key, (value, flag) in _schedule_of(train).items()
            if key in saved and saved[key] != value]
    if diff:
        raise UserError(
            f"cannot resume from {info.path}: its LR schedule differs from this command's "
            f"({'; '.join(diff)}). Pass --override-opt-param-scheduler to follow this command's "
            f"schedule from iteration {saved.get('num_steps', '?')} on, or "
            f"--use-checkpoint-opt-param-scheduler to keep the saved one.")


def load_training_checkpoint(
    info: CheckpointInfo, *, student, projection, optimizer, scheduler, ps: ParallelState,
    override_schedule: bool = False,
) -> TrainState:
    """Restore student, projection, optimizer, scheduler, data position and (at the same
    layout) RNG states. Collective.

    ``override_schedule``: the scheduler keeps its own LR schedule (built with
    ``override_opt_param_scheduler``) and the optimizer's parameter groups take its peak and
    minimum LR, which the saved optimizer state would otherwise bring back."""
    from megatron.core import dist_checkpointing

    verify_files(info.path)  # before reading common.pt (load_checkpoint's own check is cached)
    try:
        common = dist_checkpointing.load_common_state_dict(str(info.path))
    except pickle.UnpicklingError as err:
        raise explain_load_error(err, info.path) from None
    if "train_state" not in common:
        raise CheckpointError(f"{info.path} is not a training checkpoint (no optimizer or "
                              f"scheduler state); pass it as --student to start a new run.")
    train_state = common["train_state"]
    if override_schedule:
        # megatron-core 0.19+ pairs saved and current parameter groups by their max_lr/min_lr
        # (among other keys): load under the saved values, the new ones are applied below
        saved = common["opt_param_scheduler"]
        for group in optimizer.param_groups:
            group["max_lr"], group["min_lr"] = saved["max_lr"], saved["min_lr"]
    extra = _sharded_items(student, projection, optimizer, loading=True)
    same_layout = list(train_state["layout"]) == _layout(ps)
    if same_layout:
        extra["rng_state"] = _rng_sharded(ps, _rng_state())  # the structure to load into
    else:
        log.warning("resuming at layout TP,PP,DP=%s (saved at %s): RNG states are re-seeded",
                    _layout(ps), train_state["layout"])
    loaded = load_checkpoint(info, model=student, extra_sharded_state=extra, strict=False)
    if projection is not None:
        projection.load_state_dict({k.removeprefix("kd_projection."): v
                                    for k, v in loaded["kd_projection"].items()})
    with torch.no_grad():  # in-place copies into the (distributed) optimizer's main weights
        optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(common["opt_param_scheduler"])
    if override_schedule:
        for group in optimizer.param_groups:
            group["max_lr"], group["min_lr"] = scheduler.max_lr, scheduler.min_lr
        scheduler.step(increment=0)  # this step's LR from the new schedule
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return TrainState(iteration=train_state["iteration"],
                      consumed_samples=train_state["consumed_samples"])
