"""import-megatron: a Megatron-LM torch_dist checkpoint (args in its common state), adopted."""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch

from minitron_megatron.checkpoint import CheckpointError, find_checkpoint, save_checkpoint
from minitron_megatron.cli import main
from minitron_megatron.config import ModelConfig, ParallelConfig
from minitron_megatron.model.build import build_model
from minitron_megatron.runtime.distributed import LaunchEnv, init_distributed, shutdown
from tests import factories
from tests.test_hf_parity import logits_at_layouts

# What Megatron-LM stores for `--num-layers 2 --hidden-size 64 ... --squared-relu
# --apply-layernorm-1p --position-embedding-type rope --rotary-percent 0.5` (GPT style, Nemotron).
MLM_ARGS = Namespace(
    num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
    group_query_attention=True, num_query_groups=2, kv_channels=16, padded_vocab_size=384,
    normalization="LayerNorm", norm_epsilon=1e-5, apply_layernorm_1p=True, swiglu=False,
    squared_relu=True, position_embedding_type="rope", rotary_base=10000, rotary_percent=0.5,
    untie_embeddings_and_output_weights=True, add_bias_linear=False, add_qkv_bias=False,
    max_position_embeddings=256, params_dtype=torch.float32, transformer_impl="local",
)
EXPECTED = ModelConfig(
    num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
    kv_channels=16, vocab_size=384, padded_vocab_size=384, normalization="LayerNorm",
    zero_centered_gamma=True, activation="squared_relu", gated_linear_unit=False,
    position_embedding_type="rope", rotary_percent=0.5, tie_embeddings=False,
    max_position_embeddings=256,
)


def _megatron_lm_checkpoint(root):
    """Write the model as Megatron-LM does (its args in the common state) and drop our config."""
    ps = init_distributed(LaunchEnv(), ParallelConfig())
    try:
        torch.manual_seed(0)
        model = build_model(EXPECTED, ps)
        path = save_checkpoint(root, model=model, model_config=EXPECTED, iteration=250,
                               common_state={"args": MLM_ARGS})
    finally:
        shutdown()
    (path / "model_config.yaml").unlink()
    return root


def test_adopt_reads_args_and_links_tensors(tmp_path, tiny_tokenizer):
    source = _megatron_lm_checkpoint(tmp_path / "mlm")
    main(["import-megatron", "--load", str(source), "--save", str(tmp_path / "ours"),
          "--tokenizer", str(tiny_tokenizer.path)])
    info = find_checkpoint(tmp_path / "ours")
    assert info.model_config == EXPECTED and info.iteration == 250
    assert (info.path / "metadata.json").is_symlink() and info.tokenizer_dir is not None
    assert not (source / "iter_0000250" / "model_config.yaml").exists()  # source untouched
    reference = _megatron_lm_checkpoint(tmp_path / "reference")
    # the same weights (seeded) saved natively, to compare logits with
    (reference / "iter_0000250" / "model_config.yaml").write_text(EXPECTED.to_yaml())
    tokens = factories.sample_tokens()
    adopted = logits_at_layouts(LaunchEnv(), str(tmp_path / "ours"), tokens, [(1, 1, False)])[0]
    native = logits_at_layouts(LaunchEnv(), str(reference), tokens, [(1, 1, False)])[0]
    assert torch.equal(adopted, native)


def test_adopt_errors(tmp_path):
    from minitron_megatron.model.megatron_lm import adopt_megatron_checkpoint

    with pytest.raises(CheckpointError, match="does not exist"):
        adopt_megatron_checkpoint(tmp_path / "x", tmp_path / "o")
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration"):
        adopt_megatron_checkpoint(tmp_path, tmp_path / "o")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("5")
    (tmp_path / "iter_0000005").mkdir()
    with pytest.raises(CheckpointError, match="not a torch_dist checkpoint"):
        adopt_megatron_checkpoint(tmp_path, tmp_path / "o")
