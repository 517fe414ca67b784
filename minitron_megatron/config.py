"""ModelConfig: the architecture of a GPT, independent of how it is laid out on ranks.

The config travels inside every checkpoint (``model_config.yaml``), so no command needs the model's
dimensions re-passed. ``ParallelConfig`` describes the layout (TP × PP × DP) a run uses.

Example::

    >>> cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128,
    ...                   num_attention_heads=4, num_query_groups=2, vocab_size=256)
    >>> cfg.num_parameters()
    106816
    >>> ModelConfig.from_yaml(cfg.to_yaml()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from minitron_megatron.errors import UserError

Normalization = Literal["RMSNorm", "LayerNorm"]
Activation = Literal["silu", "gelu", "relu", "squared_relu"]
PositionEmbedding = Literal["rope", "learned_absolute"]

_NORMALIZATIONS = get_args(Normalization)
_ACTIVATIONS = get_args(Activation)
_POSITION_EMBEDDINGS = get_args(PositionEmbedding)


DEFAULT_SEED = 1234
"""The one default seed of every run (``ParallelConfig.seed``, the data shuffle, the trainer)."""


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"ModelConfig.{name} must be a positive integer, got {value!r}.")


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    """Architecture of a decoder-only GPT as built by Megatron-Core's ``GPTModel``."""

    num_layers: int
    """Number of transformer layers."""

    hidden_size: int
    """Width of the residual stream (embedding channels)."""

    ffn_hidden_size: int
    """MLP intermediate size (neurons); with a gated unit, each half of ``linear_fc1``."""

    num_attention_heads: int
    """Number of query heads."""

    vocab_size: int
    """Number of real tokens of the tokenizer."""

    num_query_groups: int | None = None
    """Number of key/value heads (GQA); ``None`` means one per query head (MHA)."""

    kv_channels: int | None = None
    """Width of one attention head; ``None`` means ``hidden_size // num_attention_heads``.
    Pruned models keep the original head width, so this may differ from hidden/heads."""

    padded_vocab_size: int | None = None
    """Rows of the embedding and output matrices; ``None`` pads ``vocab_size`` up to a multiple
    of ``make_vocab_size_divisible_by``. Fixed in the config so a checkpoint loads at any TP."""

    make_vocab_size_divisible_by: int = 128
    """Padding multiple used when ``padded_vocab_size`` is not given."""

    normalization: Normalization = "RMSNorm"
    """Norm before attention, before the MLP and at the end of the decoder."""

    norm_epsilon: float = 1e-5
    """Epsilon of every norm."""

    zero_centered_gamma: bool = False
    """Norm weights stored as ``w - 1`` and applied as ``1 + w`` (Nemotron's LayerNorm1p)."""

    activation: Activation = "silu"
    """MLP activation; with ``gated_linear_unit`` silu gives SwiGLU, gelu gives GeGLU."""

    gated_linear_unit: bool = True
    """Whether ``linear_fc1`` holds ``[gate; up]`` (Llama) or a single projection (GPT-2)."""

    position_embedding_type: PositionEmbedding = "rope"
    """Rotary (Llama) or learned absolute (GPT-2) positions."""

    rotary_base: float = 10000.0
    """RoPE theta."""

    rotary_percent: float = 1.0
    """Fraction of each head's channels that are rotated."""

    rope_scaling_factor: float | None = None
    """Llama-3.1 style RoPE frequency scaling factor (``None``: no scaling)."""

    tie_embeddings: bool = False
    """Whether the output layer reuses the input embedding matrix."""

    add_bias_linear: bool = False
    """Biases on every linear layer (GPT-2 style)."""

    add_qkv_bias: bool = False
    """Bias on the QKV projection only (Qwen style)."""

    max_position_embeddings: int = 4096
    """Longest sequence the model is used with (size of learned position embeddings)."""

    init_method_std: float = 0.02
    """Std of the normal init of freshly built (not imported) weights."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "vocab_size", "max_position_embeddings", "make_vocab_size_divisible_by"):
            _positive(name, getattr(self, name))
        if self.num_query_groups is None:
            object.__setattr__(self, "num_query_groups", self.num_attention_heads)
        _positive("num_query_groups", self.num_query_groups)
        if self.num_attention_heads % self.num_query_groups:
            raise UserError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}: each query group must hold the same "
                f"number of heads; choose heads as a multiple of the groups."
            )
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise UserError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set kv_channels (the head width) explicitly."
                )
            object.__setattr__(self, "kv_channels", self.hidden_size // self.num_attention_heads)
        _positive("kv_channels", self.kv_channels)
        if self.padded_vocab_size is None:
            multiple = self.make_vocab_size_divisible_by
            object.__setattr__(
                self, "padded_vocab_size", math.ceil(self.vocab_size / multiple) * multiple
            )
        _positive("padded_vocab_size", self.padded_vocab_size)
        if self.padded_vocab_size < self.vocab_size:
            raise UserError(
                f"padded_vocab_size={self.padded_vocab_size} is smaller than vocab_size="
                f"{self.vocab_size}; it must be at least the tokenizer's vocabulary."
            )
        for name, value, allowed in (
            ("normalization", self.normalization, _NORMALIZATIONS),
            ("activation", self.activation, _ACTIVATIONS),
            ("position_embedding_type", self.position_embedding_type, _POSITION_EMBEDDINGS),
        ):
            if value not in allowed:
                raise UserError(f"ModelConfig.{name}={value!r} is not one of {allowed}.")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise UserError(f"rotary_percent must be in (0, 1], got {self.rotary_percent}.")

    # ------------------------------------------------------------------ derived sizes
    @property
    def heads_per_group(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_attention_heads // self.num_query_groups

    @property
    def query_projection_size(self) -> int:
        """Output width of all query heads (input width of ``linear_proj``)."""
        return self.num_attention_heads * self.kv_channels

    @property
    def qkv_size(self) -> int:
        """Rows of ``linear_qkv``: queries plus one key and one value per group."""
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.kv_channels

    def layer_parameters(self) -> int:
        """Exact parameter count of one transformer layer."""
        h, f = self.hidden_size, self.ffn_hidden_size
        norm = h * (2 if self.normalization == "LayerNorm" else 1)
        fc1_rows = f * (2 if self.gated_linear_unit else 1)
        qkv_bias = self.add_bias_linear or self.add_qkv_bias
        attention = h * self.qkv_size + self.query_projection_size * h
        attention += self.qkv_size * qkv_bias + h * self.add_bias_linear
        mlp = h * fc1_rows + f * h + (fc1_rows + h) * self.add_bias_linear
        return 2 * norm + attention + mlp

    def num_parameters(self, *, num_layers: int | None = None) -> int:
        """Exact number of parameters of the built ``GPTModel`` (tied weights counted once)."""
        h = self.hidden_size
        layers = self.num_layers if num_layers is None else num_layers
        total = self.padded_vocab_size * h  # word embeddings
        if self.position_embedding_type == "learned_absolute":
            total += self.max_position_embeddings * h
        total += layers * self.layer_parameters()
        total += h * (2 if self.normalization == "LayerNorm" else 1)  # final norm
        if not self.tie_embeddings:
            total += self.padded_vocab_size * h  # output layer
        return total

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (and re-validated)."""
        return dataclasses.replace(self, **changes)

    def check_parallel(self, *, tensor_parallel: int, pipeline_parallel: int = 1) -> None:
        """Raise an actionable ``ValueError`` if the model cannot be split this way."""
        tp = tensor_parallel
        problems = []
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size",
                     "padded_vocab_size"):
            if getattr(self, name) % tp:
                problems.append(f"{name}={getattr(self, name)}")
        if problems:
            raise UserError(
                f"tensor-model-parallel-size {tp} does not divide {', '.join(problems)}; "
                f"choose a TP that divides all of them "
                f"(divisors of the query groups: {_divisors(self.num_query_groups)})."
            )
        if pipeline_parallel > self.num_layers:
            raise UserError(
                f"pipeline-model-parallel-size {pipeline_parallel} exceeds num_layers="
                f"{self.num_layers}; use at most one stage per layer."
            )

    def check_seq_length(self, seq_length: int) -> None:
        """Refuse sequences longer than the positions the model was built for (learned
        positions would index past their table; RoPE would run untrained positions)."""
        if seq_length > self.max_position_embeddings:
            raise UserError(
                f"--seq-length {seq_length} exceeds the model's max_position_embeddings="
                f"{self.max_position_embeddings} (the longest sequence it was built for); use "
                f"--seq-length {self.max_position_embeddings} or less.")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> ModelConfig:
        return cls.from_dict(yaml.safe_load(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Read a YAML config; anything that is not a valid one is a one-line ``UserError``
        naming the file (a checkpoint's config is checksummed: restore it, don't edit it)."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise UserError(f"{path} is not valid YAML ({yaml_problem(err)}); restore the "
                            f"file (a checkpoint's copy is written at save) or fix it.") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} holds a {type(data).__name__}, not a mapping of ModelConfig "
                            f"fields; restore the file or fix it.")
        try:
            return cls.from_dict(data)
        except TypeError as err:  # a required field missing
            raise UserError(f"{path} is not a complete ModelConfig ({err}); restore the file "
                            f"or add the field.") from None
        except UserError as err:
            raise UserError(f"{path}: {err}") from None


