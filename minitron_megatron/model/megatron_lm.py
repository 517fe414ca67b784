"""``import-megatron``: adopt a Megatron-LM / NeMo ``torch_dist`` checkpoint as a minitron one.

Megatron-LM writes the same sharded keys as our ``GPTModel`` (``{"model": sharded_state_dict}``), so
no tensor is converted: the new checkpoint's ``iter_NNNNNNN`` holds symbolic links to the source's
files plus ``model_config.yaml`` (read from the ``args`` Megatron-LM stores in its common state, or
given explicitly) and the tokenizer. The source directory is never modified.

Example::

    adopt_megatron_checkpoint("/ckpt/nemotron4-15b", "ckpt/teacher", tokenizer="nemotron.model")
"""

from __future__ import annotations

import os
import pickle
import tempfile
from argparse import Namespace
from pathlib import Path
from typing import Any

from minitron_megatron.checkpoint import (
    MODEL_CONFIG_FILE,
    TOKENIZER_DIR,
    TRACKER_FILE,
    CheckpointError,
    iteration_dir,
    latest_iteration,
)
from minitron_megatron.checkpoint_manifest import MANIFEST_FILE, untrusted_reason
from minitron_megatron.config import ModelConfig
from minitron_megatron.data.tokenizer import Tokenizer
from minitron_megatron.errors import CorruptCheckpointError, UserError
from minitron_megatron.output_paths import check_output_dir


def config_from_megatron_args(args: Namespace | dict[str, Any]) -> ModelConfig:
    """ModelConfig from Megatron-LM's training arguments (``--swiglu``, ``--squared-relu``, …)."""
    a = vars(args) if isinstance(args, Namespace) else dict(args)

    def get(name: str, default: Any = None) -> Any:
        value = a.get(name)
        return default if value is None else value

    missing = [n for n in ("num_layers", "hidden_size", "num_attention_heads") if n not in a]
    if missing:
        raise CheckpointError(f"the checkpoint's args lack {missing}; pass --model-config "
                              f"with a ModelConfig YAML instead.")
    heads = a["num_attention_heads"]
    if get("swiglu", False):
        activation, gated = "silu", True
    elif get("squared_relu", False):
        activation, gated = "squared_relu", False
    else:
        activation, gated = "gelu", False
    padded = get("padded_vocab_size")
    if padded is None:
        raise CheckpointError("the checkpoint's args lack padded_vocab_size; pass --model-config.")
    return ModelConfig(
        num_layers=a["num_layers"],
        hidden_size=a["hidden_size"],
        ffn_hidden_size=get("ffn_hidden_size", 4 * a["hidden_size"]),
        num_attention_heads=heads,
        num_query_groups=get("num_query_groups", heads) if get("group_query_attention") else heads,
        kv_channels=get("kv_channels", a["hidden_size"] // heads),
        vocab_size=get("vocab_size", padded),
        padded_vocab_size=padded,
        normalization=get("normalization", "LayerNorm"),
        norm_epsilon=float(get("norm_epsilon", 1e-5)),
        zero_centered_gamma=bool(get("apply_layernorm_1p", False)),
        activation=activation,
        gated_linear_unit=gated,
        position_embedding_type=get("position_embedding_type", "learned_absolute"),
        rotary_base=float(get("rotary_base", 10000)),
        rotary_percent=float(get("rotary_percent", 1.0)),
        rope_scaling_factor=(float(get("rope_scaling_factor", 8.0))
                             if get("use_rope_scaling", False) else None),
        tie_embeddings=not get("untie_embeddings_and_output_weights", False),
        add_bias_linear=bool(get("add_bias_linear", True)),
        add_qkv_bias=bool(get("add_qkv_bias", False)),
        max_position_embeddings=get("max_position_embeddings", get("seq_length", 4096)),
    )


def _saved_args(iter_dir: Path) -> Namespace:
    """The ``args`` Megatron-LM keeps in a checkpoint's common state (``common.pt`` up to
    megatron-core 0.16, an object inside the torch_dist files from 0.17: the API reads both),
    unpickled with only Megatron's registered safe types."""
    from megatron.core import dist_checkpointing
    from megatron.core.safe_globals import register_safe_globals

    try:
        is_dist = dist_checkpointing.check_is_distributed_checkpoint(str(iter_dir))
    except (TypeError, ValueError) as err:  # a metadata.json that is not a checkpoint config
        raise CorruptCheckpointError(
            f"{iter_dir}/metadata.json is not a dist_checkpointing config ({err}); the "
            f"checkpoint is damaged or was not written by Megatron: re-create it.") from None
    if not is_dist:
        raise CheckpointError(f"{iter_dir} is not a torch_dist checkpoint (no metadata.json).")
    register_safe_globals()
    try:
        state = dist_checkpointing.load_common_state_dict(str(iter_dir))
    except pickle.UnpicklingError as err:  # its message would advise weights_only=False
        raise CorruptCheckpointError(
            f"{iter_dir} is not a trusted checkpoint: a safe load refused its common state "
            f"({untrusted_reason(err)}); do not load it, re-create it from a source you "
            f"trust.") from None
    except RuntimeError as err:
        raise CheckpointError(f"cannot read the training args from {iter_dir} ({err}); "
                              f"pass --model-config with a ModelConfig YAML.") from None
    if "args" not in state:
        raise CheckpointError(f"{iter_dir} holds no training args; pass --model-config.")
    return state["args"]


def adopt_megatron_checkpoint(
    load: str | Path,
    save: str | Path,
    *,
    tokenizer: str | Path | None = None,
    model_config: ModelConfig | None = None,
) -> ModelConfig:
    """Write ``save`` as a minitron checkpoint whose tensors are ``load``'s (linked, not copied)."""
    load, save = Path(load), Path(save)
    check_output_dir(save, "--save")
    if not load.is_dir():
        raise CheckpointError(f"Megatron-LM checkpoint {load} does not exist or is not a "
                              f"directory.")
    iteration = latest_iteration(load)
    if iteration is None:
        raise CheckpointError(f"{load} has no {TRACKER_FILE}: pass the checkpoint root that "
                              f"Megatron-LM's --save wrote.")
    source = iteration_dir(load, iteration)
    if not (source / "metadata.json").is_file():
        raise CheckpointError(f"{source} is not a torch_dist checkpoint (no metadata.json); "
                              f"convert legacy checkpoints with Megatron-LM's "
                              f"--ckpt-convert-format torch_dist first.")
    cfg = model_config or config_from_megatron_args(_saved_args(source))
    tok = Tokenizer.load(tokenizer) if tokenizer is not None else None
    if tok is not None and tok.vocab_size > cfg.padded_vocab_size:
        raise UserError(f"tokenizer has {tok.vocab_size} tokens, more than the model's "
                        f"{cfg.padded_vocab_size}; pass the tokenizer the model was trained with.")
    save.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=save, prefix=".adopt-") as tmp:
        staged = Path(tmp) / source.name
        staged.mkdir()
        for item in source.iterdir():
            ours = (MANIFEST_FILE, MODEL_CONFIG_FILE) + ((TOKENIZER_DIR,) if tok else ())
            if item.name in ours:  # written here, never through a link into the source
                continue
            os.symlink(item.resolve(), staged / item.name)
        cfg.save(staged / MODEL_CONFIG_FILE)
        if tok is not None:
            tok.save(staged / TOKENIZER_DIR)
        target = iteration_dir(save, iteration)
        if target.exists():
            raise CheckpointError(f"{target} already exists; choose an empty --save directory.")
        os.replace(staged, target)
    (save / TRACKER_FILE).write_text(str(iteration))
    return cfg
