"""``prepare_search``: every check of an architecture search that can fail, done before any
process group, dataset or model exists, and the resulting ``SearchPlan`` (the same on every rank).

Actionable errors for: scores of another model, a teacher that does not fit the layout, a budget
no candidate meets (with the nearest feasible sizes), a search space that contradicts TP,
shallower candidates whose depth metric is not in the scores, distillation settings that cannot
run (batch sizes, vocabulary, KD options), and a search directory that holds another search.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minitron_megatron.checkpoint import CheckpointInfo
from minitron_megatron.config import DEFAULT_SEED, ParallelConfig
from minitron_megatron.data.loaders import DataConfig
from minitron_megatron.distill.config import KDConfig, TrainConfig
from minitron_megatron.distill.preflight import check_cache_objective, check_run
from minitron_megatron.distill.teacher_cache import TeacherCache, TeacherCacheConfig
from minitron_megatron.distill.teacher_cache_write import check_teacher_cache
from minitron_megatron.errors import UserError
from minitron_megatron.importance import Scores
from minitron_megatron.output_paths import check_output_dir
from minitron_megatron.pruning import PrunePlan, PruneTargets, make_plan
from minitron_megatron.pruning.preflight import check_same_model
from minitron_megatron.search.config import RESULTS_JSON, TEACHER_CACHE_DIR, SearchConfig
from minitron_megatron.search.results import SearchResults
from minitron_megatron.search.space import AXES, Candidate, SearchSpace, enumerate_candidates

_UNSCORED_TRAIN_FIELDS = ("save", "load", "save_interval", "log_interval", "exit_interval",
                          "eval_interval", "wandb_project", "wandb_run_name",
                          "exit_signal_handler", "override_opt_param_scheduler",
                          "use_checkpoint_opt_param_scheduler")
"""Training fields that do not change any number of the search (may differ on resume)."""


@dataclass(frozen=True)
class SearchPlan:
    """A checked search: the candidates, their prune plans and the run settings."""

    teacher: CheckpointInfo
    candidates: tuple[Candidate, ...]
    """Closest to the parameter target first."""

    plans: dict[str, PrunePlan]
    """Prune plan of each candidate, by name."""

    search: SearchConfig
    train: TrainConfig
    """Distillation of each candidate (``save``/``load`` are set per candidate)."""

    kd: KDConfig
    data: DataConfig
    results: SearchResults
    """What a previous run of this search recorded (or an empty record)."""

    teacher_cache: TeacherCache | None = None
    """The teacher's cached top-k logits, read by every candidate's distillation instead of
    running the teacher (``None``: the teacher runs)."""

    cache_teacher: TeacherCacheConfig | None = None
    """Build the teacher cache in ``cache_dir`` with the teacher loaded for the zero-shot
    losses, then read it as ``teacher_cache`` (``--cache-teacher``)."""

    @property
    def cache_dir(self) -> Path:
        return self.search.save / TEACHER_CACHE_DIR

    @property
    def train_samples(self) -> int:
        """Training samples of each candidate's distillation (the same ones for all)."""
        return self.train.train_iters * self.train.global_batch_size

    @property
    def eval_samples(self) -> int:
        """Held-out samples every loss of the search is measured on."""
        return self.train.eval_iters * self.train.global_batch_size


