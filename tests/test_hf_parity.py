"""Logits parity with transformers for tiny Llama-family models, at every TP × PP layout."""

from __future__ import annotations

import pytest
import torch

from minitron_megatron.checkpoint import find_checkpoint, load_checkpoint
from minitron_megatron.config import ParallelConfig
from minitron_megatron.model.build import build_model
from minitron_megatron.model.forward import full_logits
from minitron_megatron.runtime.distributed import LaunchEnv, init_distributed, shutdown
from minitron_megatron.testing.multiprocess import run_distributed
from tests import factories

TOL = 1e-4


def logits_at_layouts(env: LaunchEnv, ckpt: str, tokens: torch.Tensor, layouts: list):
    """Each layout's full logits, from the last pipeline stage of DP rank 0 (else None)."""
    out = []
    try:
        for tp, pp, sp in layouts:
            ps = init_distributed(env, ParallelConfig(tensor_model_parallel_size=tp,
                                                      pipeline_model_parallel_size=pp,
                                                      sequence_parallel=sp))
            info = find_checkpoint(ckpt)
            model = build_model(info.model_config, ps, init_weights=False)
            load_checkpoint(info, model=model)
            logits = full_logits(model, ps, tokens)
            out.append(logits if ps.dp_rank == 0 and ps.tp_rank == 0 else None)
    finally:
        shutdown()
    return out


def _single_rank_logits(ckpt, tokens):
    return logits_at_layouts(LaunchEnv(), str(ckpt), tokens, [(1, 1, False)])[0]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tp1_logits_match_transformers(tied, request):
    hf_dir = request.getfixturevalue("hf_llama_tied" if tied else "hf_llama_untied")
    ckpt = request.getfixturevalue("llama_ckpt_tied" if tied else "llama_ckpt_untied")
    tokens = factories.sample_tokens()
    expected = factories.hf_logits(hf_dir, tokens)
    ours = _single_rank_logits(ckpt, tokens)
    assert ours.shape == expected.shape  # padded vocab == vocab for imports
    assert expected.abs().max() > 1.0  # logits are not trivially small
    assert (ours - expected).abs().max() <= TOL


@pytest.mark.multiprocess
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_parallel_layouts_match_transformers(tied, request):
    """TP=2, PP=2 and TP=2×PP=2 (and TP=2 with sequence parallel) on 4 gloo ranks."""
    hf_dir = request.getfixturevalue("hf_llama_tied" if tied else "hf_llama_untied")
    ckpt = request.getfixturevalue("llama_ckpt_tied" if tied else "llama_ckpt_untied")
    tokens = factories.sample_tokens()
    expected = factories.hf_logits(hf_dir, tokens)
    layouts = [(2, 1, False), (1, 2, False), (2, 2, False), (2, 1, True)]
    per_rank = run_distributed(logits_at_layouts, 4, str(ckpt), tokens, layouts)
    for i, layout in enumerate(layouts):
        found = [r[i] for r in per_rank if r[i] is not None]
        assert found, f"no rank returned logits for {layout}"
        for logits in found:
            err = (logits - expected).abs().max().item()
            assert err <= TOL, f"layout TP,PP,SP={layout}: max abs diff {err}"


def test_round_trip_import_export(llama_ckpt_tied, hf_llama_tied, tmp_path):
    from minitron_megatron.model.convert import export_model

    with_dist = LaunchEnv()
    ps = init_distributed(with_dist, ParallelConfig())
    try:
        export_model(llama_ckpt_tied, tmp_path / "hf", ps)
    finally:
        shutdown()
    tokens = factories.sample_tokens()
    original = factories.hf_logits(hf_llama_tied, tokens)
    exported = factories.hf_logits(tmp_path / "hf", tokens)
    assert (original - exported).abs().max() <= TOL
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("ka lo mi").input_ids  # the tokenizer travels with the export


@pytest.mark.parametrize("arch,extra", [("qwen2", {}), ("mistral", {"head_dim": 24}),
                                        ("nemotron", {})],
                         ids=["qwen2-qkv-bias", "mistral-head-dim", "nemotron"])
def test_other_llama_family_round_trip(arch, extra, tmp_path):
    """Qwen2 (QKV bias), a head width ≠ hidden/heads (as after pruning heads) and Nemotron
    (LayerNorm1p, squared ReLU, half RoPE) round-trip through import and export."""
    from minitron_megatron.model.convert import export_model

    hf_dir = factories.make_hf_llama(tmp_path / "src", tied=False, arch=arch, **extra)
    ckpt = factories.import_in_process(hf_dir, tmp_path / "ckpt")
    tokens = factories.sample_tokens()
    expected = factories.hf_logits(hf_dir, tokens)
    assert (_single_rank_logits(ckpt, tokens) - expected).abs().max() <= TOL
    ps = init_distributed(LaunchEnv(), ParallelConfig())
    try:
        export_model(ckpt, tmp_path / "out", ps)
    finally:
        shutdown()
    assert (factories.hf_logits(tmp_path / "out", tokens) - expected).abs().max() <= TOL
