"""Tiny teacher/student checkpoints and run configs for the distillation tests."""

from __future__ import annotations

from pathlib import Path

from minitron_megatron.checkpoint import find_checkpoint, save_checkpoint
from minitron_megatron.config import ModelConfig, ParallelConfig
from minitron_megatron.runtime.distributed import LaunchEnv, distributed
from tests import factories


def student_config(**changes) -> ModelConfig:
    """A student narrower and shallower than the tiny teacher (hidden 32 vs 64, 2 vs 4 layers),
    same vocabulary, tied embeddings."""
    cfg = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
               num_query_groups=2, vocab_size=factories.VOCAB, padded_vocab_size=factories.VOCAB,
               tie_embeddings=True, max_position_embeddings=256, init_method_std=0.1)
    cfg.update(changes)
    return ModelConfig(**cfg)


def make_student(directory: Path, teacher_ckpt: Path, *, seed: int = 7, **changes) -> Path:
    """A randomly initialised student checkpoint carrying the teacher's tokenizer."""
    from minitron_megatron.model.build import build_model

    cfg = student_config(**changes)
    with distributed(LaunchEnv(), ParallelConfig(seed=seed)) as ps:
        model = build_model(cfg, ps)
        save_checkpoint(directory, model=model, model_config=cfg, iteration=0,
                        tokenizer_dir=find_checkpoint(teacher_ckpt).tokenizer_dir)
    return Path(directory)

