"""The teacher's top-k logits, computed once and read by every distillation on the same samples.

A search distills every candidate on the same batches, and repeated runs (seeds, re-runs after a
crash) see them again: each pays the teacher's forward (2·N_t FLOPs per token) anew. With
``--kd-top-k`` the loss only needs, per token, the teacher's ``k`` largest logits and their
vocabulary ids, so ``write_teacher_cache`` runs the teacher once over the samples a schedule will
use and stores them; ``Trainer(teacher_cache=...)`` reads them instead of building a teacher.

On disk (``DIR``): ``cache.json`` (what it was made from: teacher, data order, sequence length,
``k``, dtype) and ``shards/samples_<start>-<stop>.safetensors``, each holding for training
samples ``start..stop−1``::

    values   [n, s, k]  fp16 / bf16 / fp32   the k largest logits minus the row's max, descending
    indices  [n, s, k]  int32                 their vocabulary ids (global over TP shards)
    lse      [n, s]     fp32                  log Σ_v exp(z_v) of the full row (raw logits)
    digest   [n]        int64                 fingerprint of the sample's tokens

Size per token: ``k · (value bytes + 4) + 4`` (k = 64 in fp16: 388 bytes). Shards are written
atomically (a temporary file renamed into place) by the data-parallel rank that computed them,
so a killed run resumes where it stopped; the ``digest`` ties every cached sample to the tokens
it was computed on, so a reader with another data order, seed or sequence length is refused.

The top-k is global over a TP-sharded vocabulary (each rank's top-k, gathered, top-k again), as
in the KD loss; the reader hands the rows' (values, ids) to the loss the live ``--kd-top-k``
uses after its own top-k (``kd_loss.top_k_kd_loss``), so the cached loss equals the live one
(up to the rounding of the stored values) and no teacher row of the full vocabulary is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist

from minitron_megatron.errors import UserError

FORMAT = 1
MANIFEST = "cache.json"
SHARDS = "shards"
CacheDtype = Literal["fp16", "bf16", "fp32"]
DTYPES = dict(zip(get_args(CacheDtype), (torch.float16, torch.bfloat16, torch.float32),
                  strict=True))


@dataclass(kw_only=True, frozen=True)
class TeacherCacheConfig:
    """What ``minitron teacher-cache`` stores per token."""

    top_k: int = 64
    """The teacher's ``k`` largest logits kept per token (a distillation may use any k' ≤ k)."""

    dtype: CacheDtype = "fp16"
    """Dtype of the stored logit values (``fp16``, ``bf16`` or ``fp32``); they are stored
    relative to the row's maximum, so fp16's range is never the limit."""

    samples_per_shard: int = 256
    """Training samples per shard file (the unit of resuming and of data-parallel work)."""

    def __post_init__(self) -> None:
        if not isinstance(self.top_k, int) or self.top_k <= 0:
            raise UserError(f"--cache-top-k must be a positive integer, got {self.top_k!r}.")
        if self.dtype not in DTYPES:
            raise UserError(f"--cache-dtype must be one of {', '.join(DTYPES)}, got "
                            f"{self.dtype!r}.")
        if self.samples_per_shard <= 0:
            raise UserError(f"--cache-samples-per-shard must be positive, got "
                            f"{self.samples_per_shard}.")

    @property
    def bytes_per_token(self) -> int:
        return self.top_k * (DTYPES[self.dtype].itemsize + 4) + 4


def sample_digest(tokens: torch.Tensor) -> int:
    """A signed 64-bit fingerprint of a sample's token ids (the same on every rank)."""
    raw = tokens.to(torch.int64).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little", signed=True)


def shard_ranges(num_samples: int, per_shard: int) -> list[tuple[int, int]]:
    return [(start, min(start + per_shard, num_samples))
            for start in range(0, num_samples, per_shard)]


def shard_path(root: str | Path, start: int, stop: int) -> Path:
    return Path(root) / SHARDS / f"samples_{start:010d}-{stop:010d}.safetensors"


