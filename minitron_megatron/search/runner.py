"""``run_search``: the architecture search of the paper (§2.3, §4.3) inside one distributed job.

1. **Zero-shot**: the teacher is loaded once; each candidate is pruned from it in memory
   (``apply_plan``, from the saved scores: no new calibration) and its held-out loss measured.
2. **Selection**: every candidate (the paper's way), or the ``top_k`` with the lowest zero-shot
   loss (pruning and evaluating is cheap next to distilling).
   With ``--cache-teacher`` the same teacher then computes its top-k logits over the
   candidates' training samples once (``write_teacher_cache``), and every candidate below
   distills from that cache instead of running the teacher.
3. **Short distillation** of each selected candidate, best zero-shot loss first: its pruned
   checkpoint is written (``prune_checkpoint``), distilled by the ``Trainer`` for
   ``train_iters`` steps, and its loss measured again on the same held-out samples.
4. **Ranking** by that post-KD loss. The best candidate's distilled checkpoint is kept (all of
   them with ``keep_all``).

``search_results.json`` / ``.md`` are rewritten atomically after every candidate. A killed
search, relaunched with the same flags, skips what the results file holds; a candidate killed
mid-distillation resumes from its own latest checkpoint (``--save-interval``) or restarts.

Example::

    plan = prepare_search(...)            # all checks, before any work
    with distributed(env, parallel) as ps:
        results = run_search(plan, ps)
    results.best.name, results.best.checkpoint
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from minitron_megatron.checkpoint import TRACKER_FILE, find_checkpoint, latest_iteration
from minitron_megatron.checkpoint import load_checkpoint as load_model
from minitron_megatron.config import DEFAULT_SEED
from minitron_megatron.data.loaders import build_datasets
from minitron_megatron.distill.teacher_cache import TeacherCache, missing_shards
from minitron_megatron.distill.teacher_cache_write import write_teacher_cache
from minitron_megatron.distill.training import Trainer
from minitron_megatron.errors import UserError
from minitron_megatron.evaluate import eod_id_of, evaluate_model
from minitron_megatron.model.build import build_model
from minitron_megatron.pruning import apply_plan, prune_checkpoint
from minitron_megatron.pruning.apply import PLAN_FILE
from minitron_megatron.runtime.distributed import ParallelState, seed_everything
from minitron_megatron.runtime.signals import RunInterrupted
from minitron_megatron.search.preflight import SearchPlan
from minitron_megatron.search.progress import SearchProgress
from minitron_megatron.search.results import CandidateResult, SearchResults
from minitron_megatron.search.space import format_params

PRUNED, DISTILLED = "pruned", "distilled"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _datasets(plan: SearchPlan):
    """The held-out samples every loss is measured on (never one twice); also checks the
    training split can feed a distillation (cycling epochs if it must) before any work."""
    t, info = plan.train, plan.teacher
    needed = {"train": t.train_iters * t.global_batch_size, "valid": plan.eval_samples}
    try:
        return build_datasets(plan.data, eod_id=eod_id_of(info),
                              vocab_size=info.model_config.vocab_size, num_samples=needed,
                              padded_vocab_size=info.model_config.padded_vocab_size,
                              repeat=("train",))["valid"]
    except UserError as err:
        raise UserError(f"{err} (each candidate needs --candidate-train-iters × "
                        f"--global-batch-size = {needed['train']} training samples and "
                        f"--candidate-eval-iters × --global-batch-size = {needed['valid']} "
                        f"held-out samples of --seq-length {plan.data.seq_length} "
                        f"tokens)") from None


def _evaluate(model, ps: ParallelState, plan: SearchPlan, valid) -> float:
    return evaluate_model(model, ps, valid, num_samples=plan.eval_samples,
                          micro_batch_size=plan.train.micro_batch_size,
                          seq_length=plan.data.seq_length).loss


def _record(results: SearchResults, plan: SearchPlan, ps: ParallelState) -> None:
    if ps.rank == 0:
        results.save(plan.search.save)


def _zero_shot(plan: SearchPlan, ps: ParallelState, valid, view: SearchProgress,
               teacher) -> None:
    """Prune every candidate without a zero-shot loss from the teacher in memory and measure
    it (the teacher is loaded once)."""
    results = plan.results
    pending = [r for r in results.candidates if r.zero_shot_loss is None]
    view.start_zero_shot(len(pending))
    total = len(results.candidates)
    for record in pending:
        start = time.perf_counter()
        pruned, _ = apply_plan(teacher, plan.plans[record.name], ps)
        record.zero_shot_loss = _evaluate(pruned, ps, plan, valid)
        del pruned
        record.zero_shot_seconds = time.perf_counter() - start
        _record(results, plan, ps)
        view.zero_shot_done(results.candidates.index(record) + 1, total, record,
                            record.zero_shot_seconds)


def _cache_teacher(plan: SearchPlan, ps: ParallelState, view: SearchProgress, teacher,
                   params_dtype: torch.dtype) -> SearchPlan:
    """``--cache-teacher``: the teacher's top-k over the candidates' training samples, written
    (or finished) once in ``plan.cache_dir`` with the teacher already in memory; returns the
    plan reading it."""
    config = plan.cache_teacher
    start = time.perf_counter()
    root = write_teacher_cache(plan.teacher, ps, plan.data, num_samples=plan.train_samples,
                               micro_batch_size=plan.train.micro_batch_size, config=config,
                               save=plan.cache_dir, overwrite=True, params_dtype=params_dtype,
                               model=teacher)
    cache = TeacherCache(root)
    cache.check_covers(data=plan.data, num_samples=plan.train_samples,
                       padded_vocab_size=plan.teacher.model_config.padded_vocab_size)
    view.say(f"teacher cache: top-{config.top_k} {config.dtype} logits of "
             f"{plan.train_samples} training samples written to {root} "
             f"({time.perf_counter() - start:.1f} s, {config.bytes_per_token} bytes/token); "
             f"every candidate distills from it")
    return dataclasses.replace(plan, teacher_cache=cache)


def _distill(plan: SearchPlan, record: CandidateResult, ps: ParallelState, valid,
             view: SearchProgress, params_dtype: torch.dtype, seed: int) -> None:
    directory = plan.search.candidate_dir(record.name)
    pruned_dir, kd_dir = directory / PRUNED, directory / DISTILLED
    start = time.perf_counter()
    seed_everything(seed)  # every candidate starts from the same RNG state, resumed or not
    if not pruned_dir.exists() or latest_iteration(pruned_dir) is None:
        # a killed try's leftovers are replaced whole (prune_checkpoint stages and renames)
        path = prune_checkpoint(plan.teacher, plan.plans[record.name], pruned_dir, ps,
                                params_dtype=params_dtype)
        if ps.rank == 0:
            shutil.copyfile(path / PLAN_FILE, directory / PLAN_FILE)
    train = dataclasses.replace(
        plan.train, save=kd_dir, load=kd_dir, eval_interval=0, exit_interval=0,
        wandb_run_name=f"{plan.train.wandb_run_name or 'search'}-{record.name}")
    trainer = Trainer(train=train, kd=plan.kd, data=plan.data, student=find_checkpoint(pruned_dir),
                      teacher=None if plan.teacher_cache else plan.teacher, ps=ps,
                      params_dtype=params_dtype, seed=seed, teacher_cache=plan.teacher_cache)
    result = trainer.run(on_step=view.step)
    del trainer
    if result.interrupted:
        raise RunInterrupted(result.interrupted, (
            f"{result.interrupted} received: candidate {record.name}'s distillation saved at "
            f"iteration {result.state.iteration} of {train.train_iters} in {kd_dir}; rerun the "
            f"same command to continue the search from there"))
    gc.collect()
    # the saved student, as anyone loading the kept checkpoint gets it
    distilled = find_checkpoint(kd_dir)
    student = build_model(distilled.model_config, ps, params_dtype=params_dtype,
                          init_weights=False)
    load_model(distilled, model=student)
    record.post_kd_loss = _evaluate(student, ps, plan, valid)
    del student
    record.kd_seconds = time.perf_counter() - start
    record.checkpoint = str(kd_dir.relative_to(plan.search.save))


def _remove_checkpoints(directory: Path) -> None:
    """Delete a run directory's checkpoints; its metrics.jsonl (the loss curve) stays."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if path.name.startswith(("iter_", ".iter_")) and path.is_dir():
            shutil.rmtree(path)
    (directory / TRACKER_FILE).unlink(missing_ok=True)


