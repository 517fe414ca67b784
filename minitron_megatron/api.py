"""The one-call Python API: each stage of the pipeline as one function over checkpoint paths and
typed configs, the same functions the ``minitron`` CLI calls.

Checkpoints are given as paths (a checkpoint root or one ``iter_*`` directory) or as the
``CheckpointInfo`` of ``checkpoint.find_checkpoint``. Every function checks all of its inputs
first (one ``UserError`` naming the problem, before any process group, dataset or model exists),
then starts the process groups for ``parallel`` the way the CLI does, runs, shuts them down and
returns its result. Launch the script as the CLI: plain ``python`` for one process, ``torchrun
--nproc-per-node N`` (or SLURM's ``srun``) for several; every rank calls the same functions with
the same arguments.

Example::

    from minitron_megatron import estimate_importance, prune, distill, evaluate
    from minitron_megatron.data.loaders import DataConfig
    from minitron_megatron.distill.config import KDConfig, TrainConfig
    from minitron_megatron.distill.teacher_cache import TeacherCacheConfig
    from minitron_megatron.evaluate import EvalConfig
    from minitron_megatron.importance.config import CalibrationConfig
    from minitron_megatron.pruning import PruneTargets

    data = DataConfig(data_path="data/wiki_text_document", seq_length=4096)
    estimate_importance(load="ckpt/teacher", data=data, save_scores="scores.safetensors",
                        calibration=CalibrationConfig(num_samples=1024))
    prune(load="ckpt/teacher", scores="scores.safetensors", save="ckpt/pruned",
          targets=PruneTargets(ffn_hidden_size=9216, hidden_size=3072))
    distill(teacher="ckpt/teacher", student="ckpt/pruned", data=data, kd=KDConfig(),
            train=TrainConfig(save="runs/distill", train_iters=1000, global_batch_size=256))
    print(evaluate(load="runs/distill", data=data, config=EvalConfig(num_samples=512)).ppl)

Here ``estimate_importance`` is the whole importance stage of a checkpoint (load, calibrate,
aggregate, optionally save); ``minitron_megatron.importance.estimate_importance`` is the
lower-level pass over a model already built on an existing ``ParallelState``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from minitron_megatron.config import ParallelConfig
from minitron_megatron.errors import MissingInputError, UserError
from minitron_megatron.runtime.distributed import LaunchEnv, ParallelState, distributed

if TYPE_CHECKING:  # the heavy modules load on first call
    from minitron_megatron.checkpoint import CheckpointInfo
    from minitron_megatron.data.loaders import DataConfig
    from minitron_megatron.distill.config import KDConfig, TrainConfig
    from minitron_megatron.distill.teacher_cache import TeacherCacheConfig
    from minitron_megatron.distill.training import RunResult
    from minitron_megatron.evaluate import EvalConfig, EvalResult
    from minitron_megatron.importance import ImportanceConfig, Scores
    from minitron_megatron.importance.config import CalibrationConfig
    from minitron_megatron.pruning import PrunePlan, PruneTargets
    from minitron_megatron.pruning.reconstruct import ReconstructConfig
    from minitron_megatron.search import SearchConfig, SearchResults, SearchSpace

    Checkpoint = str | Path | CheckpointInfo

__all__ = ["PruneResult", "distill", "estimate_importance", "evaluate", "prune", "search",
           "teacher_cache"]


def launch_env() -> LaunchEnv:
    """The launcher's ranks (torchrun's or SLURM's variables, else one process): read here, at
    the API's edge, and passed down; no other library code reads the environment."""
    return LaunchEnv.from_environ(os.environ)


