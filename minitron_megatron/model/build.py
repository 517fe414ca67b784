"""ModelConfig + parallel layout → Megatron-Core ``GPTModel`` (this rank's pipeline stage).

On a GPU with TransformerEngine importable, the TE layer spec (fused norm+linear, TE attention)
is used; otherwise the local spec (Megatron-Core's own modules). Checkpoints are the same for both:
the local spec maps its norm keys onto the TE names when it writes a sharded state dict, and TE's
``_extra_state`` entries are the only difference ``checkpoint.load_checkpoint`` tolerates.
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


def resolve_spec(spec: LayerSpec) -> Literal["local", "te"]:
    """``"auto"`` → ``"te"`` where TransformerEngine is usable, else ``"local"``."""
    if spec == "auto":
        return "te" if te_available() else "local"
    if spec == "te" and not te_available():
        raise UserError("the TransformerEngine layer spec needs CUDA and transformer_engine; "
                        "use the local spec on this machine.")
    return spec


def _bias_activation_fusable(cfg: ModelConfig) -> bool:
    """Megatron's fused bias+activation exists for gelu (gated, or with a bias) and SwiGLU."""
    if cfg.activation == "gelu":
        return cfg.gated_linear_unit or cfg.add_bias_linear
    return cfg.activation == "silu" and cfg.gated_linear_unit


def _fusions(cfg: ModelConfig, *, on_gpu: bool, spec: Literal["local", "te"]) -> dict[str, bool]:
    """Kernel fusions the chosen spec can run: none on CPU; Megatron's jit fusions on any GPU;
    TE's fused RoPE only with the TE spec; Megatron's fused softmax only with the local spec's
    attention, when its kernel is installed. Never apex's persistent LayerNorm: the local spec's
    torch norms refuse it and TE's norms ignore it."""
    if not on_gpu:
        return dict(bias_activation_fusion=False, bias_dropout_fusion=False,
                    masked_softmax_fusion=False, apply_rope_fusion=False,
                    persist_layer_norm=False)
    softmax_kernel = importlib.util.find_spec("scaled_upper_triang_masked_softmax_cuda")
    return dict(
        bias_activation_fusion=_bias_activation_fusable(cfg),
        bias_dropout_fusion=True,
        masked_softmax_fusion=spec == "local" and softmax_kernel is not None,
        apply_rope_fusion=spec == "te" and cfg.position_embedding_type == "rope",
        persist_layer_norm=False,
    )


def transformer_config(
    cfg: ModelConfig,
    ps: ParallelState,
    *,
    params_dtype: torch.dtype = torch.float32,
    init_weights: bool = True,
    spec: Literal["local", "te"] = "local",
):
    """Megatron ``TransformerConfig`` for a model config on this layout and layer spec."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg.check_parallel(tensor_parallel=ps.tp_size, pipeline_parallel=ps.pp_size)
    on_gpu = ps.device.type == "cuda"
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
        gradient_accumulation_fusion=False,
        **_fusions(cfg, on_gpu=on_gpu, spec=spec),
    )


def layer_spec(cfg: ModelConfig, *, spec: Literal["local", "te"]):
    """Megatron-Core's own layer spec: TE's (fused norm+linear, TE attention) or the local one."""
    from megatron.core.models.gpt import gpt_layer_specs

    if spec == "te":
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

    The model is returned on ``ps.device`` with logits left vocab-parallel (sharded over TP);
    ``model.layer_spec`` names the spec it was built with (``"te"`` or ``"local"``).
    """
    from megatron.core.models.gpt import GPTModel

    kind = resolve_spec(spec)
    model = GPTModel(
        config=transformer_config(cfg, ps, params_dtype=params_dtype, init_weights=init_weights,
                                  spec=kind),
        transformer_layer_spec=layer_spec(cfg, spec=kind),
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
    model.layer_spec = kind
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
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    total = 0
    for name, param in model.named_parameters():
        tied_copy = name == "output_layer.weight" and not model.pre_process and (
            model.share_embeddings_and_output_weights
        )
        if not tied_copy and param_is_not_tensor_parallel_duplicate(param):
            total += param.numel()
    count = ps.all_reduce(torch.tensor([total], dtype=torch.int64), group=ps.tp_group)
    return int(ps.all_reduce(count, group=ps.pp_group).item())
