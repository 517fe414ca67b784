"""``import-hf`` and ``export-hf``: Hugging Face / GGUF ⇄ minitron (Megatron dist) checkpoints.

Both run on one process (TP=1, PP=1); the checkpoint they write loads at any TP/PP afterwards.
Tensors are converted one at a time, so peak memory is the model plus one tensor.

Example::

    import_model("SmolLM2-135M-Instruct.Q4_1.gguf", "ckpt/teacher", ps)
    export_model("ckpt/student", "hf/student", ps)   # then AutoModelForCausalLM.from_pretrained
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

from minitron_megatron.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from minitron_megatron.config import ModelConfig
from minitron_megatron.data.tokenizer import Tokenizer
from minitron_megatron.errors import MissingInputError, UserError
from minitron_megatron.model.build import build_model
from minitron_megatron.model.gguf import GGUFSource
from minitron_megatron.model.hf import hf_config_for, read_hf_directory, write_hf_directory
from minitron_megatron.model.llama_weights import hf_to_megatron, megatron_to_hf
from minitron_megatron.output_paths import (
    check_output_dir,
    check_replaceable,
    replacing_directory,
)
from minitron_megatron.runtime.distributed import ParallelState

log = logging.getLogger(__name__)


def _require_single_process(ps: ParallelState, command: str) -> None:
    if ps.world_size != 1:
        raise UserError(f"{command} runs on one process (its checkpoint loads at any layout "
                        f"afterwards); launch it with python, not torchrun.")


def open_source(path: str | Path):
    """``(ModelConfig, tensor reader, GGUFSource | None)`` for an HF directory or a .gguf file."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path} does not exist; pass a Hugging Face model directory "
                                f"(config.json + *.safetensors) or a .gguf file.")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf; pass a .gguf file or a Hugging "
                            f"Face model directory.")
        source = GGUFSource(path)
        return source.model_config(), source, source
    cfg, source = read_hf_directory(path)
    return cfg, source, None


def _tokenizer_for(path: Path, gguf: GGUFSource | None, override: str | None,
                   staging: Path) -> Tokenizer | None:
    if override is not None:
        return Tokenizer.load(override)
    if gguf is not None:
        file, eod, bos = gguf.tokenizer_file(staging)
        return Tokenizer(kind="huggingface", path=file, eod_id=eod, bos_id=bos,
                         add_bos=bos is not None)
    try:
        return Tokenizer.load(path)
    except UserError:
        log.warning("no tokenizer found in %s; the checkpoint will carry none (pass --tokenizer "
                    "to preprocess data for it).", path)
        return None


def import_model(
    source_path: str | Path,
    save: str | Path,
    ps: ParallelState,
    *,
    tokenizer: str | None = None,
    params_dtype: torch.dtype = torch.float32,
) -> ModelConfig:
    """Convert a Llama-family model to a minitron checkpoint at ``save``; returns its config."""
    _require_single_process(ps, "import-hf")
    check_output_dir(save, "--save")
    cfg, read, gguf = open_source(source_path)
    with tempfile.TemporaryDirectory() as staging:
        tok = _tokenizer_for(Path(source_path), gguf, tokenizer, Path(staging) / "raw")
        if tok is not None and tok.vocab_size > cfg.vocab_size:
            raise UserError(f"tokenizer has {tok.vocab_size} tokens but the model only "
                            f"{cfg.vocab_size}; pass the model's own tokenizer.")
        model = build_model(cfg, ps, params_dtype=params_dtype, init_weights=False, spec="local")
        params = model.state_dict(keep_vars=True)
        filled = set()
        with torch.no_grad():
            for name, tensor in hf_to_megatron(cfg, read):
                if params[name].shape != tensor.shape:
                    raise UserError(f"{name}: source shape {tuple(tensor.shape)} does not match "
                                    f"the config's {tuple(params[name].shape)}; the model's "
                                    f"config.json and weights disagree.")
                params[name].copy_(tensor)
                filled.add(name)
        missing = [n for n in params if n not in filled and not n.endswith("_extra_state")]
        if missing:
            raise UserError(f"no source tensor for {missing[:5]}")
        tok_dir = tok.save(Path(staging) / "tokenizer") if tok is not None else None
        save_checkpoint(save, model=model, model_config=cfg, iteration=0, tokenizer_dir=tok_dir,
                        files={"source.txt": f"imported from {Path(source_path).resolve()}\n"})
    return cfg


def export_model(
    load: str | Path,
    save: str | Path,
    ps: ParallelState,
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write a minitron checkpoint as a Hugging Face directory ``transformers`` loads.

    ``save`` must be new or empty unless ``overwrite``; it is written in a staging directory
    and renamed into place, so it never mixes old and new files nor holds a partial export."""
    _require_single_process(ps, "export-hf")
    check_replaceable(save, "--save", overwrite=overwrite)
    info = find_checkpoint(load)
    cfg = info.model_config
    tok = Tokenizer.load(info.tokenizer_dir) if info.tokenizer_dir is not None else None
    hf_config = hf_config_for(cfg, bos_id=tok.bos_id if tok else None,
                              eos_id=tok.eod_id if tok else None, dtype=dtype)
    model = build_model(cfg, ps, init_weights=False, spec="local")
    load_checkpoint(info, model=model)
    state = model.state_dict()
    with replacing_directory(save) as staging:
        write_hf_directory(staging, hf_config, megatron_to_hf(cfg, state.__getitem__),
                           dtype=dtype)
        if tok is not None:
            _write_hf_tokenizer(tok, staging)
    return Path(save)


def _write_hf_tokenizer(tok: Tokenizer, directory: Path) -> None:
    tok.save(directory)
    names = {tok.eod_id: "eos_token", tok.bos_id: "bos_token"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast" if tok.kind == "huggingface"
              else "LlamaTokenizer", "add_bos_token": tok.add_bos, "clean_up_tokenization_spaces":
              False}
    for token_id, key in names.items():
        if token_id is not None:
            config[key] = tok.decode([token_id]) if tok.kind == "huggingface" else None
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {k: v for k, v in config.items() if v is not None}, indent=2))
