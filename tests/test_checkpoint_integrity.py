"""Damaged checkpoints: checksums written at save and verified at load, and one actionable line
(exit 2) for every way a load fails on the checkpoint's files instead of a traceback or a
silently wrong loss."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess

import pytest
import torch

from minitron_megatron.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from minitron_megatron.checkpoint_manifest import MANIFEST_FILE, _share
from minitron_megatron.cli import main
from minitron_megatron.config import ParallelConfig
from minitron_megatron.errors import CheckpointError, CorruptCheckpointError
from minitron_megatron.model.build import build_model
from minitron_megatron.runtime.distributed import LaunchEnv, distributed, init_distributed, shutdown
from minitron_megatron.testing.multiprocess import run_distributed

ITER = "iter_0000000"


@pytest.fixture
def ckpt(tmp_path, llama_ckpt_untied):
    """A private copy of the tiny Llama checkpoint (saved by ``save_checkpoint``)."""
    return shutil.copytree(llama_ckpt_untied, tmp_path / "ckpt")


def _evaluate(ckpt, data, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--load", str(ckpt), "--data-path", data, "--seq-length", "32",
              "--eval-samples", "4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minitron evaluate: error: "), err
    return err[0]


def _flip(path, offset, count):
    """Invert ``count`` bytes of ``path`` at ``offset`` (always a change)."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        data = handle.read(count)
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in data))


def _shards(ckpt) -> list[str]:
    """The torch_dist shard files, in name order (their count depends on the writer threads)."""
    return sorted(p.name for p in (ckpt / ITER).glob("__*.distcp"))


def test_manifest_lists_every_file_in_sha256sum_format(ckpt):
    directory = ckpt / ITER
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                   if p.is_file() and p.name != MANIFEST_FILE)
    lines = (directory / MANIFEST_FILE).read_text().splitlines()
    listed = {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in lines}
    assert sorted(listed) == files
    # common.pt exists up to megatron-core 0.16 (0.17+ keep the common state in the shards)
    assert {".metadata", "model_config.yaml", *_shards(ckpt)} <= set(listed)
    assert _shards(ckpt)
    assert any(name.startswith("tokenizer/") for name in listed)
    for name, digest in listed.items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest, name
    if shutil.which("sha256sum"):  # the standard tool agrees
        subprocess.run(["sha256sum", "--quiet", "-c", MANIFEST_FILE], cwd=directory, check=True)


