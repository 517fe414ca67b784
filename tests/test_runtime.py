"""Launcher environments and the multi-rank harness itself (incl. CPU adapter 7)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from minitron_megatron.config import ParallelConfig
from minitron_megatron.runtime.distributed import LaunchEnv, distributed
from minitron_megatron.testing.multiprocess import DistributedRunError, run_distributed


def test_launch_env_from_torchrun():
    env = LaunchEnv.from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                  "MASTER_ADDR": "node0", "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (3, 4, 1, "node0")


def test_launch_env_from_slurm():
    env = LaunchEnv.from_environ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                                  "MASTER_ADDR": "node1", "MASTER_PORT": "6000"})
    assert (env.rank, env.world_size, env.local_rank, env.master_port) == (5, 8, 1, 6000)


def test_launch_env_single_process_and_missing_variable():
    assert LaunchEnv.from_environ({}).world_size == 1
    with pytest.raises(ValueError, match="MASTER_ADDR not set"):
        LaunchEnv.from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
                                "MASTER_PORT": "1"})


def gather_scalars(env: LaunchEnv):
    """Ranks and TP/DP coordinates, plus a 0-dim all_gather_into_tensor (gloo refuses it)."""
    with distributed(env, ParallelConfig(tensor_model_parallel_size=2)) as ps:
        out = torch.zeros(env.world_size, dtype=torch.int64)
        dist.all_gather_into_tensor(out, torch.tensor(env.rank * 10))
        return {"rank": ps.rank, "tp": ps.tp_rank, "dp": ps.dp_rank, "gathered": out}


@pytest.mark.multiprocess
def test_results_come_back_in_rank_order():
    results = run_distributed(gather_scalars, 4)
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    assert [(r["tp"], r["dp"]) for r in results] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    for r in results:
        assert r["gathered"].tolist() == [0, 10, 20, 30]


def fail_on_rank_one(env: LaunchEnv):
    with distributed(env, ParallelConfig()):
        if env.rank == 1:
            raise ValueError("boom on purpose")
        dist.barrier()  # rank 0 would wait here forever


def fail_late_on_rank_one(env: LaunchEnv):
    """Rank 0 reports first (as a peer whose collective broke would), rank 1 the root cause."""
    if env.rank == 1:
        time.sleep(1.0)
        raise ValueError("root cause on rank 1")
    raise RuntimeError("Connection closed by peer")


def hang_on_rank_one(env: LaunchEnv):
    if env.rank == 1:
        time.sleep(600)


@pytest.mark.multiprocess
def test_a_failing_rank_fails_the_run_at_once():
    start = time.monotonic()
    with pytest.raises(DistributedRunError, match="boom on purpose"):
        run_distributed(fail_on_rank_one, 2, timeout=120)
    assert time.monotonic() - start < 60


@pytest.mark.multiprocess
def test_the_root_cause_is_reported_even_when_a_peer_fails_first():
    with pytest.raises(DistributedRunError) as failure:
        run_distributed(fail_late_on_rank_one, 2, timeout=120)
    message = str(failure.value)
    assert "rank 0 failed" in message and "Connection closed by peer" in message
    assert "rank 1 failed" in message and "root cause on rank 1" in message


@pytest.mark.multiprocess
def test_a_hung_rank_times_out():
    with pytest.raises(DistributedRunError, match=r"ranks \[1\] did not finish"):
        run_distributed(hang_on_rank_one, 2, timeout=10)
