"""``check_prune``: every check of a prune that can fail, done once, before any process group is
started or tensor is loaded, and the resulting ``PrunePlan`` (the same on every rank).

Actionable errors for: a checkpoint that does not fit the layout, scores of another model,
targets the model cannot be pruned to, a pruned shape that cannot be built at the layout, and a
``--save`` directory that is the source checkpoint or holds files (without ``overwrite``).
"""

from __future__ import annotations

from pathlib import Path

from minitron_megatron.checkpoint import CheckpointInfo
from minitron_megatron.config import ModelConfig, ParallelConfig
from minitron_megatron.errors import UserError
from minitron_megatron.importance.scores import Scores
from minitron_megatron.importance.stats import default_stats_dir, has_stats
from minitron_megatron.output_paths import check_output_dir, check_replaceable
from minitron_megatron.pruning.plan import PrunePlan, make_plan
from minitron_megatron.pruning.reconstruct import ReconstructConfig, Reconstructor
from minitron_megatron.pruning.targets import PruneTargets, check_layout


def check_same_model(scored: ModelConfig, info: CheckpointInfo) -> None:
    """Scores (and plans made from them) only apply to the model they were computed on."""
    if scored != info.model_config:
        diff = {k: (v, getattr(scored, k)) for k, v in info.model_config.to_dict().items()
                if getattr(scored, k) != v}
        raise UserError(f"the scores were computed on another model (checkpoint vs scores: "
                        f"{diff}); run `minitron importance --load {info.root}` first.")


def saved_stats(scores: str | Path) -> str | None:
    """The Gram statistics ``importance`` saved next to a scores file (``SCORES.stats``), if
    any: what a prune refits from by default."""
    directory = default_stats_dir(scores)
    return str(directory) if has_stats(directory) else None


def check_prune(*, info: CheckpointInfo, scores: Scores, targets: PruneTargets,
                save: str | Path, parallel: ParallelConfig, overwrite: bool = False,
                reconstruct: ReconstructConfig | None = None) -> PrunePlan:
    """Check a prune of checkpoint ``info`` by ``scores`` to ``targets`` at ``parallel``'s
    layout, writing to ``save`` (refitting from ``reconstruct``'s statistics when given);
    returns the plan ``prune_checkpoint`` applies.

    Example::

        info = find_checkpoint("ckpt/teacher")
        plan = check_prune(info=info, scores=Scores.load("scores.safetensors"),
                           targets=PruneTargets(ffn_hidden_size=960), save="ckpt/pruned",
                           parallel=ParallelConfig())
    """
    layout = dict(tensor_parallel=parallel.tensor_model_parallel_size,
                  pipeline_parallel=parallel.pipeline_model_parallel_size)
    info.model_config.check_parallel(**layout)
    check_same_model(scores.model_config, info)
    plan = make_plan(scores, targets)
    if reconstruct is not None:
        Reconstructor(reconstruct).check(plan.source)
    check_layout(plan.target, **layout)
    save = Path(save)
    check_output_dir(save, "--save")
    if save.resolve() in (Path(info.root).resolve(), Path(info.path).resolve()):
        raise UserError(f"--save {save} is the checkpoint being pruned; write the pruned model "
                        f"to a new directory.")
    check_replaceable(save, "--save", overwrite=overwrite)
    return plan
