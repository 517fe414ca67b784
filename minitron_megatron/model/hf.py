"""Hugging Face Llama-family directories: ``config.json`` + safetensors ⇄ ModelConfig + tensors.

Supported architectures: Llama, Mistral (sliding window off) and Qwen2 (QKV bias): GQA, SwiGLU,
RMSNorm, RoPE, tied or untied embeddings; and Nemotron (Minitron's own family: LayerNorm1p,
squared-ReLU MLP, partial RoPE). Exports whose head width differs from hidden/heads (pruned
models) are written as ``MistralForCausalLM`` with an explicit ``head_dim``, which ``transformers``
accepts while ``LlamaConfig`` refuses it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from minitron_megatron.config import ModelConfig
from minitron_megatron.errors import MissingInputError, UserError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "NemotronForCausalLM")
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                "Qwen2ForCausalLM": "qwen2", "NemotronForCausalLM": "nemotron"}
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


class UnsupportedModelError(UserError):
    """The model cannot be converted; the message lists what can."""


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{what}; supported: {', '.join(SUPPORTED_ARCHITECTURES)} (GQA, SwiGLU/RMSNorm or "
        f"Nemotron's squared-ReLU/LayerNorm1p, RoPE, tied or untied embeddings) and GGUF files "
        f"of architecture 'llama'."
    )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face ``config.json`` dict, refusing what we cannot convert."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise _unsupported(f"architecture {arch or hf.get('model_type')!r} is not supported")
    nemotron = arch == "NemotronForCausalLM"
    act = hf.get("hidden_act", "relu2" if nemotron else "silu")
    if act != ("relu2" if nemotron else "silu"):
        raise _unsupported(f"activation {act!r} is not supported for {arch}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise _unsupported(f"attention_bias/mlp_bias on {arch} is not supported")
    if arch == "MistralForCausalLM" and hf.get("sliding_window"):
        raise _unsupported(f"sliding-window attention ({hf['sliding_window']}) is not supported")
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in (None, "default", "llama3"):
        raise _unsupported(f"rope scaling {rope_type!r} is not supported")
    if rope_type == "llama3" and any(scaling.get(k) != v for k, v in _LLAMA3_ROPE.items()):
        raise _unsupported(f"llama3 rope scaling other than {_LLAMA3_ROPE} is not supported")
    rope_theta = hf.get("rope_theta") or scaling.get("rope_theta", 1e4)
    partial = hf.get("partial_rotary_factor") or scaling.get("partial_rotary_factor", 1.0)
    heads = hf["num_attention_heads"]
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        padded_vocab_size=hf["vocab_size"],
        normalization="LayerNorm" if nemotron else "RMSNorm",
        zero_centered_gamma=nemotron,
        norm_epsilon=float(hf.get("norm_eps", hf.get("rms_norm_eps", 1e-6))),
        activation="squared_relu" if nemotron else "silu",
        gated_linear_unit=not nemotron,
        position_embedding_type="rope",
        rotary_base=float(rope_theta),
        rotary_percent=float(partial),
        rope_scaling_factor=float(scaling["factor"]) if rope_type == "llama3" else None,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        add_qkv_bias=arch == "Qwen2ForCausalLM",
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
    )


def _architecture(cfg: ModelConfig) -> str:
    """The HF class that holds this shape (see the module docstring); raises if none does."""
    nemotron = (cfg.normalization == "LayerNorm" and cfg.zero_centered_gamma
                and cfg.activation == "squared_relu" and not cfg.gated_linear_unit)
    llama = (cfg.normalization == "RMSNorm" and not cfg.zero_centered_gamma
             and cfg.activation == "silu" and cfg.gated_linear_unit)
    problems = []
    if not (nemotron or llama):
        problems.append(f"{cfg.normalization} norms with a {cfg.activation} "
                        f"{'gated ' if cfg.gated_linear_unit else ''}MLP")
    if cfg.position_embedding_type != "rope" or (llama and cfg.rotary_percent != 1.0):
        problems.append("non-RoPE (or partial RoPE) positions")
    if cfg.add_bias_linear or (nemotron and cfg.add_qkv_bias):
        problems.append("biases on linear layers")
    if problems:
        raise _unsupported(f"cannot export a model with {', '.join(problems)}")
    if nemotron:
        return "NemotronForCausalLM"
    if cfg.add_qkv_bias:
        return "Qwen2ForCausalLM"
    if cfg.num_attention_heads * cfg.kv_channels != cfg.hidden_size:
        return "MistralForCausalLM"
    return "LlamaForCausalLM"


def hf_config_for(cfg: ModelConfig, *, bos_id: int | None, eos_id: int | None,
                  dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` for an export; Mistral (head_dim explicit) when heads × head_dim ≠ hidden."""
    arch = _architecture(cfg)
    nemotron = arch == "NemotronForCausalLM"
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": _MODEL_TYPES[arch],
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels,
        "hidden_act": "relu2" if nemotron else "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "norm_eps" if nemotron else "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base,
        "tie_word_embeddings": cfg.tie_embeddings,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "attention_bias": False,
        "mlp_bias": False,
    }
    if nemotron:
        out["partial_rotary_factor"] = cfg.rotary_percent
    if cfg.rope_scaling_factor is not None:
        out["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                               **_LLAMA3_ROPE}
    if arch == "MistralForCausalLM":
        out["sliding_window"] = None
    if arch == "Qwen2ForCausalLM":
        out["use_sliding_window"] = False
    return out


class SafetensorsSource:
    """Read tensors lazily from a Hugging Face directory's (possibly sharded) safetensors."""

    def __init__(self, directory: Path):
        from safetensors import SafetensorError, safe_open

        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise MissingInputError(f"no *.safetensors in {directory}; export the model with "
                                    f"`save_pretrained(..., safe_serialization=True)`.")
        self._handles, self._where = [], {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
                for name in handle.keys():
                    self._where[name] = handle
                _check_sizes(file, handle)
            except (SafetensorError, OSError, ValueError) as err:
                raise UserError(f"{file} is corrupt or truncated ({err}); download or copy it "
                                f"again.") from None
            self._handles.append(handle)

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise UserError(f"tensor {name} missing from the safetensors files; is the checkpoint "
                            f"complete?")
        return self._where[name].get_tensor(name).float()

    def keys(self) -> Iterable[str]:
        return self._where.keys()


def _check_sizes(file: Path, handle: Any) -> None:
    """safetensors validates the header only; compare the data length it declares with the file."""
    with file.open("rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if file.stat().st_size < 8 + header_len + end:
        raise ValueError(f"file has {file.stat().st_size} bytes, header declares "
                         f"{8 + header_len + end}")


def read_hf_directory(directory: str | Path) -> tuple[ModelConfig, SafetensorsSource]:
    """Config and a lazy tensor reader for a Hugging Face model directory (validated up front)."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise MissingInputError(f"{directory} has no config.json; pass a Hugging Face model "
                                f"directory (config.json + *.safetensors) or a .gguf file.")
    cfg = config_from_hf(json.loads(config_file.read_text()))
    return cfg, SafetensorsSource(directory)


def write_hf_directory(
    directory: str | Path,
    config: dict[str, Any],
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    dtype: torch.dtype,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write ``config.json`` and safetensors shards (with an index when there is more than one)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        path = directory / f".shard-{len(written):05d}.tmp"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, tensor in tensors:
        tensor = tensor.to(dtype).contiguous().clone()
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = tensor
        size += nbytes
        total += nbytes
    flush()
    if len(written) == 1:
        written[0][0].rename(directory / "model.safetensors")
        return
    weight_map = {}
    for i, (path, names) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        path.rename(directory / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
