"""Checkpoints: resharding across TP/PP, evaluation parity, atomic saves, clear errors."""

from __future__ import annotations

import pytest
import torch

from minitron_megatron import checkpoint as ckpt_module
from minitron_megatron.checkpoint import (
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from minitron_megatron.config import ParallelConfig
from minitron_megatron.data.loaders import DataConfig
from minitron_megatron.evaluate import evaluate_checkpoint
from minitron_megatron.model.build import build_model
from minitron_megatron.model.forward import full_logits
from minitron_megatron.runtime.distributed import LaunchEnv, init_distributed, shutdown
from minitron_megatron.testing.multiprocess import run_distributed
from tests import factories

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def _parallel(tp, pp):
    return ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def reshard_and_evaluate(env, src, dst, data_path, tokens):
    """Save ``src`` at TP=2×PP=2 into ``dst``; load ``dst`` at every layout: logits + eval loss."""
    data = DataConfig(data_path=data_path, seq_length=32)
    results = []
    try:
        ps = init_distributed(env, _parallel(2, 2))
        info = find_checkpoint(src)
        model = build_model(info.model_config, ps, init_weights=False)
        load_checkpoint(info, model=model)
        save_checkpoint(dst, model=model, model_config=info.model_config, iteration=7,
                        tokenizer_dir=info.tokenizer_dir)
        for tp, pp in LAYOUTS:
            ps = init_distributed(env, _parallel(tp, pp))
            info = find_checkpoint(dst)
            model = build_model(info.model_config, ps, init_weights=False)
            load_checkpoint(info, model=model)
            logits = full_logits(model, ps, tokens)
            result = evaluate_checkpoint(info, ps, data, num_samples=8, micro_batch_size=2,
                                         window_starts=True)
            results.append((logits if ps.tp_rank == 0 else None, result.loss,
                            result.window_starts))
    finally:
        shutdown()
    return results


@pytest.mark.multiprocess
def test_saved_at_tp2_pp2_loads_everywhere(llama_ckpt_untied, tiny_dataset, tmp_path):
    tokens = factories.sample_tokens()
    per_rank = run_distributed(reshard_and_evaluate, 4, str(llama_ckpt_untied),
                               str(tmp_path / "resharded"), tiny_dataset, tokens)
    # single-process reference on the original (TP=1) checkpoint
    reference = reshard_reference(llama_ckpt_untied, tiny_dataset, tokens)
    info = find_checkpoint(tmp_path / "resharded")
    assert info.iteration == 7 and info.tokenizer_dir is not None
    for i, layout in enumerate(LAYOUTS):
        for logits, loss, by_start in (r[i] for r in per_rank):
            assert abs(loss - reference[1]) <= 1e-5, (layout, loss, reference[1])
            assert sorted(by_start) == sorted(reference[2])
            for key, value in reference[2].items():  # loss by window start, every layout
                assert abs(by_start[key] - value) <= 1e-5, (layout, key)
            if logits is not None:
                assert (logits - reference[0]).abs().max() <= 1e-5, layout


def reshard_reference(ckpt, data_path, tokens):
    ps = init_distributed(LaunchEnv(), ParallelConfig())
    try:
        info = find_checkpoint(ckpt)
        model = build_model(info.model_config, ps, init_weights=False)
        load_checkpoint(info, model=model)
        data = DataConfig(data_path=data_path, seq_length=32)
        result = evaluate_checkpoint(info, ps, data, num_samples=8, micro_batch_size=2,
                                     window_starts=True)
        return full_logits(model, ps, tokens), result.loss, result.window_starts
    finally:
        shutdown()


def test_failed_save_keeps_previous_checkpoint(llama_ckpt_untied, tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    ps = init_distributed(LaunchEnv(), ParallelConfig())
    try:
        info = find_checkpoint(llama_ckpt_untied)
        model = build_model(info.model_config, ps, init_weights=False)
        load_checkpoint(info, model=model)
        root = tmp_path / "run"
        save_checkpoint(root, model=model, model_config=info.model_config, iteration=1)
        before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}

        def crash(state, directory, *args, **kwargs):
            (ckpt_module.Path(directory) / "__0_0.distcp").write_bytes(b"partial")
            raise RuntimeError("disk full")

        monkeypatch.setattr(dist_checkpointing, "save", crash)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        for iteration in (2, 1):  # a new iteration, and overwriting the latest one
            with pytest.raises(RuntimeError, match="disk full"):
                save_checkpoint(root, model=model, model_config=info.model_config,
                                iteration=iteration)
            assert find_checkpoint(root).iteration == 1
            assert not (root / "iter_0000002").exists()
        monkeypatch.undo()
        fresh = build_model(info.model_config, ps, init_weights=False)
        load_checkpoint(find_checkpoint(root), model=fresh)
        for name, value in fresh.state_dict().items():
            if torch.is_tensor(value):
                assert torch.equal(value, before[name]), name
    finally:
        shutdown()


def test_checkpoint_path_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not a minitron checkpoint"):
        find_checkpoint(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        find_checkpoint(tmp_path / "file")
    (tmp_path / ckpt_module.TRACKER_FILE).write_text("3")
    with pytest.raises(CheckpointError, match="incomplete"):
        find_checkpoint(tmp_path)


def test_model_only_load_ignores_extra_state_but_not_missing_tensors(llama_ckpt_untied, tmp_path):
    from megatron.core.dist_checkpointing import ShardedTensor

    ps = init_distributed(LaunchEnv(), ParallelConfig())
    try:
        info = find_checkpoint(llama_ckpt_untied)
        model = build_model(info.model_config, ps, init_weights=False)
        load_checkpoint(info, model=model)
        extra = {"optimizer": {"moment": ShardedTensor.from_rank_offsets(
            "optimizer.moment", torch.arange(6.0), replica_id=0)}}
        save_checkpoint(tmp_path / "with_extra", model=model, model_config=info.model_config,
                        extra_sharded_state=extra, common_state={"consumed_samples": 12})
        fresh = build_model(info.model_config, ps)
        loaded = load_checkpoint(find_checkpoint(tmp_path / "with_extra"), model=fresh)
        assert loaded["consumed_samples"] == 12
        for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
            if torch.is_tensor(a):
                assert torch.equal(a, b), name
        target = {"optimizer": {"moment": ShardedTensor.from_rank_offsets(
            "optimizer.moment", torch.zeros(6), replica_id=0)}}
        back = load_checkpoint(find_checkpoint(tmp_path / "with_extra"), model=fresh,
                               extra_sharded_state=target)
        assert torch.equal(back["optimizer"]["moment"], torch.arange(6.0))
        missing = {"other": ShardedTensor.from_rank_offsets("other.w", torch.zeros(2),
                                                            replica_id=0)}
        with pytest.raises(BaseException, match="other.w"):
            load_checkpoint(find_checkpoint(tmp_path / "with_extra"), model=fresh,
                            extra_sharded_state=missing)
    finally:
        shutdown()
