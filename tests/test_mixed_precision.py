"""The GPU default training path — bf16 parameters, fp32 main weights and Megatron's distributed
optimizer — run on CPU ranks (cpu_compat adapter 9): at DP=2 it matches one process, its sharded
optimizer state resumes bit-exactly, and its losses track the fp32 run's.

What only a GPU can prove is left to ``benchmarks/gpu_check.py``: NCCL, TransformerEngine's bf16
kernels, overlap of the gradient reduce-scatter with the backward pass, and speed."""

from __future__ import annotations

import pytest
import torch

from minitron_megatron.checkpoint import find_checkpoint, latest_iteration
from minitron_megatron.config import ParallelConfig
from minitron_megatron.data.loaders import DataConfig
from minitron_megatron.distill.config import KDConfig, TrainConfig
from minitron_megatron.distill.training import Trainer
from minitron_megatron.runtime.distributed import LaunchEnv, init_distributed, shutdown
from minitron_megatron.testing.multiprocess import run_distributed
from tests import distill_helpers

ITERS = 4


def _run(env, assets, save, *, dtype, distributed_optimizer, exit_interval=0):
    teacher, student, data = assets
    ps = init_distributed(env, ParallelConfig())
    train = TrainConfig(save=save, load=save, train_iters=ITERS, global_batch_size=4,
                        micro_batch_size=1, lr=3e-3, min_lr=3e-4, lr_warmup_iters=1,
                        save_interval=2, exit_interval=exit_interval,
                        use_distributed_optimizer=distributed_optimizer)
    trainer = Trainer(train=train, kd=KDConfig(), data=DataConfig(data_path=data, seq_length=32),
                      student=find_checkpoint(student), teacher=find_checkpoint(teacher), ps=ps,
                      params_dtype=dtype)
    params = {p.dtype for p in trainer.student.parameters()}
    history = trainer.run().history
    steps = [(r["iteration"], r["loss"], r["grad_norm"]) for r in history if "loss" in r]
    return {"steps": steps, "param_dtypes": sorted(str(d) for d in params),
            "optimizers": [type(o).__name__ for o in
                           getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])]}


def runs(env, assets, jobs):
    try:
        return [_run(env, assets, save, **options) for save, options in jobs]
    finally:
        shutdown()


@pytest.fixture(scope="module")
def assets(tmp_path_factory, llama_ckpt_untied, tiny_dataset):
    student = distill_helpers.make_student(tmp_path_factory.mktemp("student"), llama_ckpt_untied)
    return str(llama_ckpt_untied), str(student), tiny_dataset


@pytest.mark.multiprocess
def test_bf16_distributed_optimizer_matches_one_process_and_resumes(assets, tmp_path):
    bf16 = {"dtype": torch.bfloat16, "distributed_optimizer": True}
    full, stopped, resumed = run_distributed(runs, 2, assets, [
        (str(tmp_path / "dp2"), bf16),
        (str(tmp_path / "stop"), {**bf16, "exit_interval": 2}),
        (str(tmp_path / "stop"), bf16)])[0]
    one, fp32 = runs(LaunchEnv(), assets, [
        (str(tmp_path / "dp1"), bf16),
        (str(tmp_path / "fp32"), {"dtype": torch.float32, "distributed_optimizer": False})])

    assert full["param_dtypes"] == ["torch.bfloat16"]
    assert full["optimizers"] == ["DistributedOptimizer"]
    assert [s[0] for s in full["steps"]] == list(range(1, ITERS + 1))
    # DP=2 (reduce-scatter of fp32 grads, each rank updating its half of the main weights)
    # against one process: same maths, summation order aside
    for (_, loss, norm), (_, loss1, norm1) in zip(full["steps"], one["steps"], strict=True):
        assert loss == pytest.approx(loss1, rel=2e-3) and norm == pytest.approx(norm1, rel=2e-2)
    # the sharded distributed-optimizer state (fp32 main weights, Adam moments) resumes exactly
    assert latest_iteration(tmp_path / "stop") == ITERS
    assert stopped["steps"] == full["steps"][:2] and resumed["steps"] == full["steps"][2:]
    # bf16 tracks fp32 to bf16 precision, and the run learns
    for (_, loss, _), (_, loss32, _) in zip(full["steps"], fp32["steps"], strict=True):
        assert loss == pytest.approx(loss32, rel=2e-2)
    assert full["steps"][-1][1] < full["steps"][0][1]
