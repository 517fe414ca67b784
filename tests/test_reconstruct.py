"""``importance --save-stats`` + ``prune --reconstruct``: the Gram statistics equal a plain-PyTorch
reference, the least-squares solve equals independent solvers (with and without the position-0
constraint), the refit layers fit the calibration data better than slicing, and statistics and
refit weights are the same at every TP × PP × DP layout as on one process."""

from __future__ import annotations

import pytest
import torch

from minitron_megatron.importance import ImportanceConfig, estimate_importance
from minitron_megatron.importance.stats import GramStats
from minitron_megatron.model.forward import full_logits
from minitron_megatron.pruning import PruneTargets, apply_plan, make_plan, prune_checkpoint
from minitron_megatron.pruning.reconstruct import (
    ReconstructConfig,
    Reconstructor,
    group_sum_constraint,
    solve,
)
from minitron_megatron.pruning.slicing import layer_index
from minitron_megatron.runtime.distributed import LaunchEnv, shutdown
from minitron_megatron.testing.multiprocess import run_distributed
from tests import factories
from tests import reference_model as ref
from tests.pruning_helpers import CALIB, calibration_samples, load_at

MODELS = {"llama": "llama_ckpt_untied", "gpt": "gpt_ckpt"}
NO_DEPTH = ImportanceConfig(depth_metrics=())


def _unit_rms(x, cfg):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_epsilon)


def _inputs(cfg, acts, layer):
    """The reference inputs whose Grams are gathered, ``[tokens, n]`` (fp64): of linear_proj,
    linear_fc2, and (RMSNorm) the unit-RMS residual entering each norm."""
    heads = acts[layer]["heads"]  # [b, s, H, d]
    out = {"proj": heads.reshape(-1, heads.shape[2] * heads.shape[3]),
           "fc2": acts[layer]["act"].reshape(-1, cfg.ffn_hidden_size)}
    if cfg.normalization == "RMSNorm":
        for kind, key in (("qkv", "x_in"), ("fc1", "x_mid")):
            out[kind] = _unit_rms(acts[layer][key], cfg).reshape(-1, cfg.hidden_size)
    return out


def _full(stats, kind, layer):
    return stats.rows(kind, layer, torch.arange(stats.width(kind)))


@pytest.mark.parametrize("which", sorted(MODELS))
def test_gram_statistics_equal_reference(which, request, tmp_path):
    ps, info, model = load_at(LaunchEnv(), request.getfixturevalue(MODELS[which]))
    try:
        cfg, data = info.model_config, calibration_samples()  # 10 samples: last batch padded
        estimate_importance(model, ps, data, model_config=cfg, config=NO_DEPTH,
                            stats_dir=tmp_path / "stats", **CALIB)
        _, acts = ref.forward(cfg, model.state_dict(), torch.stack([d["tokens"] for d in data]))
    finally:
        shutdown()
    stats = GramStats.load(tmp_path / "stats")
    assert stats.model_config == cfg and stats.tokens == 10 * 32
    rms = cfg.normalization == "RMSNorm"
    assert stats.kinds == (("proj", "fc2", "qkv", "fc1") if rms else ("proj", "fc2"))
    for layer in range(cfg.num_layers):
        for kind, z in _inputs(cfg, acts, layer).items():
            want = z.T @ z  # [n, n] over the 320 real tokens
            got = _full(stats, kind, layer).double()
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max()), kind
    rows = torch.tensor([5, 1, 3])  # any rows, in any order
    assert torch.equal(stats.rows("fc2", 1, rows), _full(stats, "fc2", 1)[rows])


def test_solve_equals_independent_least_squares():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 12, dtype=torch.float64, generator=g) @ torch.randn(
        12, 12, dtype=torch.float64, generator=g)  # correlated inputs [tokens, n]
    w = torch.randn(5, 12, dtype=torch.float64, generator=g)  # [h, n]
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    gram, ridge = z.T @ z, 1e-2
    x = solve(gram[keep], w, keep, ridge)
    lam = ridge * gram[keep][:, keep].diagonal().mean()
    a = torch.cat([z[:, keep], lam.sqrt() * torch.eye(len(keep), dtype=torch.float64)])
    b = torch.cat([z @ w.T, torch.zeros(len(keep), 5, dtype=torch.float64)])
    want = torch.linalg.lstsq(a, b).solution.T  # ridge least squares, augmented form
    assert torch.allclose(x, want, atol=1e-9)

    # with C Xᵀ = E: the minimiser over the constraint's affine set (null-space reference)
    c = torch.tensor([[1.0, 1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 1.0, 1.0]], dtype=torch.float64)
    e = torch.randn(2, 5, dtype=torch.float64, generator=g)
    xc = solve(gram[keep], w, keep, ridge, (c, e))
    assert torch.allclose(c @ xc.T, e, atol=1e-9)
    particular = torch.linalg.pinv(c) @ e  # [|K|, h]
    null = torch.linalg.svd(c).Vh[2:].T  # [|K|, |K| − 2]
    y = torch.linalg.lstsq(a @ null, b - a @ particular).solution
    assert torch.allclose(xc.T, particular + null @ y, atol=1e-9)
    assert ((a @ xc.T - b) ** 2).sum() >= ((a @ x.T - b) ** 2).sum()  # the constraint costs


