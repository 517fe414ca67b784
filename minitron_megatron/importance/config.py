"""Settings of an importance pass (what is measured and how it is aggregated)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from minitron_megatron.errors import UserError

Aggregation = Literal["l2", "mean", "var"]
SeqAggregation = Literal["l2", "mean", "var", "max"]
FfnHook = Literal["fc2-input", "fc1-output"]

AGGREGATIONS = get_args(Aggregation)
SEQ_AGGREGATIONS = get_args(SeqAggregation)
FFN_HOOKS = get_args(FfnHook)
_BLOCK = re.compile(r"^block:(\d+)$")


def parse_depth_metric(name: str) -> tuple[str, int]:
    """``"bi"`` → ``("bi", 1)``, ``"loss"`` → ``("loss", 1)``, ``"block:K"`` → ``("block", K)``."""
    if name in ("bi", "loss"):
        return name, 1
    match = _BLOCK.match(name)
    if match is None or int(match.group(1)) < 1:
        raise UserError(
            f"depth metric {name!r} is not one of bi, loss, block:K (K ≥ 1 contiguous layers), "
            f"e.g. --depth-metrics bi,loss,block:2."
        )
    return "block", int(match.group(1))


@dataclass(kw_only=True, frozen=True)
class CalibrationConfig:
    """How much calibration data an importance pass reads and how it is batched."""

    num_samples: int
    """Calibration samples from the train split (``--calib-samples``), split over DP ranks."""

    micro_batch_size: int = 1
    """Samples per forward pass on one rank (``--micro-batch-size``)."""

    def __post_init__(self) -> None:
        from minitron_megatron.data.loaders import positive_int

        positive_int("--calib-samples", self.num_samples, "the number of calibration samples")
        positive_int("--micro-batch-size", self.micro_batch_size, "samples per forward pass")


@dataclass(kw_only=True, frozen=True)
class ImportanceConfig:
    """How activations become scores (paper §2.2; defaults are its best setting, Table 11)."""

    batch_agg: Aggregation = "l2"
    """Aggregation over the calibration samples of the per-sample values: ``l2`` = sqrt(Σ m²),
    ``mean`` = Σ|m| / N, ``var`` = Σ (m − mean)² / N."""

    seq_agg: SeqAggregation = "mean"
    """Aggregation over the tokens of one sample: ``mean`` = Σ|a| / S, ``l2`` = sqrt(Σ a²),
    ``var`` = Σ (a − mean)² / S, ``max`` = max |a| (the peak, e.g. at the first position)."""

    ffn_hook: FfnHook = "fc2-input"
    """Per-neuron activation: the input of ``linear_fc2`` (after activation and gate) or the
    output of ``linear_fc1`` (the paper's X·W1ᵢᵀ, bias included)."""

    depth_metrics: tuple[str, ...] = ("bi",)
    """Layer metrics: ``bi`` (1 − cos(x_in, x_out), same pass), ``loss`` (LM-loss increase
    when one layer is skipped: one more pass per layer), ``block:K`` (increase when K
    contiguous layers are skipped: one pass per block start)."""

    calib_doc_starts: float = 0.0
    """Fraction of the calibration samples that are windows starting at a document's first
    token (``data.windows``), interleaved evenly with the dataset's own windows (which mostly
    start mid-document). 0: the dataset's windows only, as the paper."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.calib_doc_starts <= 1.0:
            raise UserError(f"--calib-doc-starts {self.calib_doc_starts} must be a fraction in "
                            f"[0, 1].")
        for name, value, allowed in (("batch_agg", self.batch_agg, AGGREGATIONS),
                                     ("seq_agg", self.seq_agg, SEQ_AGGREGATIONS),
                                     ("ffn_hook", self.ffn_hook, FFN_HOOKS)):
            if value not in allowed:
                raise UserError(f"{name}={value!r} is not one of {', '.join(allowed)}.")
        metrics = tuple(self.depth_metrics)
        object.__setattr__(self, "depth_metrics", metrics)
        for metric in metrics:
            parse_depth_metric(metric)
        if len(set(metrics)) != len(metrics):
            raise UserError(f"depth metrics {metrics} name one metric twice.")

    def check_model(self, num_layers: int) -> None:
        """Raise an actionable error if a ``block:K`` metric does not fit ``num_layers``."""
        for metric in self.depth_metrics:
            kind, k = parse_depth_metric(metric)
            if kind == "block" and k >= num_layers:
                raise UserError(
                    f"depth metric {metric} removes {k} contiguous layers but the model has "
                    f"only {num_layers}; choose K < {num_layers}."
                )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["depth_metrics"] = list(self.depth_metrics)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImportanceConfig:
        return cls(**{**data, "depth_metrics": tuple(data.get("depth_metrics", ()))})
