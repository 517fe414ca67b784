"""Pruning: masking equivalence, a plain-torch reference slice, and the pruned checkpoint
written at TP=2×PP=2 equal to the one written at TP=1 and loadable at any layout."""

from __future__ import annotations

import pytest
import torch

from minitron_megatron.checkpoint import find_checkpoint
from minitron_megatron.importance import ImportanceConfig, estimate_importance
from minitron_megatron.importance.depth import skip_layers
from minitron_megatron.model.build import count_parameters
from minitron_megatron.model.forward import full_logits
from minitron_megatron.pruning import PruneTargets, apply_plan, make_plan, prune_checkpoint
from minitron_megatron.pruning.apply import PLAN_FILE
from minitron_megatron.runtime.distributed import LaunchEnv, shutdown
from minitron_megatron.testing.multiprocess import run_distributed
from tests import factories
from tests import reference_model as ref
from tests.pruning_helpers import CALIB, DEPTH, calibration_samples, load_at

MODELS = {"llama": "llama_ckpt_untied", "gpt": "gpt_ckpt"}


def _scores(model, ps, info, depth=("bi",)):
    return estimate_importance(model, ps, calibration_samples(), model_config=info.model_config,
                               config=ImportanceConfig(depth_metrics=depth), **CALIB)


def _masked_logits(model, ps, plan, tokens, axis):
    """The unpruned model with the plan's pruned units zeroed (or its layers skipped)."""
    cfg, d = plan.source, plan.source.kv_channels
    saved = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    kept_layers = [lp.source for lp in plan.layers]
    try:
        with torch.no_grad():
            for lp in plan.layers:
                layer = model.decoder.layers[lp.source]
                if axis == "ffn":
                    drop = [i for i in range(cfg.ffn_hidden_size) if i not in lp.ffn]
                    layer.mlp.linear_fc2.weight[:, drop] = 0  # neuron i feeds fc2 column i
                if axis in ("heads", "query_groups"):
                    for j in range(cfg.num_attention_heads):
                        if j not in lp.heads:
                            layer.self_attention.linear_proj.weight[:, j * d:(j + 1) * d] = 0
        dropped = [i for i in range(cfg.num_layers) if i not in kept_layers]
        with skip_layers(model, dropped):
            return full_logits(model, ps, tokens)
    finally:
        model.load_state_dict(saved, strict=False)


