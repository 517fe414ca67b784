"""What the claims study runs (``benchmarks/claims.py`` and the data-scarce C1 study
``benchmarks/claims_c1.py``): the students, the retraining runs, their seeds and budgets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

WIDTH = dict(hidden_size=384, ffn_hidden_size=960, num_attention_heads=6, num_query_groups=3)
"""65.3M of 134.5M parameters; every sharded size divisible by 3 (SmolLM2's query groups)."""

DEPTH_LAYERS = 11
"""30 → 11 layers: 67.3M parameters, the depth student matched to the width one."""

AGGREGATIONS = (("l2", "mean"), ("mean", "mean"), ("l2", "l2"), ("var", "var"))
"""(batch, sequence) aggregations of C5; the first is the paper's best and the default."""

KL_CE_WEIGHT = 0.5
"""α of the C7 KL + CE run: 0.5·CE + 0.5·KL."""


def width_student(batch: str, seq: str) -> str:
    return f"width ({batch},{seq})"


DEFAULT_WIDTH = width_student(*AGGREGATIONS[0])
DEPTH = f"depth {DEPTH_LAYERS} (loss)"
SCRATCH = "random init"


WINDOW_KINDS = ("as_sampled", "doc_start")
"""Held-out windows every loss is reported on: as the dataset cut them (mostly mid-document)
and starting at a document's first token."""


@dataclass(frozen=True)
class Run:
    """One retraining run of the study (trained once per seed when ``seeded``)."""

    name: str
    student: str
    objective: str
    """``forward KL``, ``reverse KL``, ``KL+CE`` (distillation) or ``CE`` (no teacher)."""

    claims: tuple[str, ...]

    seeded: bool = False
    """Trained with every seed of the study (the runs that decide C1 and C3); else the first."""

    def key(self, seed: int) -> str:
        return f"{self.name}@{seed}"


RUNS = (
    Run("width-kd", DEFAULT_WIDTH, "forward KL", ("C1", "C3", "C7"), seeded=True),
    Run("width-ce", DEFAULT_WIDTH, "CE", ("C1",), seeded=True),
    Run("depth-kd", DEPTH, "forward KL", ("C3",), seeded=True),
    Run("scratch-ce", SCRATCH, "CE", ("C1",)),
    Run("width-rkl", DEFAULT_WIDTH, "reverse KL", ("C7",)),
    Run("width-kl-ce", DEFAULT_WIDTH, "KL+CE", ("C7",)),
)
RUN = {r.name: r for r in RUNS}


@dataclass(kw_only=True, frozen=True)
class StudyConfig:
    """Budgets of the study (defaults: the full run, ≤ 60 min on 2 idle cores)."""

    output_dir: Path
    """Students, runs, ``results.json``, ``claims.md`` and the plots go here."""

    teacher: Path | None = None
    """Teacher checkpoint; ``None``: import SmolLM2-135M from its GGUF into the output dir."""

    data_path: str | None = None
    """Indexed dataset prefix; ``None``: tokenize the Wikipedia corpus into the output dir."""

    seq_length: int = 256
    """Tokens per sample."""

    micro_batch_size: int = 4
    """Samples per forward pass (training, evaluation, calibration)."""

    global_batch_size: int = 4
    """Samples per optimizer step."""

    train_iters: int = 32
    """Optimizer steps of every run (the token budget: × global batch × seq length)."""

    lr: float = 6e-4
    """Peak learning rate (Adam, warmup then cosine decay to ``lr / 10``), every run."""

    warmup_iters: int = 4
    """Linear warmup steps."""

    eval_samples: int = 64
    """Held-out samples (validation split) of every zero-shot and final loss."""

    curve_samples: int = 4
    """The first held-out samples, evaluated during training for the curves."""

    curve_points: int = 4
    """Evaluations during training (plus one at iteration 0)."""

    calib_samples: int = 32
    """Calibration samples (train split) of each width importance pass."""

    depth_calib_samples: int = 4
    """Calibration samples of the depth metric (one pass per layer)."""

    keep_checkpoints: bool = False
    """Keep the retrained checkpoints (≈ 0.8 GB each with the optimizer state)."""

    doc_start_samples: int = 64
    """Held-out windows that start at a document (the ``doc_start`` kind), every loss."""

    seeds: tuple[int, ...] = (1234, 1235, 1236)
    """Seeds of the training-data order (and of the random init) of the seeded runs; the first
    one also orders every other run, the calibration and the held-out sets (fixed for all)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("--seeds must be distinct integers (at least one).")
        for name in ("seq_length", "micro_batch_size", "global_batch_size", "train_iters",
                     "eval_samples", "curve_samples", "curve_points", "calib_samples",
                     "depth_calib_samples", "doc_start_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive.")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError("--global-batch-size must be a multiple of --micro-batch-size.")
        if self.curve_samples > min(self.eval_samples, self.doc_start_samples):
            raise ValueError("--curve-samples must be at most --eval-samples and "
                             "--doc-start-samples (they are the first held-out windows).")
        if self.train_iters % self.curve_points:
            raise ValueError(f"--train-iters {self.train_iters} must be a multiple of "
                             f"--curve-points {self.curve_points} (evenly spaced evaluations).")
        if not 0 <= self.warmup_iters < self.train_iters:
            raise ValueError("--warmup-iters must be in [0, --train-iters).")

    @classmethod
    def quick(cls, **kw) -> StudyConfig:
        """The same path on a tiny slice (CI smoke test)."""
        return cls(**{**dict(seq_length=64, micro_batch_size=2, global_batch_size=2,
                             train_iters=2, warmup_iters=1, eval_samples=4, curve_samples=2,
                             curve_points=1, calib_samples=4, depth_calib_samples=2,
                             doc_start_samples=4), **kw})

    @property
    def seed(self) -> int:
        """The base seed: calibration, held-out sets, and the runs trained once."""
        return self.seeds[0]

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()
                if k not in ("output_dir", "keep_checkpoints")}


REGIMES = ("scarce", "single-pass")
"""C1 retraining regimes of ``benchmarks/claims_c1.py``: a small fixed training set for many
epochs, or one long pass over the train split (no sample seen twice)."""


@dataclass(kw_only=True, frozen=True)
class C1Config:
    """The long C1 study (``benchmarks/claims_c1.py``): the width student of the claims study
    retrained by KD and by CE, each seed on the same samples, with held-out curves."""

    study_dir: Path
    """Output directory of ``benchmarks/claims.py`` (its students, held-out sets, schedule)."""

    regime: str = "scarce"
    """``scarce``: ``train_samples`` fixed samples for ``epochs`` passes; ``single-pass``:
    ``train_iters`` steps over the train split in each seed's order."""

    train_samples: int = 64
    """Size of the fixed training set (``scarce``): the first samples of the train split in
    the base seed's order, the same set for every seed."""

    epochs: int = 5
    """Passes over the fixed set (``scarce``), each in its own seeded order."""

    train_iters: int = 256
    """Optimizer steps (``single-pass``)."""

    curve_points: int = 5
    """Held-out evaluations during training, evenly spaced (plus the zero-shot one)."""

    curve_samples: int = 16
    """The first held-out windows of each kind, evaluated for the curves."""

    seeds: tuple[int, ...] = (1234, 1235, 1236)
    """Seeds of the data order (``scarce``: of each epoch's order)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "study_dir", Path(self.study_dir))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if self.regime not in REGIMES:
            raise ValueError(f"--regime must be one of {', '.join(REGIMES)}.")
        for name in ("train_samples", "epochs", "train_iters", "curve_points", "curve_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("--seeds must be distinct integers (at least one).")

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}
