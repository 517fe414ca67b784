"""GGUF files (llama.cpp) of architecture ``llama``: config, dequantized tensors and tokenizer.

Tensors are dequantized one at a time with ``gguf.quants.dequantize`` and renamed to the Hugging
Face Llama names, with llama.cpp's q/k row permutation undone, so the rest of the import is shared
with safetensors directories. The byte-level BPE tokenizer is rebuilt from the file's metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from minitron_megatron.config import ModelConfig
from minitron_megatron.errors import UserError
from minitron_megatron.model.hf import UnsupportedModelError, _unsupported
from minitron_megatron.model.llama_weights import unpermute_gguf_rope

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_CONTROL_TOKEN = 3  # llama.cpp token type of special tokens


def _hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, index, kind = base.split(".", 2)
        return f"model.layers.{index}.{_LAYER_NAMES[kind]}.{suffix}"
    return f"{_GLOBAL_NAMES[base]}.{suffix}"


class GGUFSource:
    """A llama-architecture GGUF: metadata checked up front, tensors dequantized on demand."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        try:
            self._reader = gguf.GGUFReader(str(self.path))
        except (ValueError, OSError, IndexError, KeyError) as err:
            raise UserError(f"{self.path} is not a readable GGUF file ({err}); it may be "
                            f"truncated or corrupt: copy it again.") from None
        arch = self.field("general.architecture")
        if arch != "llama":
            raise UnsupportedModelError(
                str(_unsupported(f"GGUF architecture {arch!r} is not supported"))
            )
        self._tensors = {}
        for tensor in self._reader.tensors:
            try:
                self._tensors[_hf_name(tensor.name)] = tensor
            except KeyError:
                raise _unsupported(f"GGUF tensor {tensor.name!r} is not a llama tensor") from None

    def field(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def model_config(self) -> ModelConfig:
        arch = "llama"
        heads = int(self.field(f"{arch}.attention.head_count"))
        hidden = int(self.field(f"{arch}.embedding_length"))
        vocab = len(self.field("tokenizer.ggml.tokens"))
        return ModelConfig(
            num_layers=int(self.field(f"{arch}.block_count")),
            hidden_size=hidden,
            ffn_hidden_size=int(self.field(f"{arch}.feed_forward_length")),
            num_attention_heads=heads,
            num_query_groups=int(self.field(f"{arch}.attention.head_count_kv", heads)),
            kv_channels=int(self.field(f"{arch}.attention.key_length", hidden // heads)),
            vocab_size=vocab,
            padded_vocab_size=vocab,
            normalization="RMSNorm",
            norm_epsilon=float(self.field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            activation="silu",
            gated_linear_unit=True,
            position_embedding_type="rope",
            rotary_base=float(self.field(f"{arch}.rope.freq_base", 10000.0)),
            tie_embeddings="lm_head.weight" not in self._tensors,
            max_position_embeddings=int(self.field(f"{arch}.context_length", 4096)),
        )

    def __call__(self, name: str) -> torch.Tensor:
        import gguf

        tensor = self._tensors.get(name)
        if tensor is None:
            raise UserError(f"tensor {name} missing from {self.path}")
        try:
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except (ValueError, NotImplementedError) as err:
            raise UserError(f"cannot dequantize {tensor.name} ({err})") from None
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        weight = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32).reshape(shape))
        cfg_heads = int(self.field("llama.attention.head_count"))
        if name.endswith("self_attn.q_proj.weight"):
            weight = unpermute_gguf_rope(weight, cfg_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            weight = unpermute_gguf_rope(
                weight, int(self.field("llama.attention.head_count_kv", cfg_heads)))
        return weight

    def tokenizer_file(self, directory: Path) -> tuple[Path, int, int | None]:
        """Write the file's BPE tokenizer as ``tokenizer.json``; return (path, eod id, bos id)."""
        from minitron_megatron.data.tokenizer import byte_level_bpe_from_vocab

        if self.field("tokenizer.ggml.model") != "gpt2":
            raise _unsupported(
                f"GGUF tokenizer {self.field('tokenizer.ggml.model')!r} is not rebuilt from "
                f"metadata (only byte-level BPE 'gpt2'); pass --tokenizer with its "
                f"tokenizer.model or tokenizer.json"
            )
        tokens = self.field("tokenizer.ggml.tokens")
        types = self.field("tokenizer.ggml.token_type") or []
        special = [i for i, t in enumerate(types) if t == _CONTROL_TOKEN]
        tok = byte_level_bpe_from_vocab(
            tokens, self.field("tokenizer.ggml.merges"), special,
            digits=self.field("tokenizer.ggml.pre") == "smollm",
        )
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "tokenizer.json"
        tok.save(str(path))
        eos = self.field("tokenizer.ggml.eos_token_id")
        eod = tokens.index("<|endoftext|>") if "<|endoftext|>" in tokens else eos
        bos = self.field("tokenizer.ggml.bos_token_id")
        add_bos = bool(self.field("tokenizer.ggml.add_bos_token", False))
        return path, int(eod), (int(bos) if add_bos and bos is not None else None)