def missing_shards(root: str | Path, num_samples: int, per_shard: int, *,
                   upto: int | None = None) -> list[Path]:
    """The shard files of a cache of ``num_samples`` not (yet) written, of those holding
    samples below ``upto`` (default: all)."""
    upto = num_samples if upto is None else upto
    return [shard_path(root, a, b) for a, b in shard_ranges(num_samples, per_shard)
            if a < upto and not shard_path(root, a, b).is_file()]


def data_identity(data) -> dict[str, Any]:
    """The fields of a ``DataConfig`` that decide which tokens sample ``i`` holds."""
    return {"data_path": str(Path(data.data_path).resolve()), "split": data.split,
            "seed": data.seed, "seq_length": data.seq_length}


def make_manifest(*, teacher, data, num_samples: int, config: TeacherCacheConfig) -> dict:
    cfg = teacher.model_config
    return {"format": FORMAT, "teacher": str(Path(teacher.root).resolve()),
            "teacher_iteration": teacher.iteration, "teacher_config": cfg.to_dict(),
            "padded_vocab_size": cfg.padded_vocab_size, "data": data_identity(data),
            "num_samples": num_samples, **dataclasses.asdict(config),
            "bytes_per_token": config.bytes_per_token}


# ---------------------------------------------------------------------- a TP-sharded row
def log_sum_exp(logits: torch.Tensor, group) -> torch.Tensor:
    """``log Σ_v exp(z_v)`` of each row over the sharded vocabulary: ``[N]`` fp32."""
    lse = torch.logsumexp(logits.float(), dim=-1)  # [N] over this shard (one fused pass)
    if group is None or dist.get_world_size(group) == 1:
        return lse
    top = lse.clone()  # [N]: the largest shard's log-sum, so that exp(lse − top) ≤ 1
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    sums = (lse - top).exp()  # [N]: Σ over this shard of exp(z − top)
    dist.all_reduce(sums, group=group)
    return top + sums.log()


