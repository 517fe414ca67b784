"""Builders for tiny, locally generated test assets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from minitron_megatron.config import ParallelConfig
from minitron_megatron.data.tokenizer import Tokenizer
from minitron_megatron.runtime.distributed import LaunchEnv, distributed

VOCAB = 384  # model vocabulary (≥ the tokenizer's); divisible by 2 and 128

_SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "an", "el", "or", "ux", "be", "di"]


def make_corpus(path: Path, documents: int = 400, seed: int = 0) -> Path:
    """A JSONL corpus of pseudo-sentences with a Zipf-like word distribution (learnable)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    weights = [1.0 / (i + 1) for i in range(len(words))]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for _ in range(documents):
            sentences = []
            for _ in range(rng.randint(2, 6)):
                n = rng.randint(4, 12)
                sentences.append(" ".join(rng.choices(words, weights, k=n)).capitalize() + ".")
            handle.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return path


def make_tokenizer(directory: Path, vocab_size: int = 320) -> Tokenizer:
    """A byte-level BPE trained on the tiny corpus, with an end-of-text token."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    corpus = make_corpus(directory / "train.jsonl")
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return Tokenizer.from_file(path, "huggingface")


def llama_hf_config(*, tied: bool, layers: int = 4, hidden: int = 64, heads: int = 4,
                    kv_heads: int = 2, ffn: int = 96, head_dim: int | None = None,
                    arch: str = "llama"):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "nemotron": transformers.NemotronConfig}[arch]
    extra = {"sliding_window": None} if arch in ("mistral", "qwen2") else {}
    if arch == "nemotron":
        extra = {"partial_rotary_factor": 0.5, "norm_eps": 1e-5}
    return cls(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
               head_dim=head_dim or hidden // heads, max_position_embeddings=256,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied, **extra)


def make_hf_llama(directory: Path, *, tied: bool, tokenizer: Tokenizer | None = None,
                  seed: int = 0, **config) -> Path:
    """A random tiny Llama saved with ``save_pretrained`` (weights scaled so logits are O(1))."""
    import transformers

    torch.manual_seed(seed)
    cfg = llama_hf_config(tied=tied, **config)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.15)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save(directory)
    return Path(directory)


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def import_in_process(source: Path, save: Path) -> Path:
    from minitron_megatron.model.convert import import_model

    with distributed(LaunchEnv(), ParallelConfig()) as ps:
        import_model(source, save, ps)
    return save


def sample_tokens(batch: int = 2, seq: int = 32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 320, (batch, seq), generator=generator)


def _llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (what its converter writes into GGUF files)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def make_gguf(hf_dir: Path, path: Path, tokenizer_json: Path) -> Path:
    """Write a tiny HF Llama as an fp32 llama-architecture GGUF (llama.cpp's layout + BPE vocab)."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    vocab = json.loads(tokenizer_json.read_text())["model"]
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    tokens += [f"<unused{i}>" for i in range(cfg["vocab_size"] - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in vocab["merges"]])
    writer.add_eos_token_id(tokens.index("<|endoftext|>"))
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in tensors.items():
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            if module == "self_attn.q_proj":
                tensor = _llama_cpp_permute(tensor, heads)
            elif module == "self_attn.k_proj":
                tensor = _llama_cpp_permute(tensor, kv)
            target = f"blk.{index}.{names[module]}.weight"
        else:
            target = {"model.embed_tokens.weight": "token_embd.weight",
                      "model.norm.weight": "output_norm.weight",
                      "lm_head.weight": "output.weight"}[name]
        writer.add_tensor(target, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GPT_CONFIG = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                  vocab_size=VOCAB, normalization="LayerNorm", activation="gelu",
                  gated_linear_unit=False, position_embedding_type="learned_absolute",
                  add_bias_linear=True, tie_embeddings=True, max_position_embeddings=64)


def make_gpt_checkpoint(save: Path, *, tokenizer: Tokenizer | None = None, seed: int = 0,
                        **overrides) -> Path:
    """A random tiny GPT-2-style model (LayerNorm, non-gated gelu MLP, learned absolute
    positions, biases everywhere, tied embeddings) saved as a minitron checkpoint."""
    import tempfile

    from minitron_megatron.checkpoint import save_checkpoint
    from minitron_megatron.config import ModelConfig
    from minitron_megatron.model.build import build_model

    cfg = ModelConfig(**{**GPT_CONFIG, **overrides})
    with distributed(LaunchEnv(), ParallelConfig()) as ps:
        model = build_model(cfg, ps, init_weights=False)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
                elif name.endswith("bias"):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
        with tempfile.TemporaryDirectory() as staging:
            tok_dir = tokenizer.save(Path(staging) / "tokenizer") if tokenizer else None
            save_checkpoint(save, model=model, model_config=cfg, tokenizer_dir=tok_dir)
    return Path(save)
