"""Unit tests of the pruning primitives, each against an independent statement of what it must
do (Megatron-Core's tensor layouts written out, hand-computed rankings), so a failure names the
broken piece instead of an end-to-end mismatch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from minitron_megatron.config import ModelConfig
from minitron_megatron.errors import UserError
from minitron_megatron.importance.config import ImportanceConfig
from minitron_megatron.importance.scores import Scores
from minitron_megatron.pruning import layout
from minitron_megatron.pruning.plan import LayerPlan, _residual_pairs, make_plan, top_k
from minitron_megatron.pruning.slicing import fold_pruned_heads, layer_index, query_rows
from minitron_megatron.pruning.targets import PruneTargets


def _config(**overrides) -> ModelConfig:
    base = dict(num_layers=4, hidden_size=16, ffn_hidden_size=8, num_attention_heads=4,
                num_query_groups=2, kv_channels=2, vocab_size=64)
    return ModelConfig(**{**base, **overrides})


def _scores(cfg: ModelConfig, seed: int = 0, **tensors) -> Scores:
    g = torch.Generator().manual_seed(seed)
    L = cfg.num_layers
    shapes = {"ffn": (L, cfg.ffn_hidden_size), "heads": (L, cfg.num_attention_heads),
              "query_groups": (L, cfg.num_query_groups), "hidden_norms": (L, 2, cfg.hidden_size)}
    values = {name: tensors.get(name, torch.rand(shape, generator=g))
              for name, shape in shapes.items()}
    depth = {"bi": tensors.get("bi", torch.rand(L, generator=g))}
    return Scores(model_config=cfg, settings=ImportanceConfig(), depth=depth, **values)


# --- top-k ---------------------------------------------------------------------------------

def test_top_k_breaks_ties_by_lower_index_and_returns_source_order():
    scores = torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0])
    assert top_k(scores, 1) == (1,)
    assert top_k(scores, 2) == (1, 3)  # three tied at 3.0: the two lowest indices
    assert top_k(scores, 4) == (1, 2, 3, 4)
    assert top_k(torch.zeros(6), 3) == (0, 1, 2)
    assert top_k(torch.tensor([5.0, -1.0, 7.0]), 3) == (0, 1, 2)  # increasing order, not rank


# --- head-residual pairs -----------------------------------------------------------------

def test_residual_pairs_weakest_kept_takes_strongest_pruned():
    # ranks by score: 3 (0.9) > 0 (0.8) > 5 (0.5) > 1 (0.4) > 2 (0.2) > 4 (0.1)
    heads = torch.tensor([0.8, 0.4, 0.2, 0.9, 0.1, 0.5])
    kept = (0, 3, 5)
    # kept ranked 3, 0, 5; pruned ranked 1, 2, 4 → (5, 1), (0, 2), (3, 4)
    assert _residual_pairs(heads, kept) == ((5, 1), (0, 2), (3, 4))
    # fewer pruned than kept: only the weakest kept heads get a partner
    assert _residual_pairs(heads, (0, 1, 3, 5)) == ((1, 2), (5, 4))


def test_fold_pruned_heads_changes_only_the_kept_query_rows():
    cfg = _config()
    qkv = torch.randn(cfg.qkv_size, cfg.hidden_size)
    folded = fold_pruned_heads(qkv, cfg, ((0, 1),))
    rows = query_rows(cfg, 0)
    torch.testing.assert_close(folded[rows], 2 * qkv[rows] - qkv[query_rows(cfg, 1)])
    untouched = torch.ones(cfg.qkv_size, dtype=torch.bool)
    untouched[rows] = False
    torch.testing.assert_close(folded[untouched], qkv[untouched])


# --- the QKV row index under grouped-query attention ----------------------------------------

@pytest.mark.parametrize("heads,groups", [(4, 2), (8, 2), (6, 3), (4, 4), (4, 1)])
def test_qkv_rows_follow_megatron_interleaved_layout(heads, groups):
    """Megatron-Core's SelfAttention views ``linear_qkv``'s output as ``[G, n + 2, d]``: per group,
    its ``n`` query heads, then its key head, then its value head."""
    d = 3
    cfg = _config(num_attention_heads=heads, num_query_groups=groups, kv_channels=d)
    n = heads // groups
    rows = torch.arange(cfg.qkv_size).view(groups, n + 2, d)  # Megatron's view of the rows
    for head in range(heads):
        assert query_rows(cfg, head) == slice(int(rows[head // n, head % n, 0]),
                                              int(rows[head // n, head % n, -1]) + 1)
    kept_groups = tuple(range(groups))[-max(1, groups // 2):]
    kept_heads = tuple(g * n + j for g in kept_groups for j in range(n) if j != 0 or n == 1)
    plan = LayerPlan(source=0, ffn=(0,), query_groups=kept_groups, heads=kept_heads)
    index = layer_index(cfg, plan, hidden=(0,))
    expected = []
    for g in kept_groups:
        expected += [rows[g, h % n] for h in kept_heads if h // n == g]
        expected += [rows[g, n], rows[g, n + 1]]
    assert index["qkv_rows"].tolist() == torch.cat(expected).tolist()
    # linear_proj's columns: head j owns columns j·d .. j·d + d − 1
    assert index["head_channels"].tolist() == [j * d + c for j in kept_heads for c in range(d)]


def test_gated_fc1_rows_keep_gate_and_up_of_each_neuron():
    cfg = _config(ffn_hidden_size=6)
    plan = LayerPlan(source=0, ffn=(1, 4), query_groups=(0,), heads=(0, 1))
    assert layer_index(cfg, plan, hidden=(0,))["fc1_rows"].tolist() == [1, 4, 7, 10]
    plain = _config(ffn_hidden_size=6, gated_linear_unit=False, activation="gelu")
    assert layer_index(plain, plan, hidden=(0,))["fc1_rows"].tolist() == [1, 4]


# --- TP shards of a gated linear_fc1 ---------------------------------------------------------

@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gated_fc1_shards_round_trip(tp, monkeypatch):
    """Megatron's rank ``r`` holds ``[gate_r; up_r]`` of a gated ``linear_fc1``; the global tensor
    is ``[gate; up]``. ``to_local`` must give each rank exactly that, ``to_global`` invert it."""
    F, h = 8, 3
    gate, up = torch.randn(F, h), torch.randn(F, h)
    full = torch.cat([gate, up])
    shards = []
    for r in range(tp):
        ps = SimpleNamespace(tp_size=tp, tp_rank=r, tp_group=None)
        local = layout.to_local(full, 0, True, ps)
        rows = slice(r * F // tp, (r + 1) * F // tp)
        torch.testing.assert_close(local, torch.cat([gate[rows], up[rows]]), rtol=0, atol=0)
        shards.append(local)

    def all_gather(out, tensor, group=None):  # the TP group as a list of every rank's shard
        for slot, shard in zip(out, shards):
            slot.copy_(shard)

    monkeypatch.setattr(layout.dist, "all_gather", all_gather)
    ps = SimpleNamespace(tp_size=tp, tp_rank=0, tp_group=None)
    torch.testing.assert_close(layout.to_global(shards[0], 0, True, ps), full, rtol=0, atol=0)
    plain = torch.randn(F, h)
    shards = [layout.to_local(plain, 1 if h % tp == 0 else 0, False,
                              SimpleNamespace(tp_size=tp, tp_rank=r)) for r in range(tp)]
    torch.testing.assert_close(layout.to_global(shards[0], 1 if h % tp == 0 else 0, False, ps),
                               plain, rtol=0, atol=0)


def test_sharded_dim_is_found_from_shapes():
    ps = SimpleNamespace(tp_size=2)
    assert layout.sharded_dim(torch.Size([4, 16]), {0: 8, 1: 16}, ps) == 0
    assert layout.sharded_dim(torch.Size([8, 8]), {0: 8, 1: 16}, ps) == 1
    assert layout.sharded_dim(torch.Size([8, 16]), {0: 8, 1: 16}, ps) is None


# --- plans and target errors from synthetic scores ------------------------------------------

def test_plan_keeps_top_groups_then_top_heads_within_each_group():
    cfg = _config(num_layers=1, num_attention_heads=6, num_query_groups=3)
    heads = torch.tensor([[0.9, 0.1, 0.2, 0.3, 0.8, 0.7]])  # groups {0,1}, {2,3}, {4,5}
    groups = torch.tensor([[0.5, 0.1, 0.9]])
    ffn = torch.tensor([[0.1, 0.9, 0.5, 0.4, 0.3, 0.8, 0.2, 0.7]])
    plan = make_plan(_scores(cfg, heads=heads, query_groups=groups, ffn=ffn),
                     PruneTargets(num_attention_heads=2, num_query_groups=2, ffn_hidden_size=3))
    layer = plan.layers[0]
    assert layer.query_groups == (0, 2)
    assert layer.heads == (0, 4)  # the best head of group 0 (0.9) and of group 2 (0.8)
    assert layer.ffn == (1, 5, 7)
    assert plan.target.num_attention_heads == 2 and plan.target.num_query_groups == 2


def test_plan_drops_lowest_bi_layers_and_keeps_order():
    cfg = _config(num_layers=5)
    bi = torch.tensor([0.9, 0.1, 0.5, 0.05, 0.7])
    plan = make_plan(_scores(cfg, bi=bi), PruneTargets(num_layers=3))
    assert [layer.source for layer in plan.layers] == [0, 2, 4]


def test_hidden_channels_ranked_by_both_norms_of_every_layer():
    cfg = _config(num_layers=2, hidden_size=4)
    norms = torch.zeros(2, 2, 4)
    norms[0, 0] = torch.tensor([3.0, 0.0, 0.0, 1.0])  # channel 0 wins one norm
    norms[1, 1] = torch.tensor([0.0, 2.0, 2.5, 1.0])  # channel 3 is second only in the sum
    plan = make_plan(_scores(cfg, hidden_norms=norms), PruneTargets(hidden_size=2))
    assert plan.hidden == (0, 2)  # sums 3.0, 2.0, 2.5, 2.0


@pytest.mark.parametrize("targets,message", [
    (dict(ffn_hidden_size=9), "larger than the model's ffn_hidden_size=8"),
    (dict(num_attention_heads=3), "not a multiple of the query groups"),
    (dict(num_attention_heads=4, num_query_groups=1), "heads per group"),
    (dict(num_layers=9), "larger than the model's num_layers=4"),
    (dict(drop_layers=(0, 4)), "outside 0..3"),
    (dict(drop_layers=(0, 1, 2, 3)), "removes every layer"),
    (dict(drop_layers=(1,), num_layers=2), "give one of the two"),
])
def test_bad_targets_are_one_actionable_user_error(targets, message):
    with pytest.raises(UserError, match=message):
        make_plan(_scores(_config()), PruneTargets(**targets))


def test_depth_method_without_its_scores_names_the_importance_flag():
    with pytest.raises(UserError, match="--depth-metrics block:2"):
        make_plan(_scores(_config()), PruneTargets(num_layers=2, depth_method="block"))


@pytest.mark.parametrize("bad", [dict(ffn_hidden_size=0), dict(hidden_size=-4),
                                 dict(drop_layers=(1, 1)), dict(depth_method="random")])
def test_invalid_targets_refused_at_construction(bad):
    with pytest.raises(UserError):
        PruneTargets(**bad)
