"""GGUF import: llama.cpp's q/k permutation undone, tokenizer rebuilt from metadata."""

from __future__ import annotations

from minitron_megatron.data.tokenizer import Tokenizer
from minitron_megatron.runtime.distributed import LaunchEnv
from tests import factories
from tests.test_hf_parity import TOL, logits_at_layouts


def test_gguf_import_matches_transformers(hf_llama_untied, tiny_tokenizer, tmp_path):
    gguf_file = factories.make_gguf(hf_llama_untied, tmp_path / "tiny.gguf", tiny_tokenizer.path)
    ckpt = factories.import_in_process(gguf_file, tmp_path / "ckpt")
    tokens = factories.sample_tokens()
    ours = logits_at_layouts(LaunchEnv(), str(ckpt), tokens, [(1, 1, False)])[0]
    assert (ours - factories.hf_logits(hf_llama_untied, tokens)).abs().max() <= TOL
    rebuilt = Tokenizer.load(ckpt)
    text = "Ka lo mi ne su. Ta ri po!"
    assert rebuilt.encode(text) == tiny_tokenizer.encode(text)
    assert rebuilt.eod_id == tiny_tokenizer.eod_id