def test_small_corruption_is_refused_not_evaluated(ckpt, tiny_dataset, capsys):
    """A few flipped bytes inside a tensor would give a plausible wrong loss: refused."""
    shard = ckpt / ITER / "__0_0.distcp"
    _flip(shard, shard.stat().st_size // 2, 8)
    err = _evaluate(ckpt, tiny_dataset, capsys)
    assert f"{shard} is corrupt or truncated" in err and "copy the checkpoint again" in err


def test_truncated_shard_is_named(ckpt, tiny_dataset, capsys):
    shard = ckpt / ITER / _shards(ckpt)[-1]
    os.truncate(shard, shard.stat().st_size // 2)
    assert f"{shard} is corrupt or truncated" in _evaluate(ckpt, tiny_dataset, capsys)
    # without checksums (an old checkpoint) the shard index still names the short file
    (ckpt / ITER / MANIFEST_FILE).unlink()
    err = _evaluate(ckpt, tiny_dataset, capsys)
    assert f"truncated or corrupt file ({shard.name}:" in err, err


def test_old_checkpoint_without_manifest_loads_with_one_warning(ckpt, caplog):
    (ckpt / ITER / MANIFEST_FILE).unlink()
    with distributed(LaunchEnv(), ParallelConfig()) as ps:
        info = find_checkpoint(ckpt)
        model = build_model(info.model_config, ps, init_weights=False)
        with caplog.at_level(logging.WARNING):
            load_checkpoint(info, model=model)
    warnings = [r.getMessage() for r in caplog.records  # ours (Megatron-Core 0.19 adds its own)
                if r.levelno == logging.WARNING and r.name.startswith("minitron_megatron")]
    assert len(warnings) == 1 and f"has no {MANIFEST_FILE}" in warnings[0], warnings
    assert "unverified" in warnings[0]


def test_config_that_does_not_fit_the_shards(ckpt, tiny_dataset, capsys):
    config = ckpt / ITER / "model_config.yaml"
    config.write_text(config.read_text().replace("ffn_hidden_size: 96", "ffn_hidden_size: 128"))
    # the edit itself is caught by the checksums
    assert f"{config} is corrupt or truncated" in _evaluate(ckpt, tiny_dataset, capsys)
    (ckpt / ITER / MANIFEST_FILE).unlink()  # as a checkpoint without checksums
    err = _evaluate(ckpt, tiny_dataset, capsys)
    assert "does not fit the model its model_config.yaml describes" in err
    assert "decoder.layers.mlp.linear_fc1.weight" in err and "restore the config" in err


def test_invalid_yaml_config(ckpt, tiny_dataset, capsys, monkeypatch):
    monkeypatch.setattr("minitron_megatron.api.run_distributed", _no_work)
    config = ckpt / ITER / "model_config.yaml"
    config.write_text(config.read_text() + "num_layers: [4\n")
    err = _evaluate(ckpt, tiny_dataset, capsys)
    assert f"{config} is not valid YAML" in err and "line" in err
    config.write_text("- just\n- a list\n")
    assert "not a mapping of ModelConfig fields" in _evaluate(ckpt, tiny_dataset, capsys)


def _no_work(*args, **kwargs):
    raise AssertionError("distributed work started before the input was checked")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_common_pt_is_refused_without_torch_advice(ckpt, tiny_dataset, capsys,
                                                             monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    common = ckpt / ITER / "common.pt"
    torch.save({"iteration": 0, "x": _Exploit()}, common)
    # an attacker rewrites the checksums too
    manifest = ckpt / ITER / MANIFEST_FILE
    digest = hashlib.sha256(common.read_bytes()).hexdigest()
    manifest.write_text("".join(f"{digest}  common.pt\n" if line.endswith("  common.pt") else
                                line + "\n" for line in manifest.read_text().splitlines()))
    err = _evaluate(ckpt, tiny_dataset, capsys)
    assert "is not a trusted checkpoint" in err and "system" in err, err
    assert "weights_only" not in err and not (tmp_path / "pwned").exists()


def test_adopting_a_malicious_megatron_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "mlm"
    (source / "iter_0000005").mkdir(parents=True)
    (source / "latest_checkpointed_iteration.txt").write_text("5")
    (source / "iter_0000005" / "metadata.json").write_text(json.dumps({
        "sharded_backend": "torch_dist", "sharded_backend_version": 1,
        "common_backend": "torch", "common_backend_version": 1}))
    torch.save({"args": _Exploit()}, source / "iter_0000005" / "common.pt")
    with pytest.raises(SystemExit) as exit_info:
        main(["import-megatron", "--load", str(source), "--save", str(tmp_path / "ours")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "not a trusted checkpoint" in err and "weights_only" not in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "pwned").exists()


def _model_and_config(ps, source):
    info = find_checkpoint(source)
    model = build_model(info.model_config, ps, init_weights=False)
    load_checkpoint(info, model=model)
    return model, info.model_config


def test_leftover_old_directory_does_not_block_saves(llama_ckpt_untied, tmp_path):
    root = tmp_path / "run"
    ps = init_distributed(LaunchEnv(), ParallelConfig())
    try:
        model, cfg = _model_and_config(ps, llama_ckpt_untied)
        save_checkpoint(root, model=model, model_config=cfg, iteration=1)
        # a save killed after its swap, during the old copy's deletion
        leftover = root / ".iter_0000001.old"
        shutil.copytree(root / "iter_0000001", leftover)
        save_checkpoint(root, model=model, model_config=cfg, iteration=1)
        assert not leftover.exists() and find_checkpoint(root).iteration == 1
        # a save killed between its two renames: iter_0000001 is only in .old
        os.replace(root / "iter_0000001", leftover)
        with pytest.raises(CheckpointError, match="interrupted between its renames.*mv "):
            find_checkpoint(root)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        save_checkpoint(root, model=model, model_config=cfg, iteration=1)
        assert not leftover.exists()
        fresh, _ = _model_and_config(ps, root)
        for a, b in zip(model.parameters(), fresh.parameters()):
            assert torch.equal(a, b)
    finally:
        shutdown()


def test_files_are_dealt_out_once_and_balanced():
    sizes = {f"f{i}": s for i, s in enumerate([100, 90, 50, 40, 30, 5, 5, 1])}
    shares = [_share(sizes, rank, 3) for rank in range(3)]
    assert sorted(n for share in shares for n in share) == sorted(sizes)
    loads = [sum(sizes[n] for n in share) for share in shares]
    assert max(loads) - min(loads) <= max(sizes.values())


def _load_on_ranks(env, path):
    with distributed(env, ParallelConfig(tensor_model_parallel_size=2)) as ps:
        info = find_checkpoint(path)
        model = build_model(info.model_config, ps, init_weights=False)
        try:
            load_checkpoint(info, model=model)
        except CorruptCheckpointError as err:
            return str(err)
        return None


@pytest.mark.multiprocess
def test_two_ranks_share_the_check_and_report_the_same_file(ckpt):
    shard = ckpt / ITER / _shards(ckpt)[-1]
    _flip(shard, 100, 4)
    messages = run_distributed(_load_on_ranks, 2, str(ckpt))
    assert messages[0] == messages[1] and f"{shard} is corrupt" in messages[0], messages
