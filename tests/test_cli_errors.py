"""Bad inputs: each is one actionable line on stderr and exit code 2, before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from minitron_megatron.cli import main
from tests import factories


def _fail(argv, capsys, monkeypatch=None, env=None):
    if monkeypatch is not None and env is not None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _eval_args(load, data="unused", *extra):
    return ["evaluate", "--load", str(load), "--data-path", str(data), "--seq-length", "32",
            "--eval-samples", "4", *extra]


def test_missing_checkpoint(capsys, tmp_path):
    err = _fail(_eval_args(tmp_path / "missing"), capsys)
    assert "does not exist" in err and "import-hf" in err


def test_not_a_checkpoint(capsys, tmp_path):
    err = _fail(_eval_args(tmp_path), capsys)
    assert "not a minitron checkpoint" in err


def test_unsupported_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    err = _fail(["import-hf", "--hf-path", str(tmp_path), "--save", str(tmp_path / "o")], capsys)
    assert "'GPT2LMHeadModel' is not supported" in err and "LlamaForCausalLM" in err
    assert not (tmp_path / "o").exists()


def test_heads_not_multiple_of_groups(capsys, tmp_path):
    config = factories.llama_hf_config(tied=False, heads=6, kv_heads=4, hidden=48).to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    err = _fail(["import-hf", "--hf-path", str(tmp_path), "--save", str(tmp_path / "o")], capsys)
    assert "not a multiple of num_query_groups" in err


def test_tp_must_divide_heads(capsys, llama_ckpt_untied, tiny_dataset):
    err = _fail(_eval_args(llama_ckpt_untied, tiny_dataset, "--tensor-model-parallel-size", "3"),
                capsys)
    assert "does not divide num_attention_heads=4" in err


def test_world_size_not_divisible(capsys, monkeypatch, llama_ckpt_untied, tiny_dataset):
    env = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1"}  # nobody listens: any attempt to start would hang, not fail
    err = _fail(_eval_args(llama_ckpt_untied, tiny_dataset, "--tensor-model-parallel-size", "2"),
                capsys, monkeypatch, env)
    assert "world size 3 is not divisible" in err


def test_truncated_safetensors(capsys, hf_llama_untied, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_llama_untied, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = _fail(["import-hf", "--hf-path", str(broken), "--save", str(tmp_path / "o")], capsys)
    assert "corrupt or truncated" in err and not (tmp_path / "o").exists()


def test_truncated_gguf(capsys, hf_llama_untied, tiny_tokenizer, tmp_path):
    gguf_file = factories.make_gguf(hf_llama_untied, tmp_path / "m.gguf", tiny_tokenizer.path)
    gguf_file.write_bytes(gguf_file.read_bytes()[: gguf_file.stat().st_size * 2 // 3])
    err = _fail(["import-hf", "--hf-path", str(gguf_file), "--save", str(tmp_path / "o")], capsys)
    assert "truncated or corrupt" in err and not (tmp_path / "o").exists()


def test_empty_preprocess_input(capsys, tiny_tokenizer, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    err = _fail(["preprocess", "--input", str(tmp_path / "empty.jsonl"), "--tokenizer",
                 str(tiny_tokenizer.path), "--output-prefix", str(tmp_path / "out")], capsys)
    assert "holds no documents" in err


def test_real_process_prints_one_line(tmp_path):
    """The installed entry point, as a user runs it: exit 2 and a single stderr line."""
    proc = subprocess.run(
        [sys.executable, "-m", "minitron_megatron", *_eval_args(tmp_path / "missing")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "does not exist" in proc.stderr


def test_internal_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """Only ``UserError`` becomes a one-line message; a plain ``ValueError`` is a bug."""
    from minitron_megatron.cli import evaluate

    def buggy(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(evaluate, "run", buggy)
    with pytest.raises(ValueError, match="internal invariant"):
        main(_eval_args(tmp_path / "missing"))


def test_cli_output_has_no_third_party_warnings(llama_ckpt_untied, tiny_dataset):
    """Megatron-Core's and torch's warnings (TransformerEngine/apex absent, cuda_graph_scope,
    load_state_dict, ...) are not shown to a CLI user; the tests themselves still see them."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run(
        [sys.executable, "-m", "minitron_megatron", *_eval_args(llama_ckpt_untied, tiny_dataset)],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and "warn(" not in proc.stderr, proc.stderr
    # nor logged deprecation notices (megatron-core 0.19 logs one at every model build)
    assert "deprecat" not in proc.stderr.lower(), proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["tokens"] > 0
