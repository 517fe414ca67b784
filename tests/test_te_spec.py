"""The TransformerEngine layer spec, simulated on CPU (``testing/te_standin.py``): Megatron-Core's
own TE spec built from stand-ins with TE's traits (fused norm+linear owning ``layer_norm_weight``,
``IdentityOp`` norms, ``_extra_state``, a TE final norm). At TP=2 with sequence parallel, PP=2 and
DP=2, against the local spec on the same ranks and against one process: the sharded keys agree,
checkpoints load both ways with identical logits, importance scores and pruned weights agree."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from minitron_megatron.checkpoint import (
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from minitron_megatron.config import ParallelConfig
from minitron_megatron.importance import ImportanceConfig, estimate_importance
from minitron_megatron.model.build import build_model
from minitron_megatron.model.forward import full_logits
from minitron_megatron.pruning import PruneTargets, apply_plan, make_plan
from minitron_megatron.runtime.distributed import LaunchEnv, init_distributed, shutdown
from minitron_megatron.testing.multiprocess import run_distributed
from minitron_megatron.testing.te_standin import simulated_transformer_engine
from tests import factories
from tests.pruning_helpers import CALIB, as_tensors, calibration_samples, from_tensors

LAYOUTS = [(2, 1, True), (1, 2, False), (1, 1, False)]  # (TP, PP, SP) on 2 ranks
SETTINGS = ImportanceConfig(depth_metrics=("bi",))


def _sharded(model) -> dict[str, tuple]:
    """Sharded key → (kind, global shape, global offset) of this rank's entries."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    for item in nested_values(model.sharded_state_dict()):
        if isinstance(item, ShardedTensor):
            out[item.key] = ("tensor", tuple(item.global_shape), tuple(item.global_offset))
        else:
            out[item.key] = ("object",)
    return out


def _load(info, ps, spec):
    """The local spec as on a CPU machine, or the TE spec as with TE installed."""
    with simulated_transformer_engine() if spec == "te" else contextlib.nullcontext():
        model = build_model(info.model_config, ps, init_weights=False, spec=spec)
    load_checkpoint(info, model=model)
    return model


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)
            and not k.endswith("_extra_state")}


def te_against_local(env, ckpts: list[str], workdir: str, tokens: torch.Tensor, data: list):
    """Per layout and checkpoint, this rank's comparison of the TE and local specs."""
    out = []
    try:
        for tp, pp, sp in LAYOUTS if env.world_size > 1 else [(1, 1, False)]:
            ps = init_distributed(env, ParallelConfig(tensor_model_parallel_size=tp,
                                                      pipeline_model_parallel_size=pp,
                                                      sequence_parallel=sp))
            for c, ckpt in enumerate(ckpts):
                out.append(_compare(ps, find_checkpoint(ckpt),
                                    Path(workdir) / f"{tp}{pp}{sp}{c}", tokens, data))
    finally:
        shutdown()
    return out


