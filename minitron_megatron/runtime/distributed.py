"""Distributed start-up: torch.distributed, Megatron's TP/PP/DP groups, seeds.

``LaunchEnv.from_environ(os.environ)`` reads what torchrun or SLURM exported (the CLI passes the
environment in; library code never reads it). ``init_distributed`` returns a ``ParallelState`` that
is handed explicitly to importance, pruning and loss code.
"""

from __future__ import annotations

import contextlib
import datetime
import random
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from minitron_megatron.config import ParallelConfig
from minitron_megatron.errors import UserError
from minitron_megatron.runtime import cpu_compat


def free_port() -> int:
    """A TCP port nobody listens on right now (for single-process and test runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(kw_only=True, frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as exported by the launcher."""

    rank: int = 0
    """Global rank of this process."""

    world_size: int = 1
    """Number of processes in the job."""

    local_rank: int = 0
    """Rank within this node (selects the GPU)."""

    master_addr: str = "127.0.0.1"
    """Host of rank 0's rendezvous store."""

    master_port: int = 0
    """Port of the rendezvous store; 0 picks a free one (single process only)."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"rank {self.rank} is outside world size {self.world_size}.")
        if self.world_size > 1 and self.master_port == 0:
            raise UserError("a multi-process job needs MASTER_PORT; export it or use torchrun.")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> LaunchEnv:
        """torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else SLURM's SLURM_PROCID/SLURM_NTASKS/
        SLURM_LOCALID, else a single process."""
        if "RANK" in environ:
            names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        elif "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
            names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
        else:
            return cls(master_port=int(environ.get("MASTER_PORT", 0)))
        missing = [n for n in (*names, "MASTER_ADDR", "MASTER_PORT") if n not in environ]
        if missing:
            raise UserError(
                f"launcher environment incomplete: {', '.join(missing)} not set; start with "
                f"torchrun, or export them (see launch/ for SLURM scripts)."
            )
        rank, world, local = (int(environ[n]) for n in names)
        return cls(rank=rank, world_size=world, local_rank=local,
                   master_addr=environ["MASTER_ADDR"], master_port=int(environ["MASTER_PORT"]))


@dataclass(kw_only=True, frozen=True)
class ParallelState:
    """Process groups and coordinates of this rank, passed explicitly to the library's code."""

    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    rank: int
    world_size: int
    sequence_parallel: bool
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def pipeline_ranks(self) -> list[int]:
        """Global ranks of the stages of this rank's pipeline, first to last."""
        return dist.get_process_group_ranks(self.pp_group)

    @property
    def last_stage_rank(self) -> int:
        return self.pipeline_ranks[-1]

    def all_reduce(self, tensor: torch.Tensor, group: dist.ProcessGroup | None = None,
                   op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """All-reduce a small CPU tensor (moved to the device NCCL needs); returns it on CPU."""
        reduced = tensor.to(self.device)
        dist.all_reduce(reduced, op=op, group=group)
        return reduced.cpu()

    def pg_collection(self):
        """Megatron's ``ProcessGroupCollection`` for modules that take explicit groups."""
        from megatron.core.process_groups_config import ProcessGroupCollection

        return ProcessGroupCollection.use_mpu_process_groups()


def seed_everything(seed: int) -> None:
    """Python, NumPy, torch and Megatron's model-parallel RNG tracker."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_distributed(env: LaunchEnv, parallel: ParallelConfig) -> ParallelState:
    """Start torch.distributed (nccl on GPU, gloo on CPU) and Megatron's parallel groups.

    Checks the layout against the world size first, so a bad launch fails before any work.
    """
    from megatron.core import parallel_state as mpu

    dp_size = parallel.data_parallel_size(env.world_size)
    use_cuda = torch.cuda.is_available()
    cpu_compat.apply()
    if use_cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        port = env.master_port or free_port()
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=f"tcp://{env.master_addr}:{port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=parallel.timeout_minutes),
        )
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        distributed_timeout_minutes=parallel.timeout_minutes,
        create_gloo_process_groups=use_cuda,  # on CPU the default group already is gloo
    )
    seed_everything(parallel.seed)
    return ParallelState(
        tp_group=mpu.get_tensor_model_parallel_group(),
        pp_group=mpu.get_pipeline_model_parallel_group(),
        dp_group=mpu.get_data_parallel_group(),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        tp_size=parallel.tensor_model_parallel_size,
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        pp_size=parallel.pipeline_model_parallel_size,
        dp_rank=mpu.get_data_parallel_rank(),
        dp_size=dp_size,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        sequence_parallel=parallel.sequence_parallel,
        device=torch.device("cuda", torch.cuda.current_device()) if use_cuda else
        torch.device("cpu"),
    )


def shutdown() -> None:
    """Tear down Megatron's groups and the default process group."""
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(env: LaunchEnv, parallel: ParallelConfig) -> Iterator[ParallelState]:
    """``with distributed(env, parallel) as ps:`` — init on entry, tear down on exit."""
    state = init_distributed(env, parallel)
    try:
        yield state
    finally:
        shutdown()