def _calibration_error(layer_w, kept_w, z, keep, rows, pruned_z=None):
    """Σ_t ‖W_R z_t − X z'_t‖² over the reference inputs (``z' = z_K`` unless given)."""
    zk = z[:, keep] if pruned_z is None else pruned_z
    return ((z @ layer_w[rows].T.double() - zk @ kept_w.T.double()) ** 2).sum().item()


def _norm_inputs(cfg, sd, acts, layer, hidden):
    """Per reader of a norm: (teacher input γ ⊙ x̂ [t, h], pruned input γ_K ⊙ x_K/rms_K(x))."""
    p = f"decoder.layers.{layer}."
    out = {}
    for kind, key, norm in (("qkv", "x_in", "input_layernorm"),
                            ("fc1", "x_mid", "pre_mlp_layernorm")):
        x, gamma = acts[layer][key].reshape(-1, cfg.hidden_size), sd[p + norm + ".weight"].double()
        out[kind] = (_unit_rms(x, cfg) * gamma, _unit_rms(x[:, hidden], cfg) * gamma[hidden])
    return out


def test_reconstruct_fits_better_than_slicing_and_keeps_position0(llama_ckpt_untied, tmp_path):
    ps, info, model = load_at(LaunchEnv(), llama_ckpt_untied)
    try:
        cfg, data = info.model_config, calibration_samples()
        scores = estimate_importance(model, ps, data, model_config=cfg, config=NO_DEPTH,
                                     stats_dir=tmp_path / "stats", **CALIB)
        sd = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
        _, acts = ref.forward(cfg, sd, torch.stack([d["tokens"] for d in data]))
        refit = Reconstructor(ReconstructConfig(stats=str(tmp_path / "stats")))
        targets = dict(hidden_size=48, ffn_hidden_size=48, num_attention_heads=2)
        plans = {fold: make_plan(scores, PruneTargets(**targets, position0_fold=fold))
                 for fold in (True, False)}
        for fold, plan in plans.items():
            sliced, _ = apply_plan(model, plan, ps)
            fitted, _ = apply_plan(model, plan, ps, reconstruct=refit)
            hidden = torch.tensor(plan.hidden)
            for t, lp in enumerate(plan.layers):
                z = _inputs(cfg, acts, lp.source)
                norms = _norm_inputs(cfg, sd, acts, lp.source, hidden)
                index = layer_index(cfg, lp, plan.hidden)
                d = cfg.kv_channels
                for kind, param, keep, rows in (
                        ("proj", "self_attention.linear_proj.weight",
                         [j * d + c for j in lp.heads for c in range(d)], hidden),
                        ("fc2", "mlp.linear_fc2.weight", list(lp.ffn), hidden),
                        ("qkv", "self_attention.linear_qkv.weight", hidden, index["qkv_rows"]),
                        ("fc1", "mlp.linear_fc1.weight", hidden, index["fc1_rows"])):
                    source = sd[f"decoder.layers.{lp.source}.{param}"]
                    inputs, pruned_in = (z[kind], None) if kind in ("proj", "fc2") else \
                        norms[kind]
                    err = {name: _calibration_error(source, m.state_dict()[
                        f"decoder.layers.{t}.{param}"], inputs, keep, rows, pruned_in)
                        for name, m in (("sliced", sliced), ("fitted", fitted))}
                    if kind == "proj" and fold:  # the folded weights satisfy the constraint,
                        # and here (one kept head per group) are its only solution
                        assert err["fitted"] <= err["sliced"] * (1 + 1e-6), (kind, t, err)
                    else:
                        assert err["fitted"] < 0.9 * err["sliced"], (fold, kind, t, err)

        # the hidden-channel refit is the mean-field formula, from the reference activations
        lp, t = plan.layers[0], 0
        for kind, (teacher_in, _) in _norm_inputs(cfg, sd, acts, lp.source, hidden).items():
            name = {"qkv": "self_attention.linear_qkv.weight", "fc1": "mlp.linear_fc1.weight"}[
                kind]
            xhat = _inputs(cfg, acts, lp.source)[kind]  # [t, h] = x / rms(x)
            inv_c = (xhat[:, hidden].pow(2).mean(0).mean()).sqrt()  # c̄⁻¹
            g = teacher_in.T @ teacher_in  # [h, h] = Σ (γ ⊙ x̂)(γ ⊙ x̂)ᵀ
            a = g[hidden][:, hidden]
            a = a + 1e-3 * a.diagonal().mean() * torch.eye(len(hidden), dtype=a.dtype)
            w = sd[f"decoder.layers.{lp.source}.{name}"].double()
            rows = layer_index(cfg, lp, plan.hidden)[f"{kind}_rows"]
            want = inv_c * torch.linalg.solve(a, g[hidden] @ w[rows].T).T
            got = fitted.state_dict()[f"decoder.layers.{t}.{name}"].double()
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max()), kind

        # heads only: the constrained refit keeps position 0 exact, as the fold does
        tokens = factories.sample_tokens(batch=3)
        original = full_logits(model, ps, tokens)
        plan = make_plan(scores, PruneTargets(num_attention_heads=2))
        fitted, _ = apply_plan(model, plan, ps, reconstruct=refit)
        got = full_logits(fitted, ps, tokens)
        assert (got[:, 0] - original[:, 0]).abs().max() < 2e-5
        assert (got[:, 1:] - original[:, 1:]).abs().max() > 1e-3
        w = sd["decoder.layers.0.self_attention.linear_proj.weight"]
        c, e = group_sum_constraint(w, cfg, plan.layers[0].heads, plan.layers[0].query_groups)
        x = fitted.state_dict()["decoder.layers.0.self_attention.linear_proj.weight"]
        assert torch.allclose(c @ x.double().T, e, atol=1e-4)
    finally:
        shutdown()