def _tidy(plan: SearchPlan, ps: ParallelState) -> None:
    """Drop what is no longer needed: the distilled checkpoints of all but the best candidate
    and the pruned checkpoints of distilled candidates (both kept with ``keep_all``)."""
    results = plan.results
    if not plan.search.keep_all:
        best = results.best
        for record in results.candidates:
            if record.checkpoint is not None and record is not best:
                record.checkpoint = None
    _record(results, plan, ps)  # the record first: a kill between the two only leaves files
    _barrier()  # every rank is done with the files below
    if ps.rank == 0 and not plan.search.keep_all:
        for record in results.candidates:
            if record.post_kd_loss is None:
                continue
            directory = plan.search.candidate_dir(record.name)
            shutil.rmtree(directory / PRUNED, ignore_errors=True)
            if record.checkpoint is None:
                _remove_checkpoints(directory / DISTILLED)
    _barrier()


def run_search(plan: SearchPlan, ps: ParallelState, *, params_dtype: torch.dtype = torch.float32,
               seed: int = DEFAULT_SEED) -> SearchResults:
    """Run (or resume) the search of ``plan`` on this rank; collective over all ranks. Returns
    the results (also in ``search_results.json`` / ``.md``)."""
    results = plan.results
    valid = _datasets(plan)
    view = SearchProgress(active=ps.rank == 0, train_iters=plan.train.train_iters,
                          log_interval=plan.train.log_interval)
    total, top_k = len(results.candidates), results.top_k
    how = "all" if top_k is None or top_k >= total else f"the {top_k} best zero-shot"
    view.say(f"{total} candidates within {plan.search.params_tolerance:.0%} of "
             f"{format_params(plan.search.target_params)} parameters; distilling {how} for "
             f"{plan.train.train_iters} steps each; losses on {plan.eval_samples} held-out "
             f"samples; results in {plan.search.save}")
    done = sum(r.post_kd_loss is not None for r in results.candidates)
    zero = sum(r.zero_shot_loss is not None for r in results.candidates)
    if zero:
        view.say(f"resuming: {zero} zero-shot loss(es) and {done} distillation(s) recorded")

    # the teacher is loaded once, for the zero-shot losses and the cache, when either is due
    teacher = None
    if any(r.zero_shot_loss is None for r in results.candidates) or (
            plan.cache_teacher is not None
            and any(r.post_kd_loss is None for r in results.selected())
            and missing_shards(plan.cache_dir, plan.train_samples,
                               plan.cache_teacher.samples_per_shard)):
        teacher = build_model(plan.teacher.model_config, ps, params_dtype=params_dtype,
                              init_weights=False)
        load_model(plan.teacher, model=teacher)
    _zero_shot(plan, ps, valid, view, teacher)
    selected = results.selected()  # by the zero-shot losses
    pending = [r for r in selected if r.post_kd_loss is None]
    if plan.cache_teacher is not None and pending:
        plan = _cache_teacher(plan, ps, view, teacher, params_dtype)
    del teacher
    gc.collect()
    view.start_distillation(len(pending))
    for index, record in enumerate(selected, 1):
        if record.post_kd_loss is not None:
            view.say(f"candidate {index}/{len(selected)} {record.name}: done before "
                     f"(post-KD loss {record.post_kd_loss:.4f}), skipped")
            continue
        kd_dir = plan.search.candidate_dir(record.name) / DISTILLED
        view.candidate_start(index, len(selected), record,
                             resuming=kd_dir.is_dir() and latest_iteration(kd_dir) is not None)
        _distill(plan, record, ps, valid, view, params_dtype, seed)
        _tidy(plan, ps)
        view.candidate_done(record, results.best)
    _tidy(plan, ps)
    if plan.cache_teacher is not None and not plan.search.keep_all:
        if ps.rank == 0:  # it served this search's candidates only
            shutil.rmtree(plan.cache_dir, ignore_errors=True)
        _barrier()
    best = results.best
    view.say(f"done: best {best.name} (post-KD loss {best.post_kd_loss:.4f}), checkpoint "
             f"{plan.search.save / best.checkpoint if best.checkpoint else 'not kept'}; table "
             f"in {plan.search.save / 'search_results.md'}")
    return results
