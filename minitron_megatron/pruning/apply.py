"""``apply_plan``: slice a loaded model into its pruned shape, layer by layer, at any TP × PP;
``prune_checkpoint``: load → apply → save the pruned checkpoint at its new shape.

Per target layer ``t`` (source layer ``s``), the source stage owning ``s`` gathers only the
TP-sharded tensors whose sharded axis is pruned (heads, neurons), slices them globally, keeps its
own TP shard of the result, and — when depth pruning moved ``t`` to another pipeline stage — sends
that shard to the same TP rank of the destination stage. Embeddings, the output layer and the
final norm stay on their stages and are sliced locally (their vocabulary shards are untouched).
Peak memory is the source shard, the pruned shard and one gathered layer; with
``release_source=True`` each source layer is freed as soon as it has been sliced.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.distributed as dist

from minitron_megatron.config import ModelConfig
from minitron_megatron.output_paths import replacing_directory
from minitron_megatron.pruning.layout import (
    recv_tensors,
    send_tensors,
    sharded_dim,
    stage_of_layers,
    to_global,
    to_local,
)
from minitron_megatron.pruning.plan import LayerPlan, PrunePlan
from minitron_megatron.pruning.reconstruct import ReconstructConfig, Reconstructor
from minitron_megatron.pruning.slicing import (
    LAYER_RULES,
    MODEL_RULES,
    Rule,
    apply_rule,
    fold_into_groups,
    fold_pruned_heads,
    is_gated_fc1,
    layer_index,
    rule_for,
    source_sizes,
)
from minitron_megatron.pruning.targets import check_layout
from minitron_megatron.runtime.distributed import ParallelState

PLAN_FILE = "prune_plan.json"
RECONSTRUCT_FILE = "reconstruct.json"
QKV_PARAMS = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")
PROJ_WEIGHT = "self_attention.linear_proj.weight"


def _slice(param: torch.Tensor, rule: Rule, index: dict[str, torch.Tensor], sizes: dict[str, int],
           ps: ParallelState, *, gated: bool = False, fold=None, refit=None) -> torch.Tensor:
    """This rank's shard of the pruned parameter (``sizes``: global length of each index;
    ``refit``: global weight → pruned global weight, instead of the rule's slicing)."""
    tensor = param.detach()
    dim = sharded_dim(tensor.shape, {d: sizes[name] for d, name in rule.items()}, ps)
    global_needed = dim is not None  # the sharded axis itself is pruned (e.g. heads, neurons)
    if global_needed:
        tensor = to_global(tensor, dim, gated, ps)
    if fold is not None:
        tensor = fold(tensor)
    tensor = refit(tensor) if refit is not None else apply_rule(tensor, rule, index)
    return to_local(tensor, dim, gated, ps) if global_needed else tensor.contiguous()


def _prune_layer(layer: torch.nn.Module, layer_plan: LayerPlan, plan: PrunePlan,
                 ps: ParallelState, reconstruct: Reconstructor | None = None
                 ) -> dict[str, torch.Tensor]:
    index = layer_index(plan.source, layer_plan, plan.hidden, ps.device)
    sizes = source_sizes(plan.source)
    out = {}
    params = dict(layer.named_parameters())
    for name, param in params.items():
        fold = None
        if layer_plan.head_residual and name in QKV_PARAMS:
            fold = functools.partial(fold_pruned_heads, src=plan.source,
                                     pairs=layer_plan.head_residual)
        refit = None if reconstruct is None else reconstruct.solver(
            name, plan, layer_plan, index, fold=plan.position0_fold, params=params)
        if plan.position0_fold and name == PROJ_WEIGHT and refit is None:
            fold = functools.partial(fold_into_groups, src=plan.source, layer=layer_plan)
        # (a refit linear_proj keeps the fold's column sums as its constraint)
        out[name] = _slice(param, rule_for(name, LAYER_RULES), index, sizes, ps,
                           gated=is_gated_fc1(name, plan.source), fold=fold, refit=refit)
    return out


def _copy(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    assert sorted(params) == sorted(tensors), (sorted(params), sorted(tensors))
    with torch.no_grad():
        for name, tensor in tensors.items():
            assert params[name].shape == tensor.shape, (name, params[name].shape, tensor.shape)
            params[name].copy_(tensor)


def _release(module: torch.nn.Module) -> None:
    for param in module.parameters():
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)


