"""``PruneTargets``: the shape a model is pruned to, checked against the source before any work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from minitron_megatron.config import ModelConfig
from minitron_megatron.errors import UserError

DepthMethod = Literal["bi", "loss", "block"]
DEPTH_METHODS = get_args(DepthMethod)

_AXES = {  # target field → (ModelConfig field, CLI flag)
    "ffn_hidden_size": ("ffn_hidden_size", "--target-ffn-hidden-size"),
    "hidden_size": ("hidden_size", "--target-hidden-size"),
    "num_attention_heads": ("num_attention_heads", "--target-num-attention-heads"),
    "num_query_groups": ("num_query_groups", "--target-num-query-groups"),
    "num_layers": ("num_layers", "--target-num-layers"),
}
TARGET_FLAGS = {name: flag for name, (_, flag) in _AXES.items()}


@dataclass(kw_only=True, frozen=True)
class PruneTargets:
    """What to keep; ``None`` keeps an axis whole."""

    ffn_hidden_size: int | None = None
    """MLP neurons kept in every layer (top-k of each layer's neuron scores)."""

    hidden_size: int | None = None
    """Embedding channels kept (top-k of the channel scores summed over all layers)."""

    num_attention_heads: int | None = None
    """Query heads kept per layer; a multiple of the kept query groups."""

    num_query_groups: int | None = None
    """Query groups (key/value heads) kept per layer. Unset: kept whole, except for multi-head
    attention (one head per group), where it follows ``num_attention_heads``."""

    num_layers: int | None = None
    """Layers kept; which ones are dropped is decided by ``depth_method``."""

    depth_method: DepthMethod = "bi"
    """Drop the layers with the lowest block importance (``bi``), the lowest loss increase
    (``loss``), or the contiguous block whose removal raises the loss least (``block``)."""

    drop_layers: tuple[int, ...] | None = None
    """Explicit 0-based layer indices to drop (instead of ``depth_method``), e.g. 20,21,22."""

    head_residual: bool = False
    """Fold pruned query heads into kept ones (paper §2.3, see ``pruning.slicing``)."""

    position0_fold: bool = True
    """Add each pruned query head's ``linear_proj`` columns to the kept heads of its query group
    (1/k each, k kept heads): at position 0 every head of a group outputs the same value vector,
    so the attention output there — which the massive activations and the attention sink are
    built from — stays exactly the teacher's whatever the first token (see ``pruning.slicing``).
    ``False``: the paper's plain slicing."""

    def __post_init__(self) -> None:
        for name, (_, flag) in _AXES.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise UserError(f"{flag} {value} must be a positive integer (pruning an axis "
                                f"to zero would remove it entirely).")
        if self.depth_method not in DEPTH_METHODS:
            raise UserError(f"--depth-method {self.depth_method!r} is not one of "
                            f"{', '.join(DEPTH_METHODS)}.")
        if self.drop_layers is not None:
            drop = tuple(self.drop_layers)
            object.__setattr__(self, "drop_layers", drop)
            if len(set(drop)) != len(drop):
                raise UserError(f"--drop-layers {','.join(map(str, drop))} names a layer twice.")

    def target_config(self, source: ModelConfig) -> ModelConfig:
        """The pruned model's config, or an actionable ``ValueError``."""
        for name, (field, flag) in _AXES.items():
            value, current = getattr(self, name), getattr(source, field)
            if value is not None and value > current:
                raise UserError(f"{flag} {value} is larger than the model's {field}={current}; "
                                f"pruning only removes units: choose at most {current}.")
        layers = source.num_layers
        if self.drop_layers is not None:
            outside = [i for i in self.drop_layers if not 0 <= i < layers]
            if outside:
                raise UserError(f"--drop-layers {outside} outside 0..{layers - 1} (the model has "
                                f"{layers} layers); use 0-based layer indices.")
            kept = layers - len(self.drop_layers)
            if kept == 0:
                raise UserError("--drop-layers removes every layer; keep at least one.")
            if self.num_layers is not None and self.num_layers != kept:
                raise UserError(f"--drop-layers keeps {kept} layers but --target-num-layers is "
                                f"{self.num_layers}; give one of the two.")
            layers = kept
        elif self.num_layers is not None:
            layers = self.num_layers

        heads, groups = self.num_attention_heads, self.num_query_groups
        per_group = source.heads_per_group
        if groups is None:
            groups = heads if heads is not None and per_group == 1 else source.num_query_groups
        if heads is None:
            heads = groups * per_group
        if heads % groups:
            raise UserError(
                f"--target-num-attention-heads {heads} is not a multiple of the query groups "
                f"({groups}): every group keeps the same number of heads; choose heads = k × "
                f"{groups} or set --target-num-query-groups to a divisor of {heads}.")
        if heads // groups > per_group:
            raise UserError(
                f"{heads} heads in {groups} query groups would need {heads // groups} heads per "
                f"group, but each group has {per_group}; keep at least {-(-heads // per_group)} "
                f"query groups or fewer heads.")
        return source.replace(
            num_layers=layers,
            hidden_size=self.hidden_size or source.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size or source.ffn_hidden_size,
            num_attention_heads=heads,
            num_query_groups=groups,
            kv_channels=source.kv_channels,  # heads keep their width
        )


def check_layout(target: ModelConfig, *, tensor_parallel: int, pipeline_parallel: int) -> None:
    """The pruned model must be buildable at the layout that prunes it."""
    try:
        target.check_parallel(tensor_parallel=tensor_parallel,
                              pipeline_parallel=pipeline_parallel)
    except UserError as err:
        raise UserError(f"the pruned shape cannot be built at this layout: {err} Choose targets "
                        f"divisible by the TP size, or prune at a smaller TP (the pruned "
                        f"checkpoint loads at any layout).") from None
