"""Importance scores: equal to a plain-PyTorch reference of the formulas, and equal at every
TP × PP × DP layout (with and without sequence parallel) to the single-rank scores."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from minitron_megatron.importance import ImportanceConfig, Scores, estimate_importance
from minitron_megatron.pruning import PruneTargets, make_plan
from minitron_megatron.runtime.distributed import LaunchEnv, shutdown
from minitron_megatron.testing.multiprocess import run_distributed
from tests import reference_model as ref
from tests.pruning_helpers import (
    CALIB,
    DEPTH,
    as_tensors,
    calibration_samples,
    from_tensors,
    load_at,
)

MODELS = {"llama": "llama_ckpt_untied", "gpt": "gpt_ckpt"}
REF_RTOL = 1e-4  # fp32 Megatron vs the fp64 reference
LAYOUT_RTOL = 1e-5


def reference_scores(cfg, acts, batch: str, seq: str, ffn_hook: str) -> dict[str, torch.Tensor]:
    """The paper's formulas on the reference activations ([b, s, ...] layout)."""
    n = cfg.heads_per_group
    out = {"ffn": [], "heads": [], "query_groups": [], "hidden_norms": []}
    for layer in acts:
        heads = layer["heads"].norm(dim=-1)  # [b, s, H]: ‖o_j‖ per token
        b, s, H = heads.shape
        groups = heads.pow(2).view(b, s, H // n, n).sum(-1).sqrt()
        if ffn_hook == "fc2-input":
            neuron = layer["act"]
        elif cfg.gated_linear_unit:
            gate, up = layer["fc1"].chunk(2, dim=-1)
            neuron = (gate.pow(2) + up.pow(2)).sqrt()
        else:
            neuron = layer["fc1"]
        for axis, a in (("ffn", neuron), ("heads", heads), ("query_groups", groups)):
            out[axis].append(ref.batch_agg(ref.seq_agg(a, seq), batch))
        out["hidden_norms"].append(torch.stack(
            [ref.batch_agg(ref.seq_agg(layer[k], seq), batch) for k in ("norm1", "norm2")]))
    return {k: torch.stack(v) for k, v in out.items()}


def assert_close(actual, expected, rtol, what):
    actual, expected = actual.double(), expected.double()
    err = ((actual - expected).abs() / expected.abs().clamp(min=1e-6)).max().item()
    assert torch.allclose(actual, expected, rtol=rtol, atol=1e-7), f"{what}: max rel err {err}"


@pytest.mark.parametrize("which", sorted(MODELS))
def test_scores_equal_plain_torch_reference(which, request):
    """Every axis, every aggregation (batch × seq), both MLP hooks, and the depth metrics."""
    ckpt = request.getfixturevalue(MODELS[which])
    data = calibration_samples()
    tokens = torch.stack([d["tokens"] for d in data])
    labels = torch.stack([d["labels"] for d in data])
    ps, info, model = load_at(LaunchEnv(), ckpt)
    try:
        cfg, sd = info.model_config, model.state_dict()
        _, acts = ref.forward(cfg, sd, tokens)
        for batch, seq, hook in itertools.product(("l2", "mean", "var"),
                                                  ("mean", "l2", "var", "max"),
                                                  ("fc2-input", "fc1-output")):
            settings = ImportanceConfig(batch_agg=batch, seq_agg=seq, ffn_hook=hook,
                                        depth_metrics=())
            scores = estimate_importance(model, ps, data, model_config=cfg, config=settings,
                                         **CALIB)
            for axis, expected in reference_scores(cfg, acts, batch, seq, hook).items():
                assert_close(getattr(scores, axis), expected, REF_RTOL,
                             f"{axis} batch={batch} seq={seq} {hook}")
            assert_close(scores.hidden, expected.sum((0, 1)), REF_RTOL, "hidden (sum)")

        scores = estimate_importance(model, ps, data, model_config=cfg,
                                     config=ImportanceConfig(depth_metrics=DEPTH), **CALIB)
        bi = torch.stack([1 - F.cosine_similarity(a["x_in"], a["x_out"], dim=-1).mean()
                          for a in acts])
        base = ref.loss(cfg, sd, tokens, labels)
        loss = torch.tensor([ref.loss(cfg, sd, tokens, labels, (i,)) - base
                             for i in range(cfg.num_layers)])
        block = torch.tensor([ref.loss(cfg, sd, tokens, labels, (i, i + 1)) - base
                              for i in range(cfg.num_layers - 1)])
        assert abs(scores.calibration_loss - base) < 1e-5
        assert_close(scores.depth["bi"], bi, REF_RTOL, "bi")
        assert (scores.depth["loss"].double() - loss).abs().max() < 2e-5
        assert (scores.depth["block:2"].double() - block).abs().max() < 2e-5
        assert loss.abs().max() > 1e-3 and block.abs().max() > 1e-3  # not trivially zero
    finally:
        shutdown()


LAYOUTS = [(1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False), (2, 2, False),
           (2, 2, True)]  # (TP, PP, SP) on 4 ranks: DP = 4 / (TP × PP)
VAR_SETTINGS = ImportanceConfig(batch_agg="var", seq_agg="var", ffn_hook="fc1-output",
                                depth_metrics=())
VAR_LAYOUTS = [(1, 1, False), (2, 2, True)]
PEAK_SETTINGS = ImportanceConfig(seq_agg="max", depth_metrics=())  # reduced with MAX under SP


def scores_at_layouts(env, ckpts: list[str], data: list[dict]):
    """Every rank's scores at every layout, for each checkpoint (default settings with every
    depth metric, then var/var/fc1-output at two layouts)."""
    out = []
    try:
        for ckpt in ckpts:
            runs = [(layout, ImportanceConfig(depth_metrics=DEPTH)) for layout in LAYOUTS]
            runs += [(layout, VAR_SETTINGS) for layout in VAR_LAYOUTS]
            runs += [(layout, PEAK_SETTINGS) for layout in VAR_LAYOUTS]
            for (tp, pp, sp), settings in runs:
                ps, info, model = load_at(env, ckpt, tp, pp, sp)
                scores = estimate_importance(model, ps, data, model_config=info.model_config,
                                             config=settings, **CALIB)
                out.append(as_tensors(scores))
    finally:
        shutdown()
    return out


def _single_rank(ckpt, data, settings):
    ps, info, model = load_at(LaunchEnv(), ckpt)
    try:
        return estimate_importance(model, ps, data, model_config=info.model_config,
                                   config=settings, **CALIB)
    finally:
        shutdown()


@pytest.mark.multiprocess
def test_scores_equal_at_every_layout(llama_ckpt_untied, gpt_ckpt):
    """DP=4, TP=2 (±SP), PP=2 and TP=2×PP=2 (±SP), on every rank; and plans made from scores
    computed at TP=2 equal plans made from single-rank scores."""
    data = calibration_samples()
    ckpts = [str(llama_ckpt_untied), str(gpt_ckpt)]
    per_rank = run_distributed(scores_at_layouts, 4, ckpts, data)
    runs = len(LAYOUTS) + 2 * len(VAR_LAYOUTS)
    for c, ckpt in enumerate(ckpts):
        default = _single_rank(ckpt, data, ImportanceConfig(depth_metrics=DEPTH))
        var = _single_rank(ckpt, data, VAR_SETTINGS)
        peak = _single_rank(ckpt, data, PEAK_SETTINGS)
        expected = [as_tensors(default)] * len(LAYOUTS) + [as_tensors(var)] * len(
            VAR_LAYOUTS) + [as_tensors(peak)] * len(VAR_LAYOUTS)
        names = [f"{layout}" for layout in LAYOUTS] + [
            f"var {layout}" for layout in VAR_LAYOUTS] + [f"max {layout}" for layout in VAR_LAYOUTS]
        for i, (want, name) in enumerate(zip(expected, names, strict=True)):
            for rank, result in enumerate(per_rank):
                got = result[c * runs + i]
                assert sorted(got) == sorted(want)
                for key in want:
                    assert_close(got[key], want[key], LAYOUT_RTOL, f"{ckpt} {name} rank {rank} "
                                 f"{key}")

        # scores computed at TP=2 (layout 1) reused for pruning at TP=1 and vice versa
        cfg = default.model_config
        at_tp2 = from_tensors(per_rank[0][c * runs + 1], cfg, default.settings)
        targets = PruneTargets(ffn_hidden_size=cfg.ffn_hidden_size // 2, hidden_size=48,
                               num_attention_heads=2, num_layers=2)
        for method in ("bi", "loss", "block"):
            t = dataclasses.replace(targets, depth_method=method)
            assert make_plan(at_tp2, t) == make_plan(default, t), method


def test_scores_file_round_trip(tmp_path, llama_ckpt_untied):
    scores = _single_rank(str(llama_ckpt_untied), calibration_samples(),
                          ImportanceConfig(depth_metrics=("bi", "block:3")))
    loaded = Scores.load(scores.save(tmp_path / "s.safetensors"))
    assert loaded.model_config == scores.model_config and loaded.settings == scores.settings
    for name, tensor in scores.tensors().items():
        assert torch.equal(loaded.tensors()[name], tensor), name
    assert loaded.depth["block:3"].shape == (2,)
    (tmp_path / "bad.safetensors").write_bytes(b"not a scores file")
    with pytest.raises(ValueError, match="not a scores file"):
        Scores.load(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="minitron importance"):
        Scores.load(tmp_path / "missing.safetensors")
