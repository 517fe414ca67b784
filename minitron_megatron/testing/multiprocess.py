"""Run a function on N local gloo ranks (spawned processes) and collect each rank's result.

Used by the test suite and the benchmarks to prove every distributed path against the
single-process answer. A rank that raises fails the whole run at once (the others are killed
rather than left waiting in a collective), and a hard timeout turns a hung collective into an error.

Example::

    def body(env):            # a module-level function: spawned processes import it
        with distributed(env, ParallelConfig(tensor_model_parallel_size=2)) as ps:
            return ps.tp_rank

    assert run_distributed(body, world_size=2) == [0, 1]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from minitron_megatron.runtime.distributed import LaunchEnv, free_port

_EXIT_GRACE_S = 10.0
"""How long the other ranks may take to exit after one failed (they may hang in a collective)."""

_EXIT_GRACE_OK_S = 60.0
"""How long ranks may take to exit after all reported success."""

_FAILURE_REPORT_S = 5.0
"""After one rank fails, how long to wait for the others' reports: the first report is often a
peer's "connection closed" from a collective that the failing rank's teardown broke, not the
root cause, which that rank reports only after its own teardown."""


class DistributedRunError(RuntimeError):
    """A rank failed or the run timed out."""


def _worker(rank: int, env: LaunchEnv, fn: Callable[..., Any], args: tuple, kwargs: dict,
            result_dir: str, status: mp.Queue) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        result = fn(env, *args, **kwargs)
        torch.save(result, Path(result_dir) / f"rank{rank}.pt")
        status.put((rank, None))
    except BaseException:  # noqa: BLE001 - report everything, including CheckpointException
        status.put((rank, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    **kwargs: Any,
) -> list[Any]:
    """Call ``fn(LaunchEnv, *args, **kwargs)`` on ``world_size`` spawned ranks; return the results
    in rank order. ``fn`` must be importable (module level) and its result picklable."""
    ctx = mp.get_context("spawn")
    port = free_port()
    status = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="minitron-ranks-") as result_dir:
        procs = []
        for rank in range(world_size):
            env = LaunchEnv(rank=rank, world_size=world_size, local_rank=rank,
                            master_addr="127.0.0.1", master_port=port)
            proc = ctx.Process(target=_worker, daemon=False,
                               args=(rank, env, fn, args, kwargs, result_dir, status))
            proc.start()
            procs.append(proc)
        grace = _EXIT_GRACE_S
        try:
            _wait(procs, status, timeout)
            grace = _EXIT_GRACE_OK_S
        finally:
            # Ranks that reported are still exiting: their exit handlers stop helper processes
            # (dist_checkpointing's writer manager); killing them now would orphan those.
            deadline = time.monotonic() + grace
            for proc in procs:
                proc.join(timeout=max(deadline - time.monotonic(), 0.0))
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join()
        return [torch.load(Path(result_dir) / f"rank{r}.pt", weights_only=True)
                for r in range(len(procs))]


def _wait(procs: list, status: mp.Queue, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = set(range(len(procs)))
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DistributedRunError(f"ranks {sorted(pending)} did not finish in {timeout:.0f}s "
                                      f"(a hung collective?)")
        try:
            rank, error = status.get(timeout=min(left, 1.0))
        except queue.Empty:
            dead = [r for r in pending if not procs[r].is_alive() and procs[r].exitcode != 0]
            if dead:
                raise DistributedRunError(
                    f"ranks {dead} died (exit codes {[procs[r].exitcode for r in dead]})"
                ) from None
            continue
        if error is not None:
            raise DistributedRunError(_failure_report(procs, status, pending, {rank: error}))
        pending.discard(rank)


def _failure_report(procs: list, status: mp.Queue, pending: set[int],
                    errors: dict[int, str]) -> str:
    """Every failing rank's traceback, in rank order, from reports arriving within
    ``_FAILURE_REPORT_S`` of the first."""
    waiting = pending - errors.keys()
    deadline = time.monotonic() + _FAILURE_REPORT_S
    while waiting and (left := deadline - time.monotonic()) > 0:
        try:
            rank, error = status.get(timeout=min(left, 0.5))
        except queue.Empty:
            waiting = {r for r in waiting if procs[r].is_alive()}
            continue
        waiting.discard(rank)
        if error is not None:
            errors[rank] = error
    return "\n".join(f"rank {r} failed:\n{errors[r]}" for r in sorted(errors))
