"""Structured pruning of a Megatron-Core GPT by importance scores (Minitron, arXiv 2407.14679
§2.3): neurons, heads, query groups, embedding channels and layers, at any TP × PP.

Example::

    plan = make_plan(Scores.load("scores.safetensors"),
                     PruneTargets(ffn_hidden_size=960, hidden_size=384,
                                  num_attention_heads=6, num_query_groups=3))
    pruned, cfg = apply_plan(model, plan, ps)          # this rank's stage, pruned
    save_checkpoint("ckpt/pruned", model=pruned, model_config=cfg)   # loads at any TP/PP
"""

from minitron_megatron.pruning.apply import apply_plan, prune_checkpoint
from minitron_megatron.pruning.plan import LayerPlan, PrunePlan, make_plan
from minitron_megatron.pruning.targets import PruneTargets

__all__ = ["LayerPlan", "PrunePlan", "PruneTargets", "apply_plan", "make_plan",
           "prune_checkpoint"]
