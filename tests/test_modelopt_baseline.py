"""The ModelOpt baseline of benchmarks/ really prunes to the target and evaluates the result.

Needs the optional peer ``nvidia-modelopt==0.43.0`` (``pip install -c constraints.txt
nvidia-modelopt==0.43.0 requests huggingface_hub``), hence marked ``integration``; without it the
tests fail with that install command instead of skipping.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import modelopt_baseline as mb
from minitron_megatron.checkpoint import find_checkpoint, load_checkpoint
from minitron_megatron.config import ModelConfig, ParallelConfig
from minitron_megatron.data.loaders import DataConfig, build_datasets, micro_batches
from minitron_megatron.model.build import build_model
from minitron_megatron.model.forward import full_logits
from minitron_megatron.runtime.distributed import LaunchEnv, distributed
from tests.factories import sample_tokens

pytestmark = [pytest.mark.integration, pytest.mark.modelopt]

GPT2_STYLE = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                         vocab_size=384, normalization="LayerNorm", activation="gelu",
                         gated_linear_unit=False, position_embedding_type="learned_absolute",
                         add_bias_linear=True, tie_embeddings=True, max_position_embeddings=64)


def _random_weights(model: torch.nn.Module) -> None:
    """O(1) logits and non-zero biases, so a mis-permuted tensor shows in the output."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.15)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_size_target_only_permutes_channels(arch, llama_ckpt_untied, tiny_dataset):
    """Every hparam ranked and re-ordered (neurons, heads within groups, hidden channels through
    embeddings, norms and all linears) but nothing dropped: the network function is unchanged.
    A norm (RMSNorm for Llama, LayerNorm with bias for GPT-2) or bias that missed the
    hidden-channel permutation would change the logits."""
    tokens = sample_tokens(batch=2, seq=32)
    with distributed(LaunchEnv(), ParallelConfig()) as ps:
        if arch == "llama":
            cfg = find_checkpoint(llama_ckpt_untied).model_config
            model = build_model(cfg, ps, init_weights=False, spec="local")
            load_checkpoint(find_checkpoint(llama_ckpt_untied), model=model)
        else:
            cfg = GPT2_STYLE
            model = build_model(cfg, ps, spec="local")
            _random_weights(model)
        full = {name: getattr(cfg, name) for name in mb.PRUNABLE}
        before = full_logits(model, ps, tokens)
        embedding = model.embedding.word_embeddings.weight.detach().clone()
        data = DataConfig(data_path=tiny_dataset, seq_length=32)
        train = build_datasets(data, eod_id=0, vocab_size=384, num_samples={"train": 8})["train"]
        model, _ = mb.modelopt_prune(model, cfg, ps, full, list(micro_batches(train, range(8), 4)),
                                     seq_length=32, micro_batch_size=4)
        after = full_logits(model, ps, tokens)
    permuted = model.embedding.word_embeddings.weight
    assert permuted.shape == embedding.shape and not torch.equal(permuted, embedding)
    assert torch.equal(permuted.sort(dim=1).values, embedding.sort(dim=1).values)
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-5)


def test_unpruned_weights_are_caught(llama_ckpt_untied):
    """ModelOpt may rewrite the config yet leave a weight at full size; the check names it."""
    cfg = find_checkpoint(llama_ckpt_untied).model_config
    with distributed(LaunchEnv(), ParallelConfig()) as ps:
        full = build_model(cfg, ps, init_weights=False, spec="local")
        target = mb.build_target_model(cfg, ps, {"ffn_hidden_size": 48})
        mb.verify_shapes(target, target)
        with pytest.raises(RuntimeError, match=r"linear_fc1.weight: \[192, 64\] \(expected \[96"):
            mb.verify_shapes(full, target)


def test_prunes_to_target_shapes_and_evaluates(llama_ckpt_untied, tiny_dataset):
    # tiny Llama: 4 layers, hidden 64, 4 heads / 2 groups (kv 16), ffn 96, vocab 384, untied
    targets = {"ffn_hidden_size": 48, "hidden_size": 48, "num_attention_heads": 2,
               "num_layers": 3}
    r = mb.prune_with_modelopt(str(llama_ckpt_untied), tiny_dataset, targets=targets,
                               calib_samples=8, seq_length=32, micro_batch_size=4,
                               eval_samples=8, evaluate_teacher=True)
    shapes = r["pruned_shapes"]
    # expected shapes written out from the Llama layout, not from the code under test
    assert shapes["embedding.word_embeddings.weight"] == [384, 48]
    assert shapes["output_layer.weight"] == [384, 48]
    assert shapes["decoder.final_layernorm.weight"] == [48]
    assert shapes["decoder.layers.0.input_layernorm.weight"] == [48]
    assert shapes["decoder.layers.0.self_attention.linear_qkv.weight"] == [(2 + 2 * 2) * 16, 48]
    assert shapes["decoder.layers.0.self_attention.linear_proj.weight"] == [48, 2 * 16]
    assert shapes["decoder.layers.0.mlp.linear_fc1.weight"] == [2 * 48, 48]
    assert shapes["decoder.layers.0.mlp.linear_fc2.weight"] == [48, 48]
    per_layer = 48 + 48 * 6 * 16 + 32 * 48 + 48 + 48 * 96 + 48 * 48
    assert r["num_parameters"] == 2 * 384 * 48 + 3 * per_layer + 48
    assert r["pruned_config"] == targets
    assert 0.0 < r["zero_shot_loss"] < 20.0 and 0.0 < r["teacher_loss"] < 20.0
    assert r["zero_shot_loss"] != r["teacher_loss"]
    assert r["seconds_prune"] > 0 and r["seconds_forward"] > 0


def test_unreachable_targets_fail_before_any_work(llama_ckpt_untied, tiny_dataset):
    for targets, message in [({}, "no pruning target"),
                             ({"num_query_groups": 1}, "cannot prune num_query_groups"),
                             ({"hidden_size": 80}, "must be an integer in 1..64"),
                             ({"num_attention_heads": 3}, "not a multiple of the 2 query groups")]:
        with pytest.raises(ValueError, match=message):
            mb.prune_with_modelopt(str(llama_ckpt_untied), tiny_dataset, targets=targets)
