"""ModelConfig: validation, YAML round trip, exact parameter count against built models."""

from __future__ import annotations

import doctest
import random

import pytest

from minitron_megatron import config as config_module
from minitron_megatron.config import ModelConfig, ParallelConfig
from minitron_megatron.model.build import build_model, count_parameters, pipeline_split
from minitron_megatron.runtime.distributed import LaunchEnv, init_distributed, shutdown
from minitron_megatron.testing.multiprocess import run_distributed

BASE = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
            vocab_size=256)


def test_docstring_example():
    assert doctest.testmod(config_module).failed == 0


def test_yaml_round_trip_and_defaults():
    cfg = ModelConfig(**BASE, num_query_groups=2)
    assert cfg.kv_channels == 16 and cfg.padded_vocab_size == 256
    assert ModelConfig.from_yaml(cfg.to_yaml()) == cfg
    assert ModelConfig(**{**BASE, "vocab_size": 300}).padded_vocab_size == 384


@pytest.mark.parametrize("changes,match", [
    ({"num_attention_heads": 6, "num_query_groups": 4}, "not a multiple of num_query_groups"),
    ({"hidden_size": 66}, "set kv_channels"),
    ({"num_layers": 0}, "positive integer"),
    ({"normalization": "BatchNorm"}, "normalization"),
    ({"padded_vocab_size": 100}, "at least the tokenizer"),
])
def test_invalid_configs_are_explained(changes, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**BASE, **changes})


def test_unknown_yaml_field():
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**BASE, "num_experts": 8})


def test_parallel_checks():
    cfg = ModelConfig(**BASE, num_query_groups=2)
    with pytest.raises(ValueError, match="does not divide num_query_groups=3"):
        cfg.replace(num_attention_heads=6, num_query_groups=3).check_parallel(tensor_parallel=2)
    with pytest.raises(ValueError, match="does not divide num_attention_heads=3"):
        cfg.replace(num_attention_heads=3, num_query_groups=1).check_parallel(tensor_parallel=2)
    with pytest.raises(ValueError, match="not divisible by tensor-model-parallel-size"):
        ParallelConfig(tensor_model_parallel_size=2).data_parallel_size(3)
    with pytest.raises(ValueError, match="sequence parallel needs"):
        ParallelConfig(sequence_parallel=True)


def test_pipeline_split_covers_every_layer():
    for layers in range(2, 40):
        for pp in range(1, min(layers, 8) + 1):
            first, last = pipeline_split(layers, pp)
            if first is None:
                assert layers % pp == 0
                continue
            middle = (layers - first - last) / max(pp - 2, 1)
            assert first > 0 and last > 0 and middle == int(middle) and middle >= 0


def _random_configs(n: int, seed: int = 0) -> list[ModelConfig]:
    rng = random.Random(seed)
    configs = []
    for _ in range(n):
        groups = rng.choice([1, 2, 4])
        configs.append(ModelConfig(
            num_layers=rng.choice([1, 2, 3]),
            hidden_size=rng.choice([32, 48, 64]),
            ffn_hidden_size=rng.choice([32, 64, 96]),
            num_attention_heads=groups * rng.choice([1, 2]),
            num_query_groups=groups,
            kv_channels=rng.choice([8, 16]),
            vocab_size=rng.choice([100, 256]),
            normalization=rng.choice(["RMSNorm", "LayerNorm"]),
            gated_linear_unit=rng.choice([True, False]),
            activation=rng.choice(["silu", "gelu"]),
            position_embedding_type=rng.choice(["rope", "learned_absolute"]),
            tie_embeddings=rng.choice([True, False]),
            add_bias_linear=rng.choice([True, False]),
            add_qkv_bias=rng.choice([True, False]),
            max_position_embeddings=64,
        ))
    return configs


def test_parameter_count_equals_built_model():
    ps = init_distributed(LaunchEnv(), ParallelConfig())
    try:
        for cfg in _random_configs(12):
            model = build_model(cfg, ps)
            assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters(), cfg
            assert count_parameters(model, ps) == cfg.num_parameters()
    finally:
        shutdown()


def count_at_layout(env, configs, tp, pp):
    ps = init_distributed(env, ParallelConfig(tensor_model_parallel_size=tp,
                                              pipeline_model_parallel_size=pp))
    try:
        return [count_parameters(build_model(cfg, ps), ps) for cfg in configs]
    finally:
        shutdown()


@pytest.mark.multiprocess
def test_parameter_count_summed_over_ranks():
    """TP=2×PP=2 shards (with tied embeddings duplicated on the last stage) add up exactly."""
    configs = [c.replace(num_layers=2) for c in _random_configs(30)
               if c.num_query_groups % 2 == 0 and c.ffn_hidden_size % 2 == 0][:4]
    counts = run_distributed(count_at_layout, 4, configs, 2, 2)
    for rank_counts in counts:
        assert rank_counts == [c.num_parameters() for c in configs]
