"""Shared pieces of the importance and pruning tests (calibration samples, loading a checkpoint
at a layout, score tensors that survive the trip back from spawned ranks)."""

from __future__ import annotations

import torch

from minitron_megatron.checkpoint import find_checkpoint, load_checkpoint
from minitron_megatron.config import ParallelConfig
from minitron_megatron.importance import ImportanceConfig, Scores
from minitron_megatron.model.build import build_model
from minitron_megatron.runtime.distributed import init_distributed

CALIB = dict(num_samples=10, micro_batch_size=4, seq_length=32)  # last micro-batch is padded
DEPTH = ("bi", "loss", "block:2")


def calibration_samples(n: int = 10, seq: int = 32, seed: int = 3) -> list[dict]:
    """Random-token samples in the shape Megatron's GPTDataset yields."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 320, (seq + 1,), generator=generator)
        out.append({"tokens": ids[:-1], "labels": ids[1:], "loss_mask": torch.ones(seq),
                    "position_ids": torch.arange(seq)})
    return out


def load_at(env, ckpt, tp: int = 1, pp: int = 1, sp: bool = False):
    """``(ps, info, model)``: the checkpoint loaded at a layout (re-initialising the groups)."""
    ps = init_distributed(env, ParallelConfig(tensor_model_parallel_size=tp,
                                              pipeline_model_parallel_size=pp,
                                              sequence_parallel=sp))
    info = find_checkpoint(ckpt)
    model = build_model(info.model_config, ps, init_weights=False)
    load_checkpoint(info, model=model)
    return ps, info, model


def as_tensors(scores: Scores) -> dict[str, torch.Tensor]:
    out = scores.tensors()
    out["calibration_loss"] = torch.tensor(scores.calibration_loss, dtype=torch.float64)
    return out


def from_tensors(tensors: dict[str, torch.Tensor], model_config,
                 settings: ImportanceConfig) -> Scores:
    return Scores(model_config=model_config, settings=settings, ffn=tensors["ffn"],
                  heads=tensors["heads"], query_groups=tensors["query_groups"],
                  hidden_norms=tensors["hidden_norms"],
                  depth={k[6:]: v for k, v in tensors.items() if k.startswith("depth.")},
                  num_samples=CALIB["num_samples"],
                  num_tokens=CALIB["num_samples"] * CALIB["seq_length"],
                  calibration_loss=float(tensors["calibration_loss"]))