# ---------------------------------------------------------------------- reading
class TeacherCache:
    """A cache directory, opened for reading (``minitron distill --teacher-cache``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise UserError(f"--teacher-cache {self.root} is not a teacher cache ({MANIFEST} "
                            f"missing); create it with `minitron teacher-cache --save "
                            f"{self.root} ...`.")
        try:
            self.manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path} cannot be read ({err}); create the cache again.") from None
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"{path} has format {self.manifest.get('format')}, this version "
                            f"reads {FORMAT}; create the cache again.")
        self.top_k = int(self.manifest["top_k"])
        self.num_samples = int(self.manifest["num_samples"])
        self.per_shard = int(self.manifest["samples_per_shard"])
        self._open: tuple[int, Any] | None = None

    def check_covers(self, *, data, num_samples: int, padded_vocab_size: int) -> None:
        """One ``UserError`` if a run on ``data`` using samples ``0..num_samples−1`` cannot
        read its teacher from this cache (checked before any model is built; the KD objective
        by ``distill.preflight.check_cache_objective``)."""
        have, want = self.manifest["data"], data_identity(data)
        diff = [f"{key} {have[key]} (the run: {want[key]})" for key in want
                if have[key] != want[key]]
        if diff:
            raise UserError(f"the teacher cache {self.root} was made for other samples: "
                            f"{', '.join(diff)}; re-create it with `minitron teacher-cache` "
                            f"and the run's data flags.")
        if num_samples > self.num_samples:
            raise UserError(f"the teacher cache {self.root} holds {self.num_samples} training "
                            f"samples, the run needs {num_samples} (--train-iters × "
                            f"--global-batch-size); re-create it for that many.")
        if padded_vocab_size != self.manifest["padded_vocab_size"]:
            raise UserError(f"the teacher cache {self.root} has a vocabulary of "
                            f"{self.manifest['padded_vocab_size']}, the student "
                            f"{padded_vocab_size}: it was made with another teacher family.")
        missing = [path.name for path in missing_shards(self.root, self.num_samples,
                                                         self.per_shard, upto=num_samples)]
        if missing:
            raise UserError(f"the teacher cache {self.root} is incomplete ({len(missing)} "
                            f"shards missing, e.g. {missing[0]}); rerun the same `minitron "
                            f"teacher-cache` command to finish it.")

    def kd_config(self, kd):
        """``kd`` (a ``KDConfig``, or the default one) reading this cache: its ``top_k`` unless
        a smaller one is asked for (``check_cache_objective`` refuses a larger one)."""
        from minitron_megatron.distill.config import KDConfig

        kd = kd or KDConfig()
        return dataclasses.replace(kd, top_k=kd.top_k or self.top_k)

    def check_teacher(self, teacher) -> None:
        """``UserError`` unless the cache was computed by a model of ``teacher``'s shape."""
        if self.manifest["teacher_config"] != teacher.model_config.to_dict():
            raise UserError(f"the teacher cache {self.root} was computed by "
                            f"{self.manifest['teacher']}, not by a model shaped like "
                            f"{teacher.root}; create the cache from the search's teacher.")

    def digest(self, i: int) -> int:
        """The token digest of sample ``i`` as cached."""
        handle, row = self._row(i)
        return int(handle.get_slice("digest")[row:row + 1][0])

    def read(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``i``'s ``(values [s, k] fp32, indices [s, k] int64)``; only its rows are
        read from the memory-mapped shard."""
        handle, row = self._row(i)
        return (handle.get_slice("values")[row:row + 1][0].float(),
                handle.get_slice("indices")[row:row + 1][0].long())

    def _row(self, i: int):
        from safetensors import safe_open

        shard = i // self.per_shard
        if self._open is None or self._open[0] != shard:
            start = shard * self.per_shard
            stop = min(start + self.per_shard, self.num_samples)
            self._open = (shard, safe_open(shard_path(self.root, start, stop), framework="pt"))
        return self._open[1], i - shard * self.per_shard


class CachedTeacherDataset:
    """A training dataset whose samples carry the cached teacher top-k (``teacher_values``,
    ``teacher_indices``: ``[s, k]``; only with ``with_teacher``: the last pipeline stage's ranks
    use them); a sample whose tokens differ from those the cache was computed on raises
    ``UserError`` on every rank. Other attributes are the wrapped dataset's."""

    def __init__(self, dataset, cache: TeacherCache, top_k: int, *, with_teacher: bool = True):
        self.dataset_wrapped, self.cache, self.top_k = dataset, cache, top_k
        self.with_teacher = with_teacher

    def __len__(self) -> int:
        return len(self.dataset_wrapped)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["dataset_wrapped"], name)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.dataset_wrapped[i]
        if self.cache.digest(i) != sample_digest(sample["tokens"]):
            raise UserError(f"training sample {i} differs from the one the teacher cache "
                            f"{self.cache.root} was computed on (another corpus, split, seed or "
                            f"number of samples); re-create the cache with the run's flags.")
        if not self.with_teacher:
            return sample
        values, indices = self.cache.read(i)  # [s, K] each, descending: the first k are top-k
        return {**sample, "teacher_values": values[:, :self.top_k],
                "teacher_indices": indices[:, :self.top_k]}


def check_order(cache: TeacherCache, dataset, num_samples: int) -> None:
    """The first and last samples the run reads are the cached ones (before any model)."""
    wrapped = CachedTeacherDataset(dataset, cache, cache.top_k, with_teacher=False)
    for i in sorted({0, num_samples - 1}):
        wrapped[i]


def check_disk(root: str | Path, needed_bytes: int) -> None:
    """``UserError`` when the file system of ``root`` has less free space than needed."""
    probe = Path(root)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed_bytes > free:
        raise UserError(f"the teacher cache needs {human_bytes(needed_bytes)} in {root} but "
                        f"only {human_bytes(free)} are free; lower --cache-top-k, use "
                        f"--cache-dtype fp16/bf16, cache fewer samples, or free space.")


def human_bytes(n: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