LAYOUTS = [(1, 1, False), (2, 1, True), (1, 2, False), (2, 2, False)]  # (TP, PP, SP): DP = 4/TP·PP


def stats_and_refit_at_layouts(env, ckpt, data, root, plan, single_stats):
    """Statistics written at every layout; then a pruned + refit checkpoint written at
    TP=2×PP=2 from the single-process statistics (layout-free reading)."""
    try:
        for i, (tp, pp, sp) in enumerate(LAYOUTS):
            ps, info, model = load_at(env, ckpt, tp, pp, sp)
            estimate_importance(model, ps, data, model_config=info.model_config,
                                config=NO_DEPTH, stats_dir=f"{root}/stats{i}", **CALIB)
        ps, info, _ = load_at(env, ckpt, 2, 2)
        prune_checkpoint(info, plan, f"{root}/refit_tp2pp2", ps,
                         reconstruct=ReconstructConfig(stats=single_stats))
    finally:
        shutdown()


@pytest.mark.multiprocess
def test_statistics_and_refit_equal_at_every_layout(llama_ckpt_untied, tmp_path):
    data = calibration_samples()
    ps, info, model = load_at(LaunchEnv(), llama_ckpt_untied)
    try:
        cfg = info.model_config
        scores = estimate_importance(model, ps, data, model_config=cfg, config=NO_DEPTH,
                                     stats_dir=tmp_path / "single", **CALIB)
        plan = make_plan(scores, PruneTargets(hidden_size=48, ffn_hidden_size=48,
                                              num_attention_heads=2, drop_layers=(1,)))
    finally:
        shutdown()
    run_distributed(stats_and_refit_at_layouts, 4, str(llama_ckpt_untied), data, str(tmp_path),
                    plan, str(tmp_path / "single"))
    single = GramStats.load(tmp_path / "single")
    for i, layout in enumerate(LAYOUTS):
        stats = GramStats.load(tmp_path / f"stats{i}")
        assert stats.tokens == single.tokens
        files = len(list((tmp_path / f"stats{i}").glob("gram-*.safetensors")))
        assert files == layout[0] * layout[1]  # one file per (PP stage, TP rank)
        for layer in range(cfg.num_layers):
            for kind in ("proj", "fc2", "qkv", "fc1"):
                want = _full(single, kind, layer)
                got = _full(stats, kind, layer)
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max()), (
                    layout, kind, layer)

    ps, info, _ = load_at(LaunchEnv(), llama_ckpt_untied)
    try:
        prune_checkpoint(info, plan, tmp_path / "refit_tp1", ps,
                         reconstruct=ReconstructConfig(stats=str(tmp_path / "single")))
        _, _, a = load_at(LaunchEnv(), tmp_path / "refit_tp2pp2")
        _, _, b = load_at(LaunchEnv(), tmp_path / "refit_tp1")
        _, _, c = load_at(LaunchEnv(), info.root)
        sliced, _ = apply_plan(c, plan, ps)
        a_state, b_state = a.state_dict(), b.state_dict()
        refit = 0
        for name, tensor in b_state.items():
            if torch.is_tensor(tensor):
                assert torch.allclose(a_state[name], tensor, rtol=1e-6, atol=1e-7), name
                refit += not torch.equal(tensor, sliced.state_dict()[name])
        assert refit == 4 * plan.target.num_layers  # linear_qkv, _proj, _fc1, _fc2 per layer
    finally:
        shutdown()


def test_reconstruct_config_takes_a_path(tmp_path):
    """A ``pathlib.Path`` for the stats directory (as the Python API's users pass one) is kept as
    its string, so the config still serialises into the pruned checkpoint."""
    import json

    cfg = ReconstructConfig(stats=tmp_path / "stats")
    assert cfg.stats == str(tmp_path / "stats")
    assert json.loads(cfg.to_json())["stats"] == str(tmp_path / "stats")