def _compare(ps, info, workdir: Path, tokens, data) -> dict:
    local, te = _load(info, ps, "local"), _load(info, ps, "te")  # local-written ckpt → TE
    assert te.layer_spec == "te" and local.layer_spec == "local"
    qkv = te.decoder.layers[0].self_attention.linear_qkv
    assert hasattr(qkv, "layer_norm_weight") and "core_attention._extra_state" in "".join(
        te.state_dict())
    keys_local, keys_te = _sharded(local), _sharded(te)
    result = {"keys_equal": {k: v for k, v in keys_te.items() if k in keys_local} == keys_local,
              "te_only_keys": sorted(set(keys_te) - set(keys_local)),
              "last_stage": ps.is_last_stage}

    logits = {"local": full_logits(local, ps, tokens), "te": full_logits(te, ps, tokens)}
    scores = {spec: as_tensors(estimate_importance(model, ps, data, model_config=info.model_config,
                                                   config=SETTINGS, **CALIB))
              for spec, model in (("local", local), ("te", te))}
    result["scores"] = scores

    # prune both with the same plan, then save the TE-pruned model: a TE-written checkpoint
    cfg = info.model_config
    plan = make_plan(_from(scores["local"], info.model_config),
                     PruneTargets(ffn_hidden_size=cfg.ffn_hidden_size // 2, hidden_size=48,
                                  num_attention_heads=2, num_query_groups=2))
    pruned_local, pcfg = apply_plan(local, plan, ps)
    with simulated_transformer_engine():  # the pruned model is built with the source's spec
        pruned_te, _ = apply_plan(te, plan, ps)
    assert pruned_te.layer_spec == "te"
    save_checkpoint(workdir / "pruned_te", model=pruned_te, model_config=pcfg)
    save_checkpoint(workdir / "te", model=te, model_config=cfg)

    te_written = find_checkpoint(workdir / "te")
    back = _load(te_written, ps, "local")  # TE-written checkpoint → local spec
    again = _load(te_written, ps, "te")  # and → TE
    pruned_back = _load(find_checkpoint(workdir / "pruned_te"), ps, "local")
    logits.update(back=full_logits(back, ps, tokens), again=full_logits(again, ps, tokens),
                  pruned_local=full_logits(pruned_local, ps, tokens),
                  pruned_te=full_logits(pruned_te, ps, tokens))
    want, got = _params(pruned_local), _params(pruned_back)
    result["pruned_keys_equal"] = sorted(want) == sorted(got)
    result["pruned_max_diff"] = max((want[k] - got[k]).abs().max().item() for k in want)
    result["logits"] = logits
    return result


def _from(tensors, cfg):
    return from_tensors(tensors, cfg, SETTINGS)


@pytest.mark.multiprocess
def test_te_spec_matches_local_spec_at_every_layout(llama_ckpt_untied, gpt_ckpt, tmp_path):
    tokens, data = factories.sample_tokens(), calibration_samples()
    ckpts = [str(llama_ckpt_untied), str(gpt_ckpt)]
    single = run_distributed(te_against_local, 1, ckpts, str(tmp_path / "one"), tokens, data)[0]
    per_rank = run_distributed(te_against_local, 2, ckpts, str(tmp_path / "two"), tokens, data)
    for rank, results in enumerate(per_rank):
        for i, result in enumerate(results):
            layout, c = LAYOUTS[i // len(ckpts)], i % len(ckpts)
            where = f"rank {rank} layout {layout} {ckpts[c]}"
            reference = single[c]
            assert result["keys_equal"], where
            # TE's final norm (last stage) carries _extra_state, which a local model has none of
            te_only = result["te_only_keys"]
            assert all(k.endswith("._extra_state") for k in te_only), (where, te_only)
            assert bool(te_only) == result["last_stage"], (where, te_only)
            for key, want in reference["scores"]["local"].items():
                for spec in ("local", "te"):
                    got = result["scores"][spec][key]
                    assert torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-7), (
                        where, spec, key)
            assert result["pruned_keys_equal"] and result["pruned_max_diff"] == 0.0, where
            logits = result["logits"]
            if logits["local"] is None:  # not the last pipeline stage
                continue
            for name in ("local", "te", "back", "again"):
                err = (logits[name] - reference["logits"]["local"]).abs().max().item()
                assert err <= 1e-5, (where, name, err)
            err = (logits["pruned_te"] - reference["logits"]["pruned_local"]).abs().max().item()
            assert err <= 1e-5, (where, "pruned", err)
            assert (logits["pruned_local"] - logits["local"]).abs().max() > 1e-3  # pruned


def test_only_extra_state_may_be_missing(llama_ckpt_untied, tmp_path):
    """A checkpoint lacking a real tensor still fails, with a one-line CheckpointError."""
    ps = init_distributed(LaunchEnv(), ParallelConfig())
    try:
        info = find_checkpoint(llama_ckpt_untied)
        model = _load(info, ps, "local")
        original = model.sharded_state_dict

        def without_a_norm(*args, **kwargs):
            state = original(*args, **kwargs)
            state.pop("decoder.final_layernorm.weight")
            return state

        model.sharded_state_dict = without_a_norm
        save_checkpoint(tmp_path / "incomplete", model=model, model_config=info.model_config)
        with pytest.raises(CheckpointError, match="lacks tensors.*final_layernorm.weight"):
            _load(find_checkpoint(tmp_path / "incomplete"), ps, "local")
    finally:
        shutdown()
