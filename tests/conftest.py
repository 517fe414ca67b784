"""Shared fixtures: a tiny tokenizer, corpus and indexed dataset, and tiny HF Llama models.

Everything is generated locally (no network, no data packages), small enough that the whole suite
runs in minutes on 2 CPU cores.
"""

from __future__ import annotations

import pytest

from tests import factories


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return factories.make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    return factories.make_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_tokenizer, tiny_corpus):
    """Prefix of an indexed dataset of the tiny corpus."""
    from minitron_megatron.data.preprocess import preprocess

    prefix = tmp_path_factory.mktemp("dataset") / "corpus"
    preprocess(tiny_corpus, tiny_tokenizer, prefix)
    return str(prefix)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory, tiny_tokenizer):
    """12 documents: with ``--split 75,25,0`` a train split of 21 samples of 32 tokens (so a
    run of a few steps spans epochs) and a validation split of 7."""
    from minitron_megatron.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("small")
    corpus = factories.make_corpus(root / "corpus.jsonl", documents=12, seed=3)
    preprocess(corpus, tiny_tokenizer, root / "small")
    return str(root / "small")


@pytest.fixture(scope="session")
def hf_llama_untied(tmp_path_factory, tiny_tokenizer):
    return factories.make_hf_llama(tmp_path_factory.mktemp("hf_untied"), tied=False,
                                   tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def hf_llama_tied(tmp_path_factory, tiny_tokenizer):
    return factories.make_hf_llama(tmp_path_factory.mktemp("hf_tied"), tied=True,
                                   tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def llama_ckpt_untied(tmp_path_factory, hf_llama_untied):
    """The untied tiny Llama imported as a minitron checkpoint."""
    return factories.import_in_process(hf_llama_untied, tmp_path_factory.mktemp("ck_untied"))


@pytest.fixture(scope="session")
def llama_ckpt_tied(tmp_path_factory, hf_llama_tied):
    return factories.import_in_process(hf_llama_tied, tmp_path_factory.mktemp("ck_tied"))


@pytest.fixture(scope="session")
def smollm2_ckpt(tmp_path_factory):
    """The real SmolLM2-135M teacher imported from its GGUF (integration tests only)."""
    from minitron_megatron.data.assets import smollm2_gguf

    return factories.import_in_process(smollm2_gguf(), tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="session")
def wiki_dataset(tmp_path_factory, smollm2_ckpt):
    """The Wikipedia corpus tokenized with SmolLM2's tokenizer (integration tests only)."""
    from minitron_megatron.data.assets import wikipedia_corpus
    from minitron_megatron.data.preprocess import preprocess
    from minitron_megatron.data.tokenizer import Tokenizer

    prefix = tmp_path_factory.mktemp("wiki") / "wiki"
    preprocess(wikipedia_corpus(), Tokenizer.load(smollm2_ckpt), prefix)
    return str(prefix)


@pytest.fixture(scope="session")
def gpt_ckpt(tmp_path_factory, tiny_tokenizer):
    """A tiny random GPT-2-style checkpoint (LayerNorm, gelu, learned positions, biases, tied)."""
    return factories.make_gpt_checkpoint(tmp_path_factory.mktemp("ck_gpt"),
                                         tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def student_ckpt(tmp_path_factory, llama_ckpt_untied):
    """A random student of the untied tiny Llama (hidden 32, 2 layers, its tokenizer)."""
    from tests import distill_helpers

    return distill_helpers.make_student(tmp_path_factory.mktemp("student"), llama_ckpt_untied)