CACHE_TWICE = ("--cache-teacher builds the teacher cache this search reads; pass it or "
               "--teacher-cache DIR, not both.")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def scores_digest(scores: Scores) -> str:
    """Identity of a scores file's contents (tensors and the model they were computed on)."""
    digest = hashlib.sha256(json.dumps(scores.model_config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(scores.tensors().items()):
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def search_settings(*, teacher: CheckpointInfo, scores: Scores, space: SearchSpace,
                    search: SearchConfig, train: TrainConfig, kd: KDConfig, data: DataConfig,
                    params_dtype: torch.dtype, seed: int,
                    teacher_cache: TeacherCache | None = None,
                    cache_teacher: TeacherCacheConfig | None = None) -> dict[str, Any]:
    """Everything that decides the search's numbers; a resumed search must match it (a cache
    the search builds gives the numbers of the same cache read from a directory)."""
    cached = ((teacher_cache.top_k, teacher_cache.manifest["dtype"]) if teacher_cache
              else (cache_teacher.top_k, cache_teacher.dtype) if cache_teacher else None)
    if cached is not None:  # the cached top-k is the KD objective's teacher
        kd = dataclasses.replace(kd, top_k=kd.top_k or cached[0])
    train_fields = {k: v for k, v in dataclasses.asdict(train).items()
                    if k not in _UNSCORED_TRAIN_FIELDS}
    data_fields = {k: v for k, v in dataclasses.asdict(data).items() if k != "cache_path"}
    return _jsonable({
        "teacher_config": teacher.model_config.to_dict(), "scores": scores_digest(scores),
        "search": {"target_params": search.target_params,
                   "params_tolerance": search.params_tolerance, "top_k": search.top_k,
                   "depth_method": search.depth_method},
        "space": {axis: list(getattr(space, axis)) for axis in AXES},
        "train": train_fields, "kd": dataclasses.asdict(kd), "data": data_fields,
        "params_dtype": str(params_dtype).removeprefix("torch."), "seed": seed,
        **({"teacher_cache_dtype": cached[1]} if cached is not None else {})})


def _plan(scores: Scores, candidate: Candidate, depth_method: str) -> PrunePlan:
    shape = candidate.shape()
    try:
        return make_plan(scores, PruneTargets(**shape, depth_method=depth_method))
    except UserError as err:
        layers = scores.model_config.num_layers
        hint = (f", or restrict the search space's num_layers to [{layers}]"
                if shape["num_layers"] < layers else "")
        raise UserError(f"candidate {candidate.name} drops {layers - shape['num_layers']} of "
                        f"{layers} layers by --depth-method {depth_method}, but "
                        f"{str(err).rstrip('.')}{hint}.") from None


def _differences(ours: dict[str, Any], theirs: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(ours.keys() | theirs.keys()):
        a, b = ours.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {b} → {a}")
    return out


def _without_top_k(settings: dict[str, Any]) -> dict[str, Any]:
    return {**settings, "search": {k: v for k, v in settings["search"].items() if k != "top_k"}}


def _previous(search: SearchConfig, settings: dict[str, Any], candidates: list[Candidate],
              tensor_parallel: int, pipeline_parallel: int) -> SearchResults | None:
    directory = search.save
    check_output_dir(directory, "--save")
    previous = SearchResults.load(directory)
    if previous is None:
        if directory.is_dir() and any(directory.iterdir()):
            raise UserError(f"--save {directory} is not empty and holds no {RESULTS_JSON}; "
                            f"choose a new or empty directory for the search.")
        return None
    # --top-k may change on resume (the recorded losses stay valid): raising it distills more
    diff = _differences(_without_top_k(settings), _without_top_k(previous.settings))
    if diff:
        raise UserError(f"--save {directory} holds a search with other settings (recorded → "
                        f"now: {'; '.join(diff)}); resume with the same flags and scores, or "
                        f"choose a new --save directory.")
    previous.settings["search"]["top_k"] = settings["search"]["top_k"]
    recorded = [r.name for r in previous.candidates]
    if recorded != [c.name for c in candidates]:
        raise UserError(f"--save {directory} holds a search over other candidates "
                        f"({', '.join(recorded)}) than this layout allows ("
                        f"{', '.join(c.name for c in candidates)} at TP={tensor_parallel}, "
                        f"PP={pipeline_parallel}); resume at the layout the search started "
                        f"with, or choose a new --save directory.")
    return previous


def prepare_search(*, teacher: CheckpointInfo, scores: Scores, space: SearchSpace,
                   search: SearchConfig, train: TrainConfig, kd: KDConfig, data: DataConfig,
                   parallel: ParallelConfig, world_size: int,
                   params_dtype: torch.dtype = torch.float32,
                   seed: int = DEFAULT_SEED,
                   teacher_cache: TeacherCache | None = None,
                   cache_teacher: TeacherCacheConfig | None = None) -> SearchPlan:
    """Check everything and plan every candidate; raises one actionable ``ValueError``.
    ``teacher_cache``: read the teacher's top-k from it; ``cache_teacher``: build that cache
    first (in ``SAVE/teacher_cache``).

    Example::

        teacher = find_checkpoint("ckpt/teacher")
        plan = prepare_search(teacher=teacher, scores=Scores.load("scores.safetensors"),
                              space=SearchSpace.default(teacher.model_config),
                              search=SearchConfig(save="search", target_params=70_000_000),
                              train=TrainConfig(save="search", train_iters=400,
                                                global_batch_size=256, eval_iters=4),
                              kd=KDConfig(), data=DataConfig(data_path="wiki", seq_length=4096),
                              parallel=ParallelConfig(), world_size=1)
        results = run_search(plan, ps)
    """
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    check_same_model(scores.model_config, teacher)
    try:
        teacher.model_config.check_parallel(tensor_parallel=tp, pipeline_parallel=pp)
    except UserError as err:
        raise UserError(f"the teacher ({teacher.root}) cannot be laid out at TP={tp}, PP={pp}: "
                        f"{err}") from None
    candidates = enumerate_candidates(teacher.model_config, space,
                                      target_params=search.target_params,
                                      tolerance=search.params_tolerance, tensor_parallel=tp,
                                      pipeline_parallel=pp)
    plans = {c.name: _plan(scores, c, search.depth_method) for c in candidates}
    shallowest = min(candidates, key=lambda c: c.config.num_layers)
    # every candidate derives from the teacher (same vocabulary and tokenizer); the shallowest
    # one bounds the KD layer pairs
    check_run(student=dataclasses.replace(teacher, model_config=shallowest.config),
              teacher=teacher, kd=kd, train=dataclasses.replace(train, load=None),
              parallel=parallel, world_size=world_size, params_dtype=params_dtype,
              seq_length=data.seq_length, teacher_cache=teacher_cache, data=data)
    if teacher_cache is not None:
        teacher_cache.check_teacher(teacher)
    if cache_teacher is not None:
        if teacher_cache is not None:
            raise UserError(CACHE_TWICE)
        check_cache_objective(kd, cache_teacher.top_k)
        check_teacher_cache(teacher=teacher, data=data,
                            num_samples=train.train_iters * train.global_batch_size,
                            config=cache_teacher, save=search.save / TEACHER_CACHE_DIR,
                            overwrite=True, parallel=parallel)
    settings = search_settings(teacher=teacher, scores=scores, space=space, search=search,
                               train=train, kd=kd, data=data, params_dtype=params_dtype,
                               seed=seed, teacher_cache=teacher_cache,
                               cache_teacher=cache_teacher)
    results = _previous(search, settings, candidates, tp, pp)
    if results is None:
        cfg = teacher.model_config
        results = SearchResults.new(settings, {"checkpoint": str(Path(teacher.root)),
                                               "name": Candidate(cfg).name,
                                               "params": cfg.num_parameters()}, candidates)
    return SearchPlan(teacher=teacher, candidates=tuple(candidates), plans=plans, search=search,
                      train=train, kd=kd, data=data, results=results,
                      teacher_cache=teacher_cache, cache_teacher=cache_teacher)
