"""Candidate shapes for the architecture search: every combination of the per-axis choices whose
exact parameter count (``ModelConfig.num_parameters``: padded vocabulary, tied embeddings and all)
lies within a tolerance of the target, and which the requested TP/PP can hold.

Default choices (paper §2.3 / §4.3, in its spirit):

- layers: the original count down to ``ceil(0.9 · L)`` (depth changes of at most ~10 %);
- hidden: the original width down to half of it, in steps of 64 (128 from a width of 2048 up);
- MLP: multiples of the original hidden size in quarter steps (1×, 1.25×, …) up to the original
  MLP size, which is always a choice; rounded to multiples of 64·TP;
- heads: multiples of the query-group count from half the heads to all of them;
- query groups: kept (the paper keeps the KV heads; add choices in a YAML space to prune them).

Head width (``kv_channels``) is always kept, as pruning keeps whole heads.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from minitron_megatron.config import ModelConfig, yaml_problem
from minitron_megatron.errors import UserError

AXES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


def parse_param_count(text: str | int) -> int:
    """``"70M"``, ``"4B"``, ``"1.5e8"`` or ``70000000`` → an integer parameter count."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKmMbBgG]?)\s*", str(text))
    if not match:
        raise UserError(f"cannot read a parameter count from {text!r}; write e.g. 70M or 4B.")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[match.group(2).lower()]
    value = int(round(float(match.group(1)) * scale))
    if value <= 0:
        raise UserError(f"the target parameter count must be positive, got {text!r}.")
    return value


def format_params(count: int) -> str:
    """``134515008`` → ``"134.52M"`` (``k``, ``M`` or ``B``)."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


@dataclass(kw_only=True, frozen=True)
class SearchSpace:
    """The choices per axis; every combination is a candidate before filtering."""

    num_layers: tuple[int, ...]
    """Layer counts (depth pruning removes the least important layers / block)."""

    hidden_size: tuple[int, ...]
    """Embedding widths."""

    ffn_hidden_size: tuple[int, ...]
    """MLP sizes."""

    num_attention_heads: tuple[int, ...]
    """Query head counts (each must be a multiple of the chosen query groups)."""

    num_query_groups: tuple[int, ...]
    """Key/value head counts."""

    def __post_init__(self) -> None:
        for axis in AXES:
            values = getattr(self, axis)
            if not values or any(not isinstance(v, int) or v <= 0 for v in values):
                raise UserError(f"search space {axis} must list positive integers, got {values}")
            object.__setattr__(self, axis, tuple(sorted(set(values), reverse=True)))

    @classmethod
    def default(cls, cfg: ModelConfig, *, tensor_parallel: int = 1) -> SearchSpace:
        """The documented default choices for pruning ``cfg`` (see the module docstring)."""
        layers = range(cfg.num_layers, math.ceil(0.9 * cfg.num_layers) - 1, -1)
        step = 128 if cfg.hidden_size >= 2048 else 64
        hidden = range(cfg.hidden_size, cfg.hidden_size // 2 - 1, -step)
        ffn_multiple = 64 * tensor_parallel
        ratios = [1 + q / 4 for q in range(int(4 * cfg.ffn_hidden_size / cfg.hidden_size) + 1)]
        ffn = {_round_to(r * cfg.hidden_size, ffn_multiple) for r in ratios}
        ffn = {f for f in ffn if f <= cfg.ffn_hidden_size} | {cfg.ffn_hidden_size}
        groups = cfg.num_query_groups
        heads = range(cfg.num_attention_heads, math.ceil(cfg.num_attention_heads / 2) - 1, -1)
        return cls(num_layers=tuple(layers), hidden_size=tuple(hidden),
                   ffn_hidden_size=tuple(ffn),
                   num_attention_heads=tuple(h for h in heads if h % groups == 0),
                   num_query_groups=(groups,))

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: SearchSpace) -> SearchSpace:
        """Override some axes of ``base`` (keys: the axis names; values: lists of choices)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"unknown search-space axes {unknown}; known: {sorted(names)}")
        merged = {}
        for axis in AXES:
            value = data.get(axis, getattr(base, axis))
            merged[axis] = (value,) if isinstance(value, int) else value
            if not isinstance(merged[axis], list | tuple):
                raise UserError(f"search space {axis} must be a list of integers, e.g. "
                                f"{axis}: [{getattr(base, axis)[0]}], got {value!r}")
        return cls(**{axis: tuple(values) for axis, values in merged.items()})

    @classmethod
    def from_yaml(cls, path: str | Path, base: SearchSpace) -> SearchSpace:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"search space {path} is not valid YAML ({yaml_problem(err)}); fix "
                            f"the file.") from None
        if not isinstance(data, dict):
            raise UserError(f"search space {path} must map axis names to lists of choices, "
                            f"e.g. 'num_layers: [30, 28]'.")
        return cls.from_dict(data, base)

    def check_against(self, teacher: ModelConfig, *, tensor_parallel: int) -> None:
        """Actionable errors for choices that can never give a valid pruned model."""
        for axis in AXES:
            too_big = [v for v in getattr(self, axis) if v > getattr(teacher, axis)]
            if too_big:
                raise UserError(f"search space {axis} choices {too_big} exceed the teacher's "
                                f"{getattr(teacher, axis)}; pruning only shrinks.")
        tp = tensor_parallel
        for axis in ("ffn_hidden_size", "num_attention_heads", "num_query_groups"):
            bad = [v for v in getattr(self, axis) if v % tp]
            if len(bad) == len(getattr(self, axis)):
                raise UserError(
                    f"no {axis} choice {list(getattr(self, axis))} is divisible by "
                    f"tensor-model-parallel-size {tp}; use multiples of {tp} or a smaller TP."
                )


