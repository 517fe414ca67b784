"""Same seed, same machine, same threads per rank: bit-identical runs. Two 2-rank (DP=2)
distillations in fresh processes (other Python hash seeds, other memory addresses), the second
reading the GPTDataset index cache the first one built, give equal losses, gradient norms,
evaluations and weights; so do two single-process runs. (What does change the bits — the
thread count per rank, the CPU's instruction set — is measured in the README.)"""

from __future__ import annotations

import pytest
import torch

from minitron_megatron.checkpoint import find_checkpoint
from minitron_megatron.config import ParallelConfig
from minitron_megatron.data.loaders import DataConfig
from minitron_megatron.distill.config import KDConfig, TrainConfig
from minitron_megatron.distill.training import Trainer
from minitron_megatron.runtime.distributed import LaunchEnv, init_distributed, shutdown
from minitron_megatron.testing.multiprocess import run_distributed
from tests import distill_helpers

TIMING_KEYS = ("tokens_per_s", "step_time")


def distill(env, assets, save, cache):
    """A short distillation (logits + an intermediate pair, clipped gradients); its records
    without timings, and the student's weights."""
    teacher, student, data = assets
    ps = init_distributed(env, ParallelConfig())
    try:
        trainer = Trainer(
            train=TrainConfig(save=save, train_iters=4, global_batch_size=4, micro_batch_size=1,
                              lr=3e-3, lr_warmup_iters=1, clip_grad=0.5, eval_interval=2),
            kd=KDConfig(ce_weight=0.2, intermediate_pairs=((1, 3),)),
            data=DataConfig(data_path=data, seq_length=32, cache_path=cache),
            student=find_checkpoint(student), teacher=find_checkpoint(teacher), ps=ps)
        history = trainer.run().history
        weights = torch.cat([p.detach().flatten() for p in trainer.student.parameters()])
    finally:
        shutdown()
    return {"history": [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history],
            "weights": weights}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, llama_ckpt_untied, tiny_dataset):
    student = distill_helpers.make_student(tmp_path_factory.mktemp("student"), llama_ckpt_untied)
    return str(llama_ckpt_untied), str(student), tiny_dataset


@pytest.mark.multiprocess
def test_same_seed_runs_are_bit_identical_at_dp2_with_a_fresh_or_cached_index(assets,
                                                                             tmp_path):
    cache = tmp_path / "index_cache"
    first = run_distributed(distill, 2, assets, str(tmp_path / "a"), str(cache))
    assert len(list(cache.rglob("*.npy"))) >= 6  # the first run built the index (train, valid)
    second = run_distributed(distill, 2, assets, str(tmp_path / "b"), str(cache))
    for a, b in zip(first, second, strict=True):
        assert a["history"] == b["history"]  # floats compared with ==
        assert torch.equal(a["weights"], b["weights"])
    assert len([r for r in first[0]["history"] if "grad_norm" in r]) == 4


def test_same_seed_single_process_runs_are_bit_identical(assets, tmp_path):
    first = distill(LaunchEnv(), assets, str(tmp_path / "a"), str(tmp_path / "cache_a"))
    second = distill(LaunchEnv(), assets, str(tmp_path / "b"), str(tmp_path / "cache_b"))
    assert first["history"] == second["history"]
    assert torch.equal(first["weights"], second["weights"])
