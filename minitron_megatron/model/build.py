"""ModelConfig + parallel layout → Megatron-Core ``GPTModel`` (this rank's pipeline stage).

On a GPU with TransformerEngine importable, the TE layer spec (fused norm+linear, TE attention)
is used; otherwise the local spec (Megatron-Core's own modules). Checkpoints are the same for both:
the local spec maps its norm keys onto the TE names when it writes a sharded state dict.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F

from minitron_megatron.config import ModelConfig
from minitron_megatron.errors import UserError
from minitron_megatron.runtime.distributed import ParallelState

LayerSpec = Literal["auto", "local", "te"]


def te_available() -> bool:
    """TransformerEngine is usable: CUDA present and the package importable."""
    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def _activation(cfg: ModelConfig):
    from megatron.core.activations import squared_relu

    return {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "squared_relu": squared_relu}[
        cfg.activation
    ]


def pipeline_split(num_layers: int, pp_size: int) -> tuple[int | None, int | None]:
    """Layers of the first and last stage when ``num_layers`` does not divide evenly.

    ``(None, None)`` means an even split. Otherwise the middle stages get ``ceil(L / pp)`` layers
    each and the first/last stages share the rest (Megatron needs the middle ones equal).
    """
    if num_layers % pp_size == 0:
        return None, None
    if pp_size == 2:
        return num_layers - num_layers // 2, num_layers // 2
    middle = -(-num_layers // pp_size)
    rest = num_layers - middle * (pp_size - 2)
    if rest < 2:
        middle = num_layers // pp_size
        rest = num_layers - middle * (pp_size - 2)
    return rest - rest // 2, rest // 2


def transformer_config(
    cfg: ModelConfig,
    ps: ParallelState,
    *,
    params_dtype: torch.dtype = torch.float32,
    init_weights: bool = True,
):
    """Megatron ``TransformerConfig`` for a model config on this layout."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg.check_parallel(tensor_parallel=ps.tp_size, pipeline_parallel=ps.pp_size)
    on_gpu = ps.device.type == "cuda"
    fused = on_gpu and te_available()
    first, last = pipeline_split(cfg.num_layers, ps.pp_size)
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_epsilon,
        layernorm_zero_centered_gamma=cfg.zero_centered_gamma,
        gated_linear_unit=cfg.gated_linear_unit,
        activation_func=_activation(cfg),
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=ps.tp_size,
        pipeline_model_parallel_size=ps.pp_size,
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
        sequence_parallel=ps.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=init_weights,
        bias_activation_fusion=fused and cfg.activation in ("silu", "gelu") and (
            cfg.gated_linear_unit == (cfg.activation == "silu")),
        bias_dropout_fusion=fused,
        masked_softmax_fusion=fused,
        apply_rope_fusion=fused,
        persist_layer_norm=fused,
        gradient_accumulation_fusion=False,
    )


def layer_spec(cfg: ModelConfig, *, spec: LayerSpec = "auto"):
    """The Megatron-Core layer spec: TE's on a GPU with TransformerEngine, else the local one."""
    from megatron.core.models.gpt import gpt_layer_specs

    use_te = te_available() if spec == "auto" else spec == "te"
    if use_te:
        if not te_available():
            raise UserError("the TransformerEngine spec needs CUDA and transformer_engine.")
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=cfg.normalization)


def build_model(
    cfg: ModelConfig,
    ps: ParallelState,
    *,
    params_dtype: torch.dtype = torch.float32,
    init_weights: bool = True,
    spec: LayerSpec = "auto",
):
    """Build this rank's stage of the ``GPTModel`` (pre/post-process set by the PP rank).

    The model is returned on ``ps.device`` with logits left vocab-parallel (sharded over TP).
    """
    from megatron.core.models.gpt import GPTModel

    model = GPTModel(
        config=transformer_config(cfg, ps, params_dtype=params_dtype, init_weights=init_weights),
        transformer_layer_spec=layer_spec(cfg, spec=spec),
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=ps.is_first_stage,
        post_process=ps.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type=cfg.position_embedding_type,
        rotary_base=cfg.rotary_base,
        rotary_percent=cfg.rotary_percent,
        rope_scaling=cfg.rope_scaling_factor is not None,
        rope_scaling_factor=cfg.rope_scaling_factor or 8.0,
        pg_collection=ps.pg_collection(),
    )
    if not init_weights:
        mark_tensor_parallel_weights(model)
    return model.to(ps.device)


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Set Megatron's ``tensor_model_parallel`` / ``partition_dim`` attributes on sharded weights.

    Megatron-Core sets them only while initialising a weight, so a model built without
    initialisation (to load a checkpoint) would have every weight look TP-replicated: the
    optimizer's gradient norm and ``count_parameters`` would then count rank 0's shards only.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:  # TransformerEngine's parallel linears name their mode
            dim = {"column": 0, "row": 1}.get(getattr(module, "parallel_mode", None))
            if dim is None:
                continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and not getattr(
                weight, "tensor_model_parallel", False):
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim,
                                                 stride=getattr(module, "stride", 1))


def count_parameters(model: torch.nn.Module, ps: ParallelState) -> int:
    """Parameters of the whole model, summed over TP and PP ranks without double counting:
    TP-replicated tensors (norms, row-parallel biases) count on TP rank 0 only, and the last
    stage's copy of a tied embedding not at all. Collective over the model-parallel ranks."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    total = 0
    for name, param in model.named_parameters():
        tied_copy = name == "output_layer.weight" and not model.pre_process and (
            model.share_embeddings_and_output_weights
        )
        if not tied_copy and param_is_not_tensor_parallel_duplicate(param):
            total += param.numel()
    count = torch.tensor([total], dtype=torch.int64)
    dist.all_reduce(count, group=ps.tp_group)
    dist.all_reduce(count, group=ps.pp_group)
    return int(count.item())
