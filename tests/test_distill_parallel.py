"""Three KD steps at TP=2, PP=2, DP, TP=2×PP=2 and TP=2+SP equal the single-process run."""

from __future__ import annotations

import pytest
import torch

from minitron_megatron.checkpoint import find_checkpoint
from minitron_megatron.config import ParallelConfig
from minitron_megatron.data.loaders import DataConfig
from minitron_megatron.distill.config import KDConfig, TrainConfig
from minitron_megatron.distill.training import Trainer
from minitron_megatron.model.build import count_parameters
from minitron_megatron.runtime.distributed import LaunchEnv, init_distributed, shutdown
from minitron_megatron.testing.multiprocess import run_distributed

RTOL = 1e-5
STEPS = 3
# (TP, PP, SP) on 4 ranks: DP is what remains (2, 2, 4, 1, 2)
LAYOUTS = [(2, 1, False), (1, 2, False), (1, 1, False), (2, 2, False), (2, 1, True)]
OBJECTIVES = {
    "paper": {},  # logits only, forward KL, τ = 1
    "all-options": {"temperature": 2.0, "ce_weight": 0.2, "top_k": 16,
                    "intermediate_pairs": ((0, 1), (1, 3))},
}
METRICS = ("loss", "kd_loss", "ce_loss", "grad_norm")


def kd_steps(env, teacher, student, data_path, save_root, layouts, objectives):
    """``STEPS`` optimizer steps per (layout, objective): metrics per step, and whether the
    teacher's weights stayed as loaded."""
    out = []
    try:
        for tp, pp, sp in layouts:
            for name, kd in objectives.items():
                ps = init_distributed(env, ParallelConfig(tensor_model_parallel_size=tp,
                                                          pipeline_model_parallel_size=pp,
                                                          sequence_parallel=sp))
                trainer = Trainer(
                    train=TrainConfig(save=f"{save_root}/{tp}{pp}{sp}{name}", train_iters=STEPS,
                                      global_batch_size=8, micro_batch_size=2, lr=3e-3,
                                      lr_warmup_iters=1, clip_grad=1.0),
                    kd=KDConfig(**kd), data=DataConfig(data_path=data_path, seq_length=32),
                    student=find_checkpoint(student), teacher=find_checkpoint(teacher), ps=ps)
                teacher_before = [p.detach().clone() for p in trainer.model.teacher.parameters()]
                steps = [trainer.train_step() for _ in range(STEPS)]
                frozen = all(torch.equal(a, b) for a, b in
                             zip(teacher_before, trainer.model.teacher.parameters(), strict=True))
                trainable = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
                no_teacher_state = not any(id(p) in trainable
                                           for p in trainer.model.teacher.parameters())
                # built without initialisation, the weights still know they are TP-sharded
                counted = count_parameters(trainer.student, ps) == (
                    trainer.student_info.model_config.num_parameters())
                out.append(([[s[k] for k in METRICS] for s in steps],
                            frozen and no_teacher_state and counted))
    finally:
        shutdown()
    return out


@pytest.mark.multiprocess
def test_kd_steps_match_single_process_at_every_layout(llama_ckpt_untied, student_ckpt,
                                                       tiny_dataset, tmp_path):
    args = (str(llama_ckpt_untied), str(student_ckpt), tiny_dataset)
    reference = kd_steps(LaunchEnv(), *args, str(tmp_path / "ref"), [(1, 1, False)], OBJECTIVES)
    per_rank = run_distributed(kd_steps, 4, *args, str(tmp_path / "par"), LAYOUTS, OBJECTIVES,
                               timeout=600)
    names = list(OBJECTIVES)
    for ref_metrics, frozen in reference:
        assert frozen
        assert ref_metrics[-1][0] < ref_metrics[0][0]  # the steps do train
    for rank, results in enumerate(per_rank):
        for i, (metrics, frozen) in enumerate(results):
            layout, name = LAYOUTS[i // len(names)], names[i % len(names)]
            assert frozen, f"teacher changed, has optimizer state, or miscounted at {layout}"
            expected = torch.tensor(reference[names.index(name)][0], dtype=torch.float64)
            got = torch.tensor(metrics, dtype=torch.float64)
            where = f"{name} at TP,PP,SP={layout} rank {rank}"
            torch.testing.assert_close(got, expected, rtol=RTOL, atol=0.0,
                                       msg=lambda m, where=where: f"{where}: {m}")
