"""``Scores``: importance of every prunable unit, global and independent of the layout.

Saved as one safetensors file: the tensors below plus JSON metadata (format version, the source
``ModelConfig``, the ``ImportanceConfig`` used, sample and token counts, the calibration loss).
Layer indices are global, vectors are full length (gathered over TP), so scores computed at one
TP × PP × DP layout prune a checkpoint at any other.

Tensors (``L`` layers, ``F`` ffn, ``H`` heads, ``G`` query groups, ``h`` hidden)::

    ffn            [L, F]     neuron scores per layer
    heads          [L, H]     query-head scores per layer
    query_groups   [L, G]     query-group scores per layer
    hidden_norms   [L, 2, h]  embedding-channel scores of each layer's two norms
    depth.bi       [L]        1 − E[cos(x_in, x_out)]
    depth.loss     [L]        LM-loss increase when layer l is skipped
    depth.block:K  [L−K+1]    LM-loss increase when layers j..j+K−1 are skipped
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minitron_megatron.config import ModelConfig
from minitron_megatron.errors import MissingInputError, UserError
from minitron_megatron.importance.config import ImportanceConfig

FORMAT = "minitron-importance/1"
_AXES = ("ffn", "heads", "query_groups", "hidden_norms")


@dataclass(frozen=True)
class Scores:
    """Importance scores of one model (see the module docstring for the tensors' meaning)."""

    model_config: ModelConfig
    """Architecture of the model the scores were computed on."""

    settings: ImportanceConfig
    """Aggregations, MLP hook and depth metrics used."""

    ffn: torch.Tensor
    heads: torch.Tensor
    query_groups: torch.Tensor
    hidden_norms: torch.Tensor
    depth: dict[str, torch.Tensor] = field(default_factory=dict)
    """Layer metrics by name (``bi``, ``loss``, ``block:K``); higher = more important."""

    num_samples: int = 0
    """Calibration samples (over all data-parallel ranks)."""

    num_tokens: int = 0
    calibration_loss: float | None = None
    """LM loss of the unpruned model on the calibration samples (``loss`` metrics add to it)."""

    def __post_init__(self) -> None:
        cfg = self.model_config
        shapes = {"ffn": (cfg.num_layers, cfg.ffn_hidden_size),
                  "heads": (cfg.num_layers, cfg.num_attention_heads),
                  "query_groups": (cfg.num_layers, cfg.num_query_groups),
                  "hidden_norms": (cfg.num_layers, 2, cfg.hidden_size)}
        for name, shape in shapes.items():
            if tuple(getattr(self, name).shape) != shape:
                raise UserError(f"scores {name} has shape {tuple(getattr(self, name).shape)}, "
                                f"expected {shape} for the model config it names.")

    @property
    def hidden(self) -> torch.Tensor:
        """Embedding-channel scores ``[h]``: both norms of every layer, summed (paper §2.2)."""
        return self.hidden_norms.sum(dim=(0, 1))  # [L, 2, h] → [h]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {name: getattr(self, name) for name in _AXES}
        out.update({f"depth.{name}": value for name, value in self.depth.items()})
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

    def save(self, path: str | Path) -> Path:
        """Write the scores file (atomically: a temporary file renamed into place)."""
        from safetensors.torch import save_file

        path = Path(path)
        metadata = {
            "format": FORMAT,
            "model_config": json.dumps(self.model_config.to_dict()),
            "settings": json.dumps(self.settings.to_dict()),
            "num_samples": str(self.num_samples),
            "num_tokens": str(self.num_tokens),
            "calibration_loss": json.dumps(self.calibration_loss),
        }
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(self.tensors(), str(tmp), metadata=metadata)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        """Read a scores file, with an actionable error for anything that is not one."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"scores file {path} does not exist; create it with "
                                    f"`minitron importance --load CKPT ... --save-scores {path}`.")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"{path} is not a scores file ({err}); recreate it with "
                            f"`minitron importance`.") from None
        if meta.get("format") != FORMAT:
            raise UserError(f"{path} is not a {FORMAT} scores file (format "
                            f"{meta.get('format')!r}); recreate it with `minitron importance`.")
        return cls(
            model_config=ModelConfig.from_dict(json.loads(meta["model_config"])),
            settings=ImportanceConfig.from_dict(json.loads(meta["settings"])),
            **{name: tensors[name] for name in _AXES},
            depth={k[len("depth."):]: v for k, v in tensors.items() if k.startswith("depth.")},
            num_samples=int(meta["num_samples"]),
            num_tokens=int(meta["num_tokens"]),
            calibration_loss=json.loads(meta["calibration_loss"]),
        )
