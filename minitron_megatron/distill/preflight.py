"""Checks of a distillation / fine-tuning run that fail with one actionable error before any
work is done (before process groups, datasets or models)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from minitron_megatron.checkpoint import CheckpointInfo
from minitron_megatron.config import ParallelConfig
from minitron_megatron.distill.checkpointing import check_schedule, resumable_checkpoint
from minitron_megatron.distill.config import KDConfig, TrainConfig
from minitron_megatron.distill.progress import require_wandb
from minitron_megatron.errors import UserError
from minitron_megatron.output_paths import check_output_dir

log = logging.getLogger("minitron.distill")


def tokenizer_fingerprint(info: CheckpointInfo) -> str | None:
    """Digest of the tokenizer files a checkpoint carries (``None`` when it carries none)."""
    directory = info.tokenizer_dir
    if directory is None:
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(directory).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def check_run(*, student: CheckpointInfo, teacher: CheckpointInfo | None, kd: KDConfig | None,
              train: TrainConfig, parallel: ParallelConfig, world_size: int,
              params_dtype: torch.dtype = torch.float32,
              seq_length: int | None = None, teacher_cache=None, data=None) -> None:
    """Raise a ``UserError`` (``CheckpointError`` included) for the first problem found.
    ``teacher_cache`` (a ``TeacherCache``, with the run's ``data``) stands in for ``teacher``."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    check_output_dir(train.save, "--save")
    for role, info in (("student", student), ("teacher", teacher)):
        if info is None:
            continue
        try:
            info.model_config.check_parallel(tensor_parallel=tp, pipeline_parallel=pp)
        except UserError as err:
            raise UserError(f"the {role} ({info.root}) cannot be laid out at TP={tp}, PP={pp}: "
                            f"{err} Teacher and student share the layout, so it must suit "
                            f"both.") from None
        if seq_length is not None:
            info.model_config.check_seq_length(seq_length)
    train.microbatches(parallel.data_parallel_size(world_size))
    if teacher is not None:
        _check_same_vocabulary(student, teacher)
        top_k = (kd or KDConfig()).top_k
        if top_k and top_k > teacher.model_config.padded_vocab_size:
            raise UserError(f"--kd-top-k {top_k} exceeds the vocabulary "
                            f"({teacher.model_config.padded_vocab_size}); choose a smaller k.")
        (kd or KDConfig()).check_layers(student.model_config.num_layers,
                                        teacher.model_config.num_layers)
    if teacher_cache is not None:
        _check_cache(teacher_cache, student=student, kd=kd or KDConfig(), train=train, data=data)
    resume = resumable_checkpoint(train.load, student.model_config)
    if resume is not None:
        check_schedule(resume, train)
    if train.wandb_project:
        require_wandb()
    if train.use_distributed_optimizer and params_dtype == torch.float32:
        raise UserError("the distributed optimizer shards fp32 main weights of bf16/fp16 "
                        "parameters; use --params-dtype bf16, or drop the distributed optimizer.")


def check_cache_objective(kd: KDConfig, cache_top_k: int) -> None:
    """``UserError`` unless the ``kd`` objective can read a teacher cache of ``cache_top_k``
    logits per token."""
    if kd.reverse:
        raise UserError("--kd-reverse cannot use a teacher cache: the reverse KL against the "
                        "cached top-k teacher is infinite; use --teacher for the reverse KL.")
    if kd.intermediate_pairs:
        raise UserError("--kd-intermediate needs the teacher's hidden states, which a teacher "
                        "cache does not hold; use --teacher for intermediate-state losses.")
    if kd.top_k is not None and kd.top_k > cache_top_k:
        raise UserError(f"--kd-top-k {kd.top_k} exceeds the teacher cache's k = {cache_top_k}; "
                        f"use --kd-top-k ≤ {cache_top_k} or re-create the cache with a larger "
                        f"--cache-top-k.")


def _check_cache(cache, *, student: CheckpointInfo, kd: KDConfig, train: TrainConfig,
                 data) -> None:
    check_cache_objective(kd, cache.top_k)
    cache.check_covers(data=data, num_samples=train.train_iters * train.global_batch_size,
                       padded_vocab_size=student.model_config.padded_vocab_size)


def _check_same_vocabulary(student: CheckpointInfo, teacher: CheckpointInfo) -> None:
    s, t = student.model_config, teacher.model_config
    if (s.vocab_size, s.padded_vocab_size) != (t.vocab_size, t.padded_vocab_size):
        raise UserError(
            f"teacher and student vocabularies differ (teacher {t.vocab_size} tokens padded to "
            f"{t.padded_vocab_size}, student {s.vocab_size} padded to {s.padded_vocab_size}): "
            f"the KD loss compares distributions over the same token ids. Derive the student "
            f"from the teacher (prune it) or give it the teacher's tokenizer and vocabulary.")
    fingerprints = tokenizer_fingerprint(student), tokenizer_fingerprint(teacher)
    if None in fingerprints:
        log.warning("cannot compare tokenizers: %s carries none; make sure both models use the "
                    "same one", student.root if fingerprints[0] is None else teacher.root)
    elif fingerprints[0] != fingerprints[1]:
        raise UserError(
            f"teacher and student tokenizers differ ({teacher.tokenizer_dir} vs "
            f"{student.tokenizer_dir}): the same token id must mean the same text for the KD "
            f"loss to make sense. Derive the student from the teacher, or re-create it with the "
            f"teacher's tokenizer.")