def default_params_dtype() -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (training's ``params_dtype=None``)."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


@contextlib.contextmanager
def run_distributed(parallel: ParallelConfig,
                    launch: LaunchEnv | None = None) -> Iterator[ParallelState]:
    """Start the process groups of ``parallel`` (logging on rank 0 only) and shut them down."""
    env = launch if launch is not None else launch_env()
    parallel.data_parallel_size(env.world_size)  # fail before any work
    if env.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    with distributed(env, parallel) as ps:
        yield ps


def _checkpoint(load):
    """A checkpoint path (root or ``iter_*`` directory), or a ``CheckpointInfo`` already found."""
    from minitron_megatron.checkpoint import CheckpointInfo, find_checkpoint

    return load if isinstance(load, CheckpointInfo) else find_checkpoint(load)


def _check_inputs(info, parallel: ParallelConfig, seq_length: int) -> None:
    info.model_config.check_parallel(tensor_parallel=parallel.tensor_model_parallel_size,
                                     pipeline_parallel=parallel.pipeline_model_parallel_size)
    info.model_config.check_seq_length(seq_length)


def estimate_importance(*, load: Checkpoint, data: DataConfig, calibration: CalibrationConfig,
                        config: ImportanceConfig | None = None,
                        parallel: ParallelConfig | None = None,
                        params_dtype: torch.dtype = torch.float32,
                        save_scores: str | Path | None = None,
                        save_stats: str | Path | Literal["auto"] | None = "auto",
                        launch: LaunchEnv | None = None) -> Scores:
    """Importance scores of checkpoint ``load`` on calibration samples of ``data`` (a
    ``DataConfig``), at ``parallel``'s TP × PP (× DP) layout; saved to ``save_scores`` (a
    ``.safetensors`` file, by rank 0) when given. Returns the layout-free ``Scores``.

    The same pass gathers the Gram statistics ``prune`` refits the pruned layers from, written
    to ``save_stats`` (``"auto"``: next to ``save_scores``, ``SCORES.stats``, where ``prune``
    finds them; ``None`` or no ``save_scores``: not gathered, the paper's pass).

    ``calibration`` is a ``CalibrationConfig``, ``config`` an ``ImportanceConfig`` (default: the
    paper's best aggregation). The lower-level ``importance.estimate_importance`` scores a model
    already built on a ``ParallelState``.

    Example::

        scores = estimate_importance(
            load="ckpt/teacher", data=DataConfig(data_path="data/wiki", seq_length=4096),
            calibration=CalibrationConfig(num_samples=1024, micro_batch_size=4),
            config=ImportanceConfig(depth_metrics=("bi", "loss")),
            parallel=ParallelConfig(tensor_model_parallel_size=2),
            save_scores="scores.safetensors")
        scores.heads  # [layers, heads]
    """
    from minitron_megatron.importance import ImportanceConfig, importance_checkpoint
    from minitron_megatron.importance.stats import default_stats_dir

    parallel = parallel or ParallelConfig()
    config = config or ImportanceConfig()
    info = _checkpoint(load)
    config.check_model(info.model_config.num_layers)
    if save_scores is not None:
        out = Path(save_scores)
        if out.is_dir() or not out.parent.is_dir():
            raise UserError(f"--save-scores {out} must be a file in an existing directory.")
    if save_stats == "auto":
        save_stats = None if save_scores is None else default_stats_dir(save_scores)
    _check_inputs(info, parallel, data.seq_length)
    with run_distributed(parallel, launch) as ps:
        scores = importance_checkpoint(info, ps, data, num_samples=calibration.num_samples,
                                       micro_batch_size=calibration.micro_batch_size,
                                       config=config, params_dtype=params_dtype,
                                       stats_dir=save_stats)
        if save_scores is not None and ps.rank == 0:
            scores.save(save_scores)
    return scores


@dataclass(frozen=True)
class PruneResult:
    """What ``prune`` wrote."""

    path: Path
    """Iteration directory of the pruned checkpoint."""

    plan: PrunePlan
    """The ``PrunePlan`` applied (kept units per axis; its ``target`` is the new shape)."""


def prune(*, load: Checkpoint, scores: Scores | str | Path, targets: PruneTargets,
          save: str | Path, reconstruct: ReconstructConfig | Literal["auto"] | None = "auto",
          parallel: ParallelConfig | None = None, params_dtype: torch.dtype = torch.float32,
          overwrite: bool = False, launch: LaunchEnv | None = None) -> PruneResult:
    """Prune checkpoint ``load`` by ``scores`` (a ``Scores`` or its file) to ``targets`` (a
    ``PruneTargets``) and save it at its new shape in ``save`` (new or empty unless
    ``overwrite``). The layers reading pruned units are refit by least squares from
    ``reconstruct``'s statistics (a ``ReconstructConfig``); ``"auto"``: from the statistics
    ``estimate_importance`` saved next to the scores file when there are any; ``None``: sliced,
    as the paper. Every check runs once first (``pruning.preflight.check_prune``).

    Example::

        result = prune(load="ckpt/teacher", scores="scores.safetensors", save="ckpt/pruned",
                       targets=PruneTargets(ffn_hidden_size=9216, num_layers=28))
        result.plan.target.num_parameters()
    """
    from minitron_megatron.importance import Scores
    from minitron_megatron.pruning import prune_checkpoint
    from minitron_megatron.pruning.preflight import check_prune, saved_stats
    from minitron_megatron.pruning.reconstruct import ReconstructConfig

    parallel = parallel or ParallelConfig()
    if reconstruct == "auto":
        stats = None if isinstance(scores, Scores) else saved_stats(scores)
        reconstruct = ReconstructConfig(stats=stats) if stats else None
    info = _checkpoint(load)
    if not isinstance(scores, Scores):
        scores = Scores.load(scores)
    plan = check_prune(info=info, scores=scores, targets=targets, save=save, parallel=parallel,
                       overwrite=overwrite, reconstruct=reconstruct)
    with run_distributed(parallel, launch) as ps:
        path = prune_checkpoint(info, plan, save, ps, params_dtype=params_dtype,
                                reconstruct=reconstruct)
    return PruneResult(path=path, plan=plan)


def distill(*, student: Checkpoint, train: TrainConfig, data: DataConfig,
            teacher: Checkpoint | None = None, kd: KDConfig | None = None,
            parallel: ParallelConfig | None = None, params_dtype: torch.dtype | None = None,
            launch: LaunchEnv | None = None,
            teacher_cache: str | Path | None = None) -> RunResult:
    """Distill checkpoint ``student`` from the frozen ``teacher`` with the ``kd`` objective (a
    ``KDConfig``; default: forward KL, τ = 1) and the ``train`` schedule (a ``TrainConfig``:
    run directory, steps, batch, optimizer); with ``teacher=None`` (and no ``kd``) fine-tune
    with cross entropy instead. ``params_dtype=None``: bf16 on GPU, fp32 on CPU. Resumes from
    ``train.load``. Returns the ``RunResult`` (final state, per-step history, and whether a
    signal stopped it after saving). ``teacher_cache`` (a directory ``teacher_cache`` wrote)
    stands in for ``teacher``: the KD loss reads the teacher's cached top-k logits and no
    teacher model is built.

    Example::

        result = distill(teacher="ckpt/teacher", student="ckpt/pruned",
                         train=TrainConfig(save="runs/kd", train_iters=1000,
                                           global_batch_size=256, lr=1e-4, eval_interval=100),
                         kd=KDConfig(temperature=1.0),
                         data=DataConfig(data_path="data/wiki", seq_length=4096))
        [h["val_loss"] for h in result.history if "val_loss" in h]
    """
    from minitron_megatron.distill.config import KDConfig
    from minitron_megatron.distill.preflight import check_run
    from minitron_megatron.distill.teacher_cache import TeacherCache
    from minitron_megatron.distill.training import Trainer

    if teacher is not None and teacher_cache is not None:
        raise UserError("pass either --teacher or --teacher-cache, not both (the cache stands "
                        "in for the teacher).")
    if teacher is None and teacher_cache is None and kd is not None:
        raise UserError("a KD objective needs a teacher; pass teacher=..., or kd=None to "
                        "fine-tune with cross entropy.")
    if (teacher is not None or teacher_cache is not None) and kd is None:
        kd = KDConfig()
    cache = TeacherCache(teacher_cache) if teacher_cache is not None else None
    parallel = parallel or ParallelConfig()
    params_dtype = params_dtype or default_params_dtype()
    launch = launch if launch is not None else launch_env()
    student_info = _checkpoint(student)
    teacher_info = _checkpoint(teacher) if teacher is not None else None
    check_run(student=student_info, teacher=teacher_info, kd=kd, train=train, parallel=parallel,
              world_size=launch.world_size, params_dtype=params_dtype,
              seq_length=data.seq_length, teacher_cache=cache, data=data)
    with run_distributed(parallel, launch) as ps:
        return Trainer(train=train, kd=kd, data=data, student=student_info,
                       teacher=teacher_info, ps=ps, params_dtype=params_dtype,
                       seed=parallel.seed, teacher_cache=cache).run()


def teacher_cache(*, load: Checkpoint, data: DataConfig, num_samples: int, save: str | Path,
                  config: TeacherCacheConfig | None = None, micro_batch_size: int = 1,
                  overwrite: bool = False, parallel: ParallelConfig | None = None,
                  params_dtype: torch.dtype | None = None,
                  launch: LaunchEnv | None = None) -> Path:
    """Run teacher checkpoint ``load`` once over training samples ``0..num_samples−1`` of
    ``data`` (a distillation's ``train_iters × global_batch_size``, in its data order) and write
    their top-k logits to ``save`` (``config``: a ``TeacherCacheConfig``, k = 64 fp16 by
    default), at ``parallel``'s TP × PP × DP. Resumes a cache left incomplete in ``save``.
    ``distill(teacher_cache=save, ...)`` and ``search(teacher_cache=save, ...)`` then read it
    instead of running the teacher. Returns ``save``.

    Example::

        teacher_cache(load="ckpt/teacher", save="runs/teacher-cache", num_samples=400 * 256,
                      data=DataConfig(data_path="data/wiki", seq_length=4096),
                      config=TeacherCacheConfig(top_k=64), micro_batch_size=4)
    """
    from minitron_megatron.distill.teacher_cache import TeacherCacheConfig
    from minitron_megatron.distill.teacher_cache_write import (
        check_teacher_cache,
        write_teacher_cache,
    )

    config = config or TeacherCacheConfig()
    parallel = parallel or ParallelConfig()
    info = _checkpoint(load)
    check_teacher_cache(teacher=info, data=data, num_samples=num_samples, config=config,
                        save=save, overwrite=overwrite, parallel=parallel)
    with run_distributed(parallel, launch) as ps:
        return write_teacher_cache(info, ps, data, num_samples=num_samples,
                                   micro_batch_size=micro_batch_size, config=config, save=save,
                                   overwrite=overwrite,
                                   params_dtype=params_dtype or default_params_dtype())


def search(*, load: Checkpoint, scores: Scores | str | Path, config: SearchConfig,
           train: TrainConfig, data: DataConfig, kd: KDConfig | None = None,
           space: SearchSpace | str | Path | None = None, parallel: ParallelConfig | None = None,
           params_dtype: torch.dtype | None = None, launch: LaunchEnv | None = None,
           teacher_cache: str | Path | None = None,
           cache_teacher: TeacherCacheConfig | None = None) -> SearchResults:
    """Architecture search from teacher checkpoint ``load``: every shape of ``space`` (a
    ``SearchSpace``, its YAML file, or ``None`` for the default choices per axis) within
    ``config``'s parameter budget (a ``SearchConfig``) is pruned by ``scores``, distilled for
    ``train.train_iters`` steps (``train`` a ``TrainConfig``, ``kd`` a ``KDConfig``) and ranked
    by its held-out loss. Resumes a search in ``config.save``. Returns the ``SearchResults``
    (also written to ``search_results.{json,md}``); a SIGTERM/SIGINT raises ``RunInterrupted``
    after saving. With ``teacher_cache`` (the teacher's top-k written by ``teacher_cache`` for
    the same training samples) every candidate distills from it instead of running the
    teacher. With ``cache_teacher`` (a ``TeacherCacheConfig``) the search builds that cache
    itself, once, with the teacher it loads for the zero-shot losses (in
    ``config.save/teacher_cache``, removed at the end unless ``config.keep_all``).

    Example::

        results = search(load="ckpt/teacher", scores="scores.safetensors",
                         config=SearchConfig(save="runs/search", target_params=70_000_000),
                         train=TrainConfig(save="runs/search", train_iters=400,
                                           global_batch_size=256, eval_iters=4),
                         data=DataConfig(data_path="data/wiki", seq_length=4096))
        results.best().name
    """
    from minitron_megatron.distill.config import KDConfig
    from minitron_megatron.distill.teacher_cache import TeacherCache
    from minitron_megatron.importance import Scores
    from minitron_megatron.search import SearchSpace, prepare_search, run_search
    from minitron_megatron.search.preflight import CACHE_TWICE

    if cache_teacher is not None and teacher_cache is not None:
        raise UserError(CACHE_TWICE)
    parallel = parallel or ParallelConfig()
    params_dtype = params_dtype or default_params_dtype()
    launch = launch if launch is not None else launch_env()
    teacher = _checkpoint(load)
    if not isinstance(scores, Scores):
        scores = Scores.load(scores)
    if not isinstance(space, SearchSpace):
        default = SearchSpace.default(teacher.model_config,
                                      tensor_parallel=parallel.tensor_model_parallel_size)
        if space is not None and not Path(space).is_file():
            raise MissingInputError(f"--search-space {space} does not exist; pass a YAML file of "
                                    f"choices per axis.")
        space = default if space is None else SearchSpace.from_yaml(space, default)
    plan = prepare_search(teacher=teacher, scores=scores, space=space, search=config,
                          train=train, kd=kd or KDConfig(), data=data, parallel=parallel,
                          world_size=launch.world_size, params_dtype=params_dtype,
                          seed=parallel.seed,
                          teacher_cache=TeacherCache(teacher_cache) if teacher_cache else None,
                          cache_teacher=cache_teacher)
    with run_distributed(parallel, launch) as ps:
        return run_search(plan, ps, params_dtype=params_dtype, seed=parallel.seed)


def evaluate(*, load: Checkpoint, data: DataConfig, config: EvalConfig,
             parallel: ParallelConfig | None = None, params_dtype: torch.dtype = torch.float32,
             launch: LaunchEnv | None = None) -> EvalResult:
    """Validation loss and perplexity of checkpoint ``load`` on ``config.num_samples`` samples of
    ``data``'s validation split (``config`` an ``EvalConfig``). Returns the ``EvalResult``.

    Example::

        result = evaluate(load="ckpt/pruned", config=EvalConfig(num_samples=512),
                          data=DataConfig(data_path="data/wiki", seq_length=4096))
        result.loss, result.ppl
    """
    from minitron_megatron.evaluate import evaluate_checkpoint

    parallel = parallel or ParallelConfig()
    info = _checkpoint(load)
    _check_inputs(info, parallel, data.seq_length)
    with run_distributed(parallel, launch) as ps:
        return evaluate_checkpoint(info, ps, data, num_samples=config.num_samples,
                                   micro_batch_size=config.micro_batch_size,
                                   params_dtype=params_dtype, window_starts=config.window_starts)
