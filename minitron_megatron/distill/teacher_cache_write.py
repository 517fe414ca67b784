"""``minitron teacher-cache``: run the teacher once over a schedule's training samples and store
its top-k logits (format: ``distill/teacher_cache.py``).

Every rank builds the training dataset exactly as ``distill`` does (same corpus, split, seed,
sequence length and number of samples, so the same order); the shards still missing are dealt
round-robin to the data-parallel ranks, each forwards its shards through its TP × PP teacher
(Megatron's schedule, ``pipeline_forward``), and the last stage's TP rank 0 writes each shard
atomically. Rerunning the same command after a crash computes only the missing shards.

Example::

    with distributed(env, ParallelConfig(tensor_model_parallel_size=2)) as ps:
        write_teacher_cache(find_checkpoint("ckpt/teacher"), ps, data, num_samples=4096,
                            micro_batch_size=4, config=TeacherCacheConfig(top_k=64),
                            save="runs/teacher-cache")
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from minitron_megatron.config import ParallelConfig
from minitron_megatron.distill.kd_loss import global_top_k
from minitron_megatron.distill.teacher_cache import (
    DTYPES,
    MANIFEST,
    SHARDS,
    TeacherCacheConfig,
    atomic_save,
    check_disk,
    log_sum_exp,
    make_manifest,
    sample_digest,
    shard_path,
    shard_ranges,
)
from minitron_megatron.errors import UserError
from minitron_megatron.output_paths import check_output_dir

log = logging.getLogger("minitron.teacher_cache")


def check_teacher_cache(*, teacher, data, num_samples: int, config: TeacherCacheConfig,
                        save: str | Path, overwrite: bool, parallel: ParallelConfig) -> None:
    """Every check of ``minitron teacher-cache``, one ``UserError`` each, before any work."""
    check_output_dir(save, "--save")
    cfg = teacher.model_config
    if num_samples <= 0:
        raise UserError(f"--train-iters × --global-batch-size must be positive, got "
                        f"{num_samples} samples.")
    if config.top_k > cfg.padded_vocab_size:
        raise UserError(f"--cache-top-k {config.top_k} exceeds the teacher's vocabulary "
                        f"({cfg.padded_vocab_size}); choose a smaller k.")
    cfg.check_parallel(tensor_parallel=parallel.tensor_model_parallel_size,
                       pipeline_parallel=parallel.pipeline_model_parallel_size)
    cfg.check_seq_length(data.seq_length)
    root = Path(save)
    manifest = make_manifest(teacher=teacher, data=data, num_samples=num_samples, config=config)
    existing = root / MANIFEST
    old = json.loads(existing.read_text()) if existing.is_file() else None
    if old is not None and not overwrite:
        changed = [k for k in manifest if old.get(k) != manifest[k]]
        if changed:
            raise UserError(f"--save {root} holds a teacher cache made with other settings "
                            f"({', '.join(changed)}); pass --overwrite to replace it, or "
                            f"another --save.")
    elif root.is_dir() and any(root.iterdir()) and not overwrite:
        raise UserError(f"--save {root} is not empty and holds no teacher cache; pass "
                        f"--overwrite to replace it, or another --save.")
    # the shards of the same cache are kept (resumed), whatever ``overwrite`` says
    done = sum(p.stat().st_size for p in (root / SHARDS).glob("*.safetensors")) \
        if old == manifest else 0
    check_disk(root, num_samples * data.seq_length * config.bytes_per_token - done)


def _prepare(root: Path, manifest: dict, overwrite: bool) -> None:
    """Rank 0: a directory holding this manifest (replacing whatever was there when asked)."""
    path = root / MANIFEST
    same = path.is_file() and json.loads(path.read_text()) == manifest
    if overwrite and not same and root.exists():
        shutil.rmtree(root)
    (root / SHARDS).mkdir(parents=True, exist_ok=True)
    if not same:
        tmp = path.with_name(f".{MANIFEST}.tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path)


def write_teacher_cache(info, ps, data, *, num_samples: int, micro_batch_size: int,
                        config: TeacherCacheConfig, save: str | Path, overwrite: bool = False,
                        params_dtype: torch.dtype = torch.float32, model=None) -> Path:
    """Compute and store the teacher's top-k for training samples ``0..num_samples−1`` of
    ``data`` (see the module docstring); returns the cache directory. Collective. ``model``:
    the teacher of ``info`` already built and loaded on this rank (the search's), else it is
    loaded here."""
    from minitron_megatron.checkpoint import load_checkpoint
    from minitron_megatron.data.loaders import build_datasets, micro_batches
    from minitron_megatron.evaluate import eod_id_of
    from minitron_megatron.model.build import build_model
    from minitron_megatron.model.forward import pipeline_forward

    root, cfg, k = Path(save), info.model_config, config.top_k
    manifest = make_manifest(teacher=info, data=data, num_samples=num_samples, config=config)
    if ps.rank == 0:
        _prepare(root, manifest, overwrite)
    train = build_datasets(data, eod_id=eod_id_of(info), vocab_size=cfg.vocab_size,
                           num_samples={"train": num_samples}, repeat=("train",),
                           padded_vocab_size=cfg.padded_vocab_size)["train"]
    box = [[r for r in shard_ranges(num_samples, config.samples_per_shard)
            if not shard_path(root, *r).is_file()] if ps.rank == 0 else None]
    if dist.is_initialized():  # after rank 0 prepared the directory: the same list everywhere
        dist.broadcast_object_list(box, src=0)
    mine = box[0][ps.dp_rank::ps.dp_size]
    if ps.rank == 0:
        log.info("teacher cache %s: %d of %d shards to compute (k = %d, %s, %d bytes/token)",
                 root, len(box[0]), len(shard_ranges(num_samples, config.samples_per_shard)),
                 k, config.dtype, config.bytes_per_token)
    if model is None and box[0]:  # loading is collective: every rank or none
        model = build_model(cfg, ps, params_dtype=params_dtype, init_weights=False)
        load_checkpoint(info, model=model)
    dtype = DTYPES[config.dtype]

    def top_k_of(batch, logits):  # logits [b, s, V/tp] → this micro-batch's real samples
        b, s, vocab = logits.shape
        flat = logits.reshape(b * s, vocab)  # [N, V/tp]
        values, ids = global_top_k(flat, k, ps.tp_group, ps.tp_rank * vocab)  # [N, k] each
        lse = log_sum_exp(flat, ps.tp_group)  # [N]
        values = (values - values[:, :1]).clamp_min(torch.finfo(dtype).min)  # ≤ 0, row max 0
        real = batch["sample_mask"] > 0  # [b]
        digests = torch.tensor([sample_digest(t) for t in batch["tokens"][real]])
        return (values.view(b, s, k)[real].cpu(), ids.view(b, s, k)[real].cpu(),
                lse.view(b, s)[real].cpu(), digests)

    for n, (start, stop) in enumerate(mine):
        outs = pipeline_forward(model, ps, micro_batches(train, range(start, stop),
                                                         micro_batch_size),
                                seq_length=data.seq_length, micro_batch_size=micro_batch_size,
                                on_output=top_k_of)
        if ps.is_last_stage and ps.tp_rank == 0:
            values, ids, lse, digests = (torch.cat(parts) for parts in zip(*outs))
            atomic_save({"values": values.to(dtype), "indices": ids.to(torch.int32),
                         "lse": lse.float(), "digest": digests.to(torch.int64)},
                        shard_path(root, start, stop))
            log.info("teacher cache: samples %d-%d written (%d/%d of this rank's shards)",
                     start, stop - 1, n + 1, len(mine))
    if dist.is_initialized():
        dist.barrier()
    return root