def _check_source(model: torch.nn.Module, plan: PrunePlan, ps: ParallelState) -> None:
    src, cfg = plan.source, model.config
    found = {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
             "ffn_hidden_size": cfg.ffn_hidden_size, "num_attention_heads":
             cfg.num_attention_heads, "num_query_groups": cfg.num_query_groups,
             "kv_channels": cfg.kv_channels}
    wrong = {k: v for k, v in found.items() if getattr(src, k) != v}
    if wrong:
        raise ValueError(f"the plan was made for another model: this model has {wrong}, the "
                         f"plan's source has {({k: getattr(src, k) for k in wrong})}.")
    check_layout(plan.target, tensor_parallel=ps.tp_size, pipeline_parallel=ps.pp_size)
    if dist.is_initialized() and dist.get_world_size() > 1:
        prints = [None] * dist.get_world_size()
        dist.all_gather_object(prints, plan.fingerprint())
        if len(set(prints)) != 1:
            raise RuntimeError(f"ranks hold different prune plans {sorted(set(prints))}; every "
                               f"rank must read the same scores file and targets.")


def apply_plan(model: torch.nn.Module, plan: PrunePlan, ps: ParallelState, *,
               release_source: bool = False, reconstruct: Reconstructor | None = None
               ) -> tuple[torch.nn.Module, ModelConfig]:
    """Build this rank's stage of the pruned ``GPTModel`` (same TP × PP as ``model``) and fill it
    from ``model`` (which is left intact unless ``release_source``). Collective over all ranks.
    With ``reconstruct``, ``linear_proj`` / ``linear_fc2`` are refit by least squares
    (``pruning.reconstruct``) instead of sliced.

    Example::

        plan = make_plan(Scores.load("scores.safetensors"), PruneTargets(num_layers=24))
        pruned, cfg = apply_plan(model, plan, ps)
        save_checkpoint("ckpt/pruned", model=pruned, model_config=cfg)
    """
    from minitron_megatron.model.build import build_model

    _check_source(model, plan, ps)
    if reconstruct is not None:
        reconstruct.check(plan.source)
    dtype = next(model.parameters()).dtype
    pruned = build_model(plan.target, ps, params_dtype=dtype, init_weights=False,
                         spec=getattr(model, "layer_spec", "auto"))

    hidden = {"hidden": torch.tensor(plan.hidden, dtype=torch.long, device=ps.device)}
    source_params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in pruned.named_parameters():
            if not name.startswith("decoder.layers."):
                param.copy_(_slice(source_params[name], rule_for(name, MODEL_RULES), hidden,
                                   source_sizes(plan.source), ps))

    source_stage = stage_of_layers(model, ps)
    target_stage = stage_of_layers(pruned, ps)
    source_layers = {layer.layer_number - 1: layer for layer in model.decoder.layers}
    target_layers = {layer.layer_number - 1: layer for layer in pruned.decoder.layers}
    for t, layer_plan in enumerate(plan.layers):
        owner, dest = source_stage[layer_plan.source], target_stage[t]
        if ps.pp_rank == owner:
            shards = _prune_layer(source_layers[layer_plan.source], layer_plan, plan, ps,
                                  reconstruct)
            if release_source:
                _release(source_layers[layer_plan.source])
            if dest == owner:
                _copy(target_layers[t], shards)
            else:
                send_tensors([shards[n] for n in sorted(shards)], dest, ps)
        elif ps.pp_rank == dest:
            params = dict(target_layers[t].named_parameters())
            names = sorted(params)
            received = recv_tensors([params[n] for n in names], owner, ps)
            _copy(target_layers[t], dict(zip(names, received, strict=True)))
    if release_source:
        _release(model)
    return pruned, plan.target


def prune_checkpoint(info, plan: PrunePlan, save: str | Path, ps: ParallelState, *,
                     params_dtype: torch.dtype = torch.float32,
                     reconstruct: ReconstructConfig | None = None) -> Path:
    """Load checkpoint ``info`` at this layout, prune it by ``plan`` (refitting the readers of
    pruned units by least squares with ``reconstruct``) and save it at its new shape (with its
    new ``ModelConfig``, the plan and the reconstruction settings inside). Returns the iteration
    directory.

    The inputs are checked once, before any work, by ``pruning.preflight.check_prune`` (which
    made ``plan``; ``minitron_megatron.prune`` and the CLI call it: it refuses a non-empty
    ``save`` unless asked to overwrite). The checkpoint is written in a staging directory and
    renamed into place, so ``save`` never mixes it with what was there."""
    from minitron_megatron.checkpoint import iteration_dir, load_checkpoint, save_checkpoint
    from minitron_megatron.model.build import build_model

    model = build_model(info.model_config, ps, params_dtype=params_dtype, init_weights=False)
    load_checkpoint(info, model=model)
    refit = Reconstructor(reconstruct) if reconstruct is not None else None
    pruned, cfg = apply_plan(model, plan, ps, release_source=True, reconstruct=refit)
    del model
    files = {PLAN_FILE: plan.to_json()}
    if reconstruct is not None:
        files[RECONSTRUCT_FILE] = reconstruct.to_json()
    with replacing_directory(save) as staging:
        save_checkpoint(staging, model=pruned, model_config=cfg, iteration=0,
                        tokenizer_dir=info.tokenizer_dir, files=files)
    return iteration_dir(save, 0)
