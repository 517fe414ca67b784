"""Megatron tensor-parallel shards ⇄ global tensors, and moving a layer between pipeline stages.

A TP-sharded parameter's shards concatenate along its sharded dim in TP-rank order, except a
gated ``linear_fc1`` (weight or bias), where each rank holds ``[gate_r; up_r]`` and the global
tensor is ``[gate_0 .. gate_{tp−1}; up_0 .. up_{tp−1}]``. The sharded dim is found from the
shapes (local size × TP = global size), not from Megatron's ``partition_dim`` attribute, which is
only set when Megatron initialises the weights (absent on a model built to be loaded).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from minitron_megatron.runtime.distributed import ParallelState


def sharded_dim(local_shape: torch.Size, global_sizes: dict[int, int],
                ps: ParallelState) -> int | None:
    """Which of the dims with known global sizes is split over TP ranks (``None``: none)."""
    for dim, size in global_sizes.items():
        if local_shape[dim] != size:
            assert local_shape[dim] * ps.tp_size == size, (local_shape, dim, size, ps.tp_size)
            return dim
    return None


def to_global(local: torch.Tensor, dim: int, gated: bool, ps: ParallelState) -> torch.Tensor:
    """All-gather this rank's shard into the global tensor (collective over the TP group)."""
    shards = [torch.empty_like(local) for _ in range(ps.tp_size)]
    dist.all_gather(shards, local.contiguous(), group=ps.tp_group)
    if gated:
        halves = [shard.chunk(2, dim=0) for shard in shards]  # ([gate_r], [up_r])
        return torch.cat([g for g, _ in halves] + [u for _, u in halves], dim=0)
    return torch.cat(shards, dim=dim)


def to_local(full: torch.Tensor, dim: int, gated: bool, ps: ParallelState) -> torch.Tensor:
    """This rank's shard of a global tensor (the inverse of ``to_global``)."""
    if gated:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(ps.tp_size)[ps.tp_rank], up.chunk(ps.tp_size)[ps.tp_rank]])
    return full.chunk(ps.tp_size, dim=dim)[ps.tp_rank].contiguous()


def stage_of_layers(model: torch.nn.Module, ps: ParallelState) -> dict[int, int]:
    """Global layer index → pipeline stage holding it (collective over the PP group)."""
    local = [layer.layer_number - 1 for layer in model.decoder.layers]
    if ps.pp_size == 1:
        return {index: 0 for index in local}
    per_stage: list[list[int]] = [[] for _ in range(ps.pp_size)]
    dist.all_gather_object(per_stage, local, group=ps.pp_group)
    return {index: stage for stage, indices in enumerate(per_stage) for index in indices}


def send_tensors(tensors: list[torch.Tensor], stage: int, ps: ParallelState) -> None:
    """Send to the same TP/DP position on pipeline ``stage`` (blocking)."""
    peer = ps.pipeline_ranks[stage]
    for tensor in tensors:
        dist.send(tensor.contiguous().to(ps.device), dst=peer)


def recv_tensors(like: list[torch.Tensor], stage: int, ps: ParallelState) -> list[torch.Tensor]:
    """Receive tensors shaped like ``like`` from pipeline ``stage``."""
    peer = ps.pipeline_ranks[stage]
    out = []
    for ref in like:
        buffer = torch.empty(ref.shape, dtype=ref.dtype, device=ps.device)
        dist.recv(buffer, src=peer)
        out.append(buffer)
    return out