@pytest.mark.parametrize("which", sorted(MODELS))
def test_masking_equivalence(which, request):
    """Pruning neurons / heads / query groups / layers = zeroing or skipping them; a
    keep-everything plan gives identical logits."""
    ps, info, model = load_at(LaunchEnv(), request.getfixturevalue(MODELS[which]))
    try:
        cfg, tokens = info.model_config, factories.sample_tokens()
        scores = _scores(model, ps, info)
        original = full_logits(model, ps, tokens)
        kept_all, same_cfg = apply_plan(model, make_plan(scores, PruneTargets()), ps)
        assert same_cfg == cfg
        assert torch.equal(full_logits(kept_all, ps, tokens), original)

        groups_target = 1 if cfg.heads_per_group > 1 else cfg.num_query_groups // 2
        plain = dict(position0_fold=False)  # the paper's slicing: pruned = masked
        cases = {"ffn": PruneTargets(ffn_hidden_size=cfg.ffn_hidden_size // 2),
                 "heads": PruneTargets(num_attention_heads=cfg.num_attention_heads // 2,
                                       **plain),
                 "query_groups": PruneTargets(num_query_groups=groups_target, **plain),
                 "layers": PruneTargets(num_layers=cfg.num_layers // 2)}
        for axis, targets in cases.items():
            plan = make_plan(scores, targets)
            pruned, _ = apply_plan(model, plan, ps)
            got = full_logits(pruned, ps, tokens)
            want = _masked_logits(model, ps, plan, tokens, axis)
            assert (got - original).abs().max() > 1e-3, axis  # something was really removed
            assert torch.allclose(got, want, atol=2e-5, rtol=1e-5), (
                axis, (got - want).abs().max().item())
    finally:
        shutdown()


def test_position0_fold_keeps_the_first_position_exactly(llama_ckpt_untied):
    """With heads pruned inside their groups, the fold leaves the logits at position 0 (for any
    first token) equal to the unpruned model's; plain slicing does not. Elsewhere both change."""
    ps, info, model = load_at(LaunchEnv(), llama_ckpt_untied)
    try:
        cfg, tokens = info.model_config, factories.sample_tokens(batch=4)
        tokens[:, 0] = torch.tensor([0, 1, 7, 300])  # several first tokens
        scores = _scores(model, ps, info)
        original = full_logits(model, ps, tokens)
        heads = cfg.num_attention_heads // 2
        for fold in (True, False):
            plan = make_plan(scores, PruneTargets(num_attention_heads=heads, position0_fold=fold))
            assert plan.position0_fold is fold
            pruned, _ = apply_plan(model, plan, ps)
            got = full_logits(pruned, ps, tokens)
            first = (got[:, 0] - original[:, 0]).abs().max().item()
            assert (first < 2e-5) is fold, (fold, first)
            assert (got[:, 1:] - original[:, 1:]).abs().max() > 1e-3  # heads really removed
    finally:
        shutdown()


def reference_slice(cfg, sd: dict, plan) -> dict:
    """The plan applied with plain tensor indexing (heads via a [G, n+2, d, ...] view)."""
    n, d, G, F = cfg.heads_per_group, cfg.kv_channels, cfg.num_query_groups, cfg.ffn_hidden_size
    hid = list(plan.hidden)
    out = {"embedding.word_embeddings.weight": sd["embedding.word_embeddings.weight"][:, hid],
           "decoder.final_layernorm.weight": sd["decoder.final_layernorm.weight"][hid]}
    for name in ("embedding.position_embeddings.weight", "output_layer.weight"):
        if name in sd:
            out[name] = sd[name][:, hid]
    if "decoder.final_layernorm.bias" in sd:
        out["decoder.final_layernorm.bias"] = sd["decoder.final_layernorm.bias"][hid]
    for t, lp in enumerate(plan.layers):
        src, dst = f"decoder.layers.{lp.source}.", f"decoder.layers.{t}."

        def get(name, src=src):
            return sd.get(src + name)

        def put(name, value, dst=dst):
            if value is not None:
                out[dst + name] = value

        for norm in ("input_layernorm", "pre_mlp_layernorm"):
            put(norm + ".weight", get(norm + ".weight")[hid])
            if get(norm + ".bias") is not None:
                put(norm + ".bias", get(norm + ".bias")[hid])
        for part in ("weight", "bias"):
            qkv = get("self_attention.linear_qkv." + part)
            if qkv is None:
                continue
            original = qkv.reshape(G, n + 2, d, *qkv.shape[1:])  # [G, n+2, d, (h)]
            blocks = original.clone()
            for kept, pruned in lp.head_residual:  # W_q[i] ← 2·W_q[i] − W_q[j]
                blocks[kept // n, kept % n] = (2 * original[kept // n, kept % n]
                                               - original[pruned // n, pruned % n])
            rows = torch.stack([torch.cat([blocks[g, [j % n for j in lp.heads if j // n == g]],
                                           blocks[g, n:]]) for g in lp.query_groups])
            rows = rows.reshape(-1, *qkv.shape[1:])
            put("self_attention.linear_qkv." + part, rows[:, hid] if part == "weight" else rows)
        proj = get("self_attention.linear_proj.weight").reshape(-1, G, n, d)  # [h, G, n, d]
        if plan.position0_fold:  # each kept head += (1/k) Σ the pruned heads of its group
            proj = proj.clone()
            for g in lp.query_groups:
                keep = [j % n for j in lp.heads if j // n == g]
                drop = [j for j in range(n) if j not in keep]
                proj[:, g, keep] += proj[:, g, drop].sum(1, keepdim=True) / len(keep)
        cols = [j * d + c for j in lp.heads for c in range(d)]
        put("self_attention.linear_proj.weight", proj.reshape(proj.shape[0], -1)[hid][:, cols])
        fc1_rows = list(lp.ffn) + ([F + i for i in lp.ffn] if cfg.gated_linear_unit else [])
        put("mlp.linear_fc1.weight", get("mlp.linear_fc1.weight")[fc1_rows][:, hid])
        put("mlp.linear_fc2.weight", get("mlp.linear_fc2.weight")[hid][:, list(lp.ffn)])
        if cfg.add_bias_linear:
            put("mlp.linear_fc1.bias", get("mlp.linear_fc1.bias")[fc1_rows])
            put("mlp.linear_fc2.bias", get("mlp.linear_fc2.bias")[hid])
            put("self_attention.linear_proj.bias", get("self_attention.linear_proj.bias")[hid])
    return out


@pytest.mark.parametrize("which", sorted(MODELS))
def test_pruning_matches_reference_slice(which, request):
    """Hidden channels alone, then every axis at once with depth and the head residual."""
    ps, info, model = load_at(LaunchEnv(), request.getfixturevalue(MODELS[which]))
    try:
        cfg, tokens = info.model_config, factories.sample_tokens()
        scores = _scores(model, ps, info)
        sd = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
        everything = PruneTargets(hidden_size=40, ffn_hidden_size=cfg.ffn_hidden_size // 2,
                                  num_attention_heads=2, num_layers=3, head_residual=True)
        for targets in (PruneTargets(hidden_size=40), everything):
            plan = make_plan(scores, targets)
            pruned, target = apply_plan(model, plan, ps)
            got = full_logits(pruned, ps, tokens)
            want, _ = ref.forward(target, reference_slice(cfg, sd, plan), tokens)
            assert torch.allclose(got.double(), want, atol=1e-4), (got - want).abs().max()
        assert any(lp.head_residual for lp in plan.layers)
    finally:
        shutdown()


def prune_at_tp2_pp2(env, ckpts: list[str], plans: list, outs: list[str], tokens):
    """Prune each checkpoint at TP=2×PP=2, then load the result at TP=2: its logits and its
    parameter count (summed over ranks)."""
    results = []
    try:
        for ckpt, plan, out in zip(ckpts, plans, outs, strict=True):
            ps, info, _ = load_at(env, ckpt, 2, 2)
            prune_checkpoint(info, plan, out, ps)
            ps, _, pruned = load_at(env, out, 2, 1)
            logits = full_logits(pruned, ps, tokens)
            results.append((logits if ps.tp_rank == 0 else None,
                            count_parameters(pruned, ps)))
    finally:
        shutdown()
    return results


@pytest.mark.multiprocess
def test_pruned_at_tp2_pp2_equals_pruned_at_tp1(llama_ckpt_untied, gpt_ckpt, tmp_path):
    tokens = factories.sample_tokens()
    ckpts, plans = [str(llama_ckpt_untied), str(gpt_ckpt)], []
    for ckpt, targets in ((ckpts[0], PruneTargets(hidden_size=48, ffn_hidden_size=48,
                                                  num_attention_heads=2, drop_layers=(1,))),
                          (ckpts[1], PruneTargets(hidden_size=48, ffn_hidden_size=64,
                                                  num_attention_heads=2, num_layers=2,
                                                  depth_method="block", head_residual=True))):
        ps, info, model = load_at(LaunchEnv(), ckpt)
        try:
            plans.append(make_plan(_scores(model, ps, info, DEPTH), targets))
        finally:
            shutdown()
    outs = [str(tmp_path / f"tp2pp2_{i}") for i in range(2)]
    per_rank = run_distributed(prune_at_tp2_pp2, 4, ckpts, plans, outs, tokens)
    for i, (ckpt, plan) in enumerate(zip(ckpts, plans, strict=True)):
        ps, info, _ = load_at(LaunchEnv(), ckpt)
        try:
            prune_checkpoint(info, plan, tmp_path / f"tp1_{i}", ps)
            _, a_info, a = load_at(LaunchEnv(), outs[i])
            _, b_info, b = load_at(LaunchEnv(), tmp_path / f"tp1_{i}")
            assert a_info.model_config == b_info.model_config == plan.target
            assert (a_info.path / PLAN_FILE).read_text() == (b_info.path / PLAN_FILE).read_text()
            a_state, b_state = a.state_dict(), b.state_dict()
            for name, tensor in b_state.items():
                if torch.is_tensor(tensor):
                    assert torch.equal(a_state[name], tensor), name
            at_tp1 = full_logits(a, ps, tokens)
            assert torch.equal(at_tp1, full_logits(b, ps, tokens))
        finally:
            shutdown()
        assert {r[i][1] for r in per_rank} == {plan.target.num_parameters()}
        tp2 = [r[i][0] for r in per_rank if r[i][0] is not None]
        assert len(tp2) == 2  # TP rank 0 of both DP replicas
        for logits in tp2:
            assert torch.allclose(logits, at_tp1, atol=1e-5, rtol=1e-5), (
                (logits - at_tp1).abs().max())
    assert find_checkpoint(outs[0]).model_config.num_layers == 3