def yaml_problem(err: Exception) -> str:
    """One line for a YAML error (PyYAML's own message spans several, with a caret)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or type(err).__name__
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(kw_only=True, frozen=True)
class ParallelConfig:
    """How a run lays the model out on ranks; data parallel is whatever remains of the world."""

    tensor_model_parallel_size: int = 1
    """Ranks that split every weight matrix (heads, neurons, vocabulary)."""

    pipeline_model_parallel_size: int = 1
    """Ranks that split the stack of layers into stages."""

    sequence_parallel: bool = False
    """Shard norms/dropout activations along the sequence over the TP ranks (needs TP > 1)."""

    seed: int = DEFAULT_SEED
    """Seed for Python, NumPy and torch (and Megatron's model-parallel RNG tracker)."""

    timeout_minutes: int = field(default=30)
    """Collective timeout: a hung rank fails the job after this long."""

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "timeout_minutes"):
            _positive(name, getattr(self, name))
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise UserError("sequence parallel needs tensor-model-parallel-size > 1.")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for a world, with an actionable error if TP×PP does not divide it."""
        if world_size % self.model_parallel_size:
            raise UserError(
                f"world size {world_size} is not divisible by tensor-model-parallel-size "
                f"{self.tensor_model_parallel_size} × pipeline-model-parallel-size "
                f"{self.pipeline_model_parallel_size} = {self.model_parallel_size}; launch a "
                f"multiple of {self.model_parallel_size} processes or change TP/PP."
            )
        return world_size // self.model_parallel_size
