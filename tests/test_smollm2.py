"""The real teacher (SmolLM2-135M-Instruct GGUF): against transformers, and across layouts."""

from __future__ import annotations

import pytest
import torch

from minitron_megatron.checkpoint import find_checkpoint
from minitron_megatron.config import ParallelConfig
from minitron_megatron.data.loaders import DataConfig
from minitron_megatron.evaluate import evaluate_checkpoint
from minitron_megatron.runtime.distributed import LaunchEnv, init_distributed, shutdown
from minitron_megatron.testing.multiprocess import run_distributed
from tests.test_hf_parity import logits_at_layouts

pytestmark = pytest.mark.integration

TEXT = "Paris is the capital of France, and Berlin is the capital of Germany."


def test_loss_matches_transformers_gguf_loader(smollm2_ckpt):
    import transformers

    from minitron_megatron.data.assets import smollm2_gguf
    from minitron_megatron.data.tokenizer import Tokenizer

    gguf = smollm2_gguf()
    hf_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = hf_tok(TEXT, return_tensors="pt").input_ids
    assert Tokenizer.load(smollm2_ckpt).encode(TEXT) == ids[0].tolist()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        expected = model(ids, labels=ids).loss.item()
    logits = logits_at_layouts(LaunchEnv(), str(smollm2_ckpt), ids, [(1, 1, False)])[0]
    ours = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert abs(ours - expected) <= 1e-3, (ours, expected)
    assert 1.0 < ours < 3.0  # the measured loss of this text is ≈ 1.81


def eval_at(env, ckpt, data_path, layouts):
    data = DataConfig(data_path=data_path, seq_length=128)
    losses = []
    try:
        for tp, pp in layouts:
            ps = init_distributed(env, ParallelConfig(tensor_model_parallel_size=tp,
                                                      pipeline_model_parallel_size=pp))
            result = evaluate_checkpoint(find_checkpoint(ckpt), ps, data, num_samples=6,
                                         micro_batch_size=2)
            losses.append(result.loss)
    finally:
        shutdown()
    return losses


@pytest.mark.multiprocess
def test_same_loss_at_tp1_tp3_pp2(smollm2_ckpt, wiki_dataset):
    tp1 = eval_at(LaunchEnv(), str(smollm2_ckpt), wiki_dataset, [(1, 1)])[0]
    tp3 = run_distributed(eval_at, 3, str(smollm2_ckpt), wiki_dataset, [(3, 1)])
    pp2 = run_distributed(eval_at, 2, str(smollm2_ckpt), wiki_dataset, [(1, 2)])
    assert 1.5 < tp1 < 4.0  # a trained model on English text
    for losses in tp3 + pp2:
        assert abs(losses[0] - tp1) <= 1e-4, (losses, tp1)