@dataclass(frozen=True)
class Candidate:
    """One shape of the search."""

    config: ModelConfig

    @property
    def params(self) -> int:
        return self.config.num_parameters()

    @property
    def name(self) -> str:
        c = self.config
        return (f"L{c.num_layers}-H{c.hidden_size}-F{c.ffn_hidden_size}-"
                f"A{c.num_attention_heads}-G{c.num_query_groups}")

    def shape(self) -> dict[str, int]:
        return {axis: getattr(self.config, axis) for axis in AXES}


def _valid_shapes(teacher: ModelConfig, space: SearchSpace, tp: int, pp: int):
    for values in itertools.product(*(getattr(space, axis) for axis in AXES)):
        shape = dict(zip(AXES, values))
        per_group, rest = divmod(shape["num_attention_heads"], shape["num_query_groups"])
        if rest or per_group > teacher.heads_per_group:  # pruning keeps heads within groups
            continue
        try:
            cfg = teacher.replace(**shape)
            cfg.check_parallel(tensor_parallel=tp, pipeline_parallel=pp)
        except UserError:
            continue
        yield Candidate(cfg)


def enumerate_candidates(
    teacher: ModelConfig,
    space: SearchSpace,
    *,
    target_params: int,
    tolerance: float,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
) -> list[Candidate]:
    """Candidates within ``tolerance`` (relative) of ``target_params``, closest first.

    Raises ``ValueError`` listing the nearest feasible sizes when none is within the tolerance.
    """
    if not 0 < tolerance < 1:
        raise UserError(f"params tolerance must be in (0, 1), got {tolerance}.")
    space.check_against(teacher, tensor_parallel=tensor_parallel)
    valid = list(_valid_shapes(teacher, space, tensor_parallel, pipeline_parallel))
    if not valid:
        raise UserError(f"the search space holds no shape valid at TP={tensor_parallel} "
                        f"(heads a multiple of the query groups, at most "
                        f"{teacher.heads_per_group} heads per group as in the teacher, heads, "
                        f"groups and MLP size divisible by TP).")
    ranked = sorted(valid, key=lambda c: (abs(c.params - target_params), c.name))
    within = [c for c in ranked if abs(c.params - target_params) <= tolerance * target_params]
    if not within:
        below = max((c for c in valid if c.params < target_params), key=lambda c: c.params,
                    default=None)
        above = min((c for c in valid if c.params > target_params), key=lambda c: c.params,
                    default=None)
        near = ", ".join(f"{format_params(c.params)} ({c.name})" for c in (below, above) if c)
        raise UserError(
            f"no candidate within {tolerance:.0%} of {format_params(target_params)} parameters; "
            f"nearest feasible sizes: {near}. Change --target-params, widen "
            f"--params-tolerance, or extend the search space."
        )
    return within
