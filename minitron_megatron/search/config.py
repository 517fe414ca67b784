"""``SearchConfig``: what the architecture search looks for and what it keeps.

The distillation of each candidate is configured by the usual ``TrainConfig`` / ``KDConfig`` (its
``train_iters`` and ``eval_iters`` are the search's ``--candidate-train-iters`` and
``--candidate-eval-iters``); the choices per axis by ``SearchSpace``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from minitron_megatron.errors import UserError
from minitron_megatron.pruning.targets import DEPTH_METHODS, DepthMethod

RESULTS_JSON = "search_results.json"
RESULTS_MD = "search_results.md"
CANDIDATES_DIR = "candidates"
TEACHER_CACHE_DIR = "teacher_cache"
"""Where ``--cache-teacher`` writes the teacher's top-k (removed when the search is done unless
``keep_all``)."""


@dataclass(kw_only=True, frozen=True)
class SearchConfig:
    """Budget, selection and bookkeeping of one search."""

    save: Path
    """Search directory: ``search_results.{json,md}`` and ``candidates/<name>/`` (relaunch
    with the same settings to resume)."""

    target_params: int
    """Parameter budget, e.g. 70M or 4B on the command line (exact count: padded vocabulary
    and tied embeddings included)."""

    params_tolerance: float = 0.05
    """Candidates lie within ``target_params · (1 ± tolerance)``."""

    top_k: int | None = None
    """Distill only the ``top_k`` candidates with the lowest zero-shot loss (pruning and
    evaluating a candidate is cheap next to distilling it); ``None``: distill every candidate,
    as the paper does (the zero-shot loss is a poor predictor of the loss after retraining).
    It may change when a search is resumed: raising it distills the next candidates."""

    depth_method: DepthMethod = "bi"
    """Which layers a shallower candidate drops (``bi``, ``loss`` or ``block``); its metric must
    be in the scores file (``minitron importance --depth-metrics``)."""

    keep_all: bool = False
    """Keep every candidate's pruned and distilled checkpoints (default: only the best
    candidate's distilled checkpoint; every candidate's ``metrics.jsonl`` and prune plan stay)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "save", Path(self.save))
        if not isinstance(self.target_params, int) or self.target_params <= 0:
            raise UserError(f"--target-params must be a positive parameter count, got "
                            f"{self.target_params!r}.")
        if not 0 < self.params_tolerance < 1:
            raise UserError(f"--params-tolerance must be in (0, 1), e.g. 0.05 for ±5 %, got "
                            f"{self.params_tolerance}.")
        if self.top_k is not None and self.top_k <= 0:
            raise UserError(f"--top-k must be a positive number of candidates to distill, got "
                            f"{self.top_k}; omit it to distill every candidate.")
        if self.depth_method not in DEPTH_METHODS:
            raise UserError(f"--depth-method {self.depth_method!r} is not one of "
                            f"{', '.join(DEPTH_METHODS)}.")

    def candidate_dir(self, name: str) -> Path:
        return self.save / CANDIDATES_DIR / name
