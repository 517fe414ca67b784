"""Each CPU adapter of runtime/cpu_compat.py, exercised (numbers refer to its docstring)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from minitron_megatron.runtime import cpu_compat
from minitron_megatron.runtime.distributed import seed_everything

cpu_compat.apply()


def test_cuda_devices_become_cpu_in_patched_modules():  # 1, 4
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert p2p_communication.torch.cuda.current_device() == torch.device("cpu")
    p2p_communication.torch.cuda.synchronize()  # a no-op, not an error
    assert torch.cuda.is_available() is False  # the real torch is untouched


def test_rope_buffers_on_cpu():  # 1
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=False)
    assert rope.inv_freq.device.type == "cpu"
    assert rope(8).shape[0] == 8


def test_default_causal_mask():  # 6
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)
    assert torch.equal(mask, torch.ones(4, 4).triu(1).bool())


def test_rng_tracker_forks_the_cpu_generator():  # 2
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    parallel_state.set_tensor_model_parallel_rank(0)
    parallel_state.set_expert_model_parallel_rank(0)
    parallel_state.set_expert_tensor_parallel_rank(0)
    seed_everything(7)
    outside = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside)  # the default stream is restored
    with get_cuda_rng_tracker().fork():
        second = torch.rand(3)
    assert not torch.equal(first, second)  # the tracker's stream advanced
    seed_everything(7)
    with get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), first)  # and is reproducible from the seed


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_torch_norm_allows_sequence_parallel(normalization):  # 3
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                               normalization=normalization, sequence_parallel=True,
                               tensor_model_parallel_size=2, use_cpu_initialization=True,
                               params_dtype=torch.bfloat16, bf16=True)
    norm = WrappedTorchNorm(config, 8, eps=1e-5)
    params = list(norm.parameters())
    assert params and all(p.sequence_parallel for p in params)
    assert all(p.dtype == torch.bfloat16 for p in params)  # like the rest of a bf16 model


def test_tensor_cuda_is_identity_only_inside_embedding_setup():  # 5
    from megatron.core.models.common.language_module.language_module import LanguageModule

    with cpu_compat.tensor_cuda_is_identity():
        x = torch.ones(2)
        assert x.cuda() is x
    with pytest.raises((AssertionError, RuntimeError)):
        torch.ones(2).cuda()
    assert LanguageModule.setup_embeddings_and_output_layer.__wrapped__ is not None


def test_grad_clipping_matches_torch():  # 8
    from megatron.core.optimizer import clip_grads

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    reference = [p.grad.clone() for p in params]
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in reference])).item()
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=total)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, g in zip(ref_params, reference):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-6)


def test_gradient_sync_streams_are_no_ops():  # 10 (megatron-core >= 0.17 waits on streams)
    from megatron.core.distributed import param_and_grad_buffer

    stream = param_and_grad_buffer.torch.cuda.current_stream()
    stream.wait_event(object())
    stream.wait_stream(stream)
    with param_and_grad_buffer.torch.cuda.stream(stream):
        pass


def test_optimizers_see_cuda_type_names_only_while_constructed():  # 9
    from megatron.core.optimizer import distrib_optimizer, optimizer

    x = torch.ones(2, dtype=torch.bfloat16)
    with cpu_compat.tensor_type_reports_cuda():
        assert x.type() == "torch.cuda.BFloat16Tensor"
        assert x.float().type() == "torch.cuda.FloatTensor"
        assert x.type(torch.float32).dtype == torch.float32  # conversions still convert
    assert x.type() == "torch.BFloat16Tensor"
    for cls in (optimizer.Float16OptimizerWithFloat16Params,
                distrib_optimizer.DistributedOptimizer):
        assert cls.__init__.__wrapped__ is not None


def test_every_patched_name_exists_in_this_megatron_core():
    assert cpu_compat.missing_targets() == []


@pytest.mark.parametrize("target", cpu_compat.PATCHED_NAMES, ids=lambda t: f"{t[0]}.{t[1]}")
def test_a_renamed_name_fails_at_start_up_naming_the_version(target, monkeypatch):
    import importlib

    from minitron_megatron.runtime.mcore_compat import mcore_version

    module_name, attribute = target
    *owner, name = attribute.split(".")
    obj = importlib.import_module(module_name)
    for part in owner:
        obj = getattr(obj, part)
    for holder in getattr(obj, "__mro__", (obj,)):  # an inherited method: every definition
        if name in vars(holder):
            monkeypatch.delattr(holder, name)
    with pytest.raises(cpu_compat.MegatronCoreMismatch,
                       match=f"megatron-core {mcore_version()} lacks {module_name}.{attribute}"):
        cpu_compat.check_targets()


def test_nothing_is_applied_when_cuda_is_present():
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "from minitron_megatron.runtime import cpu_compat\n"
        "assert cpu_compat.apply() is False and not cpu_compat.is_applied()\n"
        "import megatron.core.transformer.utils as u, megatron.core.tensor_parallel.random as r\n"
        "assert u.torch is torch and r._get_cuda_rng_state.__module__ == r.__name__\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
