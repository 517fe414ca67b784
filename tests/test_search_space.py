"""Search candidates: exact parameter counts, tolerance, TP validity, clear errors."""

from __future__ import annotations

import random

import pytest

from minitron_megatron.config import ModelConfig, ParallelConfig
from minitron_megatron.model.build import build_model, count_parameters
from minitron_megatron.runtime.distributed import LaunchEnv, init_distributed, shutdown
from minitron_megatron.search.space import SearchSpace, enumerate_candidates, parse_param_count

TEACHER = ModelConfig(num_layers=10, hidden_size=256, ffn_hidden_size=768, num_attention_heads=8,
                      num_query_groups=4, kv_channels=32, vocab_size=1000, tie_embeddings=True)


def test_parse_param_count():
    assert parse_param_count("70M") == 70_000_000
    assert parse_param_count("4B") == 4_000_000_000
    assert parse_param_count("1.5e6") == 1_500_000
    assert parse_param_count(123) == 123
    with pytest.raises(ValueError, match="70M or 4B"):
        parse_param_count("lots")


def test_default_space_follows_the_documented_rules():
    space = SearchSpace.default(TEACHER, tensor_parallel=2)
    assert space.num_layers == (10, 9)
    assert space.hidden_size == (256, 192, 128)
    assert space.num_attention_heads == (8, 4)
    assert space.num_query_groups == (4,)
    assert 768 in space.ffn_hidden_size and 256 in space.ffn_hidden_size
    assert all(f % 128 == 0 or f == 768 for f in space.ffn_hidden_size)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_candidates_are_within_tolerance_and_valid_for_tp(tp):
    target = TEACHER.num_parameters() // 2
    space = SearchSpace.default(TEACHER, tensor_parallel=tp)
    candidates = enumerate_candidates(TEACHER, space, target_params=target, tolerance=0.1,
                                      tensor_parallel=tp)
    assert candidates
    for c in candidates:
        cfg = c.config
        assert abs(c.params - target) <= 0.1 * target
        assert cfg.num_attention_heads % cfg.num_query_groups == 0
        for dim in (cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size):
            assert dim % tp == 0
        assert cfg.kv_channels == TEACHER.kv_channels
    distances = [abs(c.params - target) for c in candidates]
    assert distances == sorted(distances)


def test_parameter_count_of_random_candidates_equals_built_model():
    rng = random.Random(0)
    space = SearchSpace.default(TEACHER)
    candidates = enumerate_candidates(TEACHER, space, target_params=TEACHER.num_parameters() // 2,
                                      tolerance=0.3)
    ps = init_distributed(LaunchEnv(), ParallelConfig())
    try:
        for c in rng.sample(candidates, 5):
            model = build_model(c.config, ps)
            assert count_parameters(model, ps) == sum(p.numel() for p in model.parameters())
            assert count_parameters(model, ps) == c.params
    finally:
        shutdown()


def test_unreachable_budget_lists_the_nearest_sizes():
    space = SearchSpace.default(TEACHER)
    with pytest.raises(ValueError, match=r"nearest feasible sizes: .*M \(L\d+-H\d+"):
        enumerate_candidates(TEACHER, space, target_params=1000, tolerance=0.05)


def test_space_that_contradicts_tp():
    space = SearchSpace.from_dict({"num_attention_heads": [7, 5], "num_query_groups": [1]},
                                  SearchSpace.default(TEACHER))
    with pytest.raises(ValueError, match="divisible by tensor-model-parallel-size 2"):
        enumerate_candidates(TEACHER, space, target_params=10**6, tolerance=0.5,
                             tensor_parallel=2)
    with pytest.raises(ValueError, match="exceed the teacher"):
        enumerate_candidates(TEACHER, SearchSpace.from_dict({"hidden_size": [512]}, space),
                             target_params=10**6, tolerance=0.5)
    with pytest.raises(ValueError, match="unknown search-space axes"):
        SearchSpace.from_dict({"depth": [3]}, space)


def test_shapes_pruning_cannot_reach_are_left_out(tmp_path):
    """A query group keeps at most the teacher's heads per group (2 here): 4 heads in 1 group
    is no pruned TEACHER; bad YAML spaces are explained."""
    space = SearchSpace.from_dict({"num_attention_heads": [4], "num_query_groups": [2, 1]},
                                  SearchSpace.default(TEACHER))
    candidates = enumerate_candidates(TEACHER, space, target_params=TEACHER.num_parameters() // 2,
                                      tolerance=0.5)
    assert candidates and {c.config.num_query_groups for c in candidates} == {2}
    only_one_group = SearchSpace.from_dict({"num_query_groups": 1}, space)
    with pytest.raises(ValueError, match="at most 2 heads per group"):
        enumerate_candidates(TEACHER, only_one_group, target_params=10**6, tolerance=0.5)
    (tmp_path / "bad.yaml").write_text("num_layers: [9\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        SearchSpace.from_yaml(tmp_path / "bad.yaml", space)
    with pytest.raises(ValueError, match="must be a list of integers"):
        SearchSpace.from_dict({"hidden_size": "wide"}, space)
