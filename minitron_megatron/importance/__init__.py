"""Activation-based importance of neurons, heads, query groups, embedding channels and layers
(Minitron, arXiv 2407.14679 §2.2), at any TP × PP × DP layout.

Example::

    scores = estimate_importance(model, ps, dataset, model_config=cfg, num_samples=1024,
                                 micro_batch_size=4, seq_length=4096)
    scores.save("scores.safetensors")          # global, layout-free
    Scores.load("scores.safetensors").heads    # [layers, heads]
"""

from minitron_megatron.importance.config import ImportanceConfig
from minitron_megatron.importance.estimate import estimate_importance, importance_checkpoint
from minitron_megatron.importance.scores import Scores

__all__ = ["ImportanceConfig", "Scores", "estimate_importance", "importance_checkpoint"]
