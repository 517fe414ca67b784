"""The training loop of ``minitron distill`` and ``minitron finetune``, on Megatron-Core's parts.

Megatron's ``DistributedDataParallel`` + ``finalize_model_grads`` (per-token loss normalisation
over the global batch), ``get_megatron_optimizer`` (Adam; fp32 on CPU, bf16 + distributed
optimizer on GPU), ``OptimizerParamScheduler`` (warmup, then cosine/linear decay to the minimum
LR), gradient clipping inside the optimizer step, and ``get_forward_backward_func`` (1F1B with
PP > 1, the teacher's activations riding along with the student's).

Example::

    trainer = Trainer(train=TrainConfig(save=Path("out"), train_iters=100, global_batch_size=8),
                      kd=KDConfig(), data=DataConfig(data_path="wiki", seq_length=256),
                      student=find_checkpoint("student"), teacher=find_checkpoint("teacher"),
                      ps=ps)
    result = trainer.run()
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minitron_megatron.checkpoint import CheckpointInfo, load_checkpoint
from minitron_megatron.config import DEFAULT_SEED
from minitron_megatron.data.loaders import (
    DataConfig,
    build_datasets,
    distinct_samples,
    shard_for_data_parallel,
)
from minitron_megatron.distill.checkpointing import (
    TrainState,
    check_schedule,
    load_training_checkpoint,
    resumable_checkpoint,
    save_training_checkpoint,
)
from minitron_megatron.distill.config import KDConfig, TrainConfig
from minitron_megatron.distill.model import DistillationModel
from minitron_megatron.distill.progress import Progress
from minitron_megatron.distill.schedule import forward_backward, train_sample_ids
from minitron_megatron.distill.teacher_cache import (
    CachedTeacherDataset,
    TeacherCache,
    check_order,
)
from minitron_megatron.errors import NonFiniteResultError, UserError
from minitron_megatron.evaluate import eod_id_of
from minitron_megatron.model.build import build_model
from minitron_megatron.runtime.distributed import ParallelState
from minitron_megatron.runtime.signals import ExitSignals

log = logging.getLogger("minitron.distill")


class TrainingDiverged(NonFiniteResultError):
    """The loss, the gradient norm or the validation loss became NaN/inf; nothing was saved
    after the last good checkpoint (the CLI prints it as one line, exit 2)."""


@dataclass
class RunResult:
    state: TrainState
    history: list[dict[str, Any]] = field(default_factory=list)
    """Per-step metrics and evaluations (the same records as ``metrics.jsonl``)."""

    interrupted: str | None = None
    """Name of the signal (``"SIGTERM"``, ``"SIGINT"``) that stopped the run before
    ``train_iters``, after saving ``state.iteration``; ``None`` when it ran to its end (or to
    its exit interval)."""


class Trainer:
    """One distillation (``teacher`` given) or fine-tuning (``teacher=None``) run on this rank."""

    def __init__(self, *, train: TrainConfig, kd: KDConfig | None, data: DataConfig,
                 student: CheckpointInfo, teacher: CheckpointInfo | None, ps: ParallelState,
                 params_dtype: torch.dtype = torch.float32, seed: int = DEFAULT_SEED,
                 teacher_cache: TeacherCache | None = None):
        self.train_cfg, self.data, self.ps = train, data, ps
        self.teacher_cache = teacher_cache
        self.kd = kd if teacher is not None else None
        if teacher_cache is not None:  # the cached top-k stands in for the teacher's logits
            self.kd = teacher_cache.kd_config(kd)
        self.student_info, self.teacher_info = student, teacher
        self.params_dtype, self.seed = params_dtype, seed
        self.microbatches = train.microbatches(ps.dp_size)
        self.history: list[dict[str, Any]] = []
        self._build()

    # ------------------------------------------------------------------ set-up
    def _build(self) -> None:
        self.datasets = self._datasets()  # data errors come before any model is built
        resume = resumable_checkpoint(self.train_cfg.load, self.student_info.model_config)
        if resume is not None:
            check_schedule(resume, self.train_cfg)
            self._check_data_order(resume)
        self._build_models(load_student=resume is None)
        self._build_optimizer()
        self.state = TrainState()
        if resume is not None:
            self.state = load_training_checkpoint(
                resume, student=self.student, projection=self.model.projection,
                optimizer=self.optimizer, scheduler=self.scheduler, ps=self.ps,
                override_schedule=self.train_cfg.override_opt_param_scheduler)

    def _build_models(self, *, load_student: bool) -> None:
        """Student (loaded unless a resume restores it) and frozen teacher, this rank's stage."""
        ps, dtype = self.ps, self.params_dtype
        student = build_model(self.student_info.model_config, ps, params_dtype=dtype,
                              init_weights=False)
        if load_student:
            load_checkpoint(self.student_info, model=student)
        teacher = None
        if self.teacher_info is not None:
            teacher = build_model(self.teacher_info.model_config, ps, params_dtype=dtype,
                                  init_weights=False)
            load_checkpoint(self.teacher_info, model=teacher)
        self.student = student
        self.model = DistillationModel(student, teacher, kd=self.kd or KDConfig(), ps=ps,
                                       seed=self.seed,
                                       cached_teacher=self.teacher_cache is not None)

    def _build_optimizer(self) -> None:
        """Megatron DDP around the teacher–student model, its optimizer and LR schedule."""
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        t, ps = self.train_cfg, self.ps
        config = self.student.config
        config.calculate_per_token_loss = True  # grads ÷ tokens of the whole global batch
        self.ddp = DistributedDataParallel(
            config=config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                use_distributed_optimizer=t.use_distributed_optimizer,
                average_in_collective=False),
            module=self.model)
        half = self.params_dtype in (torch.bfloat16, torch.float16)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr,
                            weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
                            adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad,
                            bf16=self.params_dtype == torch.bfloat16,
                            fp16=self.params_dtype == torch.float16, params_dtype=self.params_dtype,
                            use_distributed_optimizer=t.use_distributed_optimizer and half),
            [self.ddp],
            # on CPU the default group already is gloo: init_distributed creates no extra ones
            use_gloo_process_groups=ps.device.type == "cuda")
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr,
            lr_warmup_steps=t.lr_warmup_iters, lr_decay_steps=t.decay_iters,
            lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
            wd_incr_steps=t.train_iters, wd_incr_style="constant",
            # a resume whose schedule differs was refused unless one of these two was asked for
            override_opt_param_scheduler=t.override_opt_param_scheduler,
            use_checkpoint_opt_param_scheduler=not t.override_opt_param_scheduler)
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = self.ddp.no_sync
        config.grad_scale_func = self.optimizer.scale_loss

    def _datasets(self):
        t, info = self.train_cfg, self.student_info
        needed = {"train": t.train_iters * t.global_batch_size}
        if t.eval_interval:
            needed["valid"] = t.eval_iters * t.global_batch_size
        try:
            datasets = build_datasets(self.data, eod_id=eod_id_of(info),
                                      vocab_size=info.model_config.vocab_size,
                                      num_samples=needed, repeat=("train",),
                                      padded_vocab_size=info.model_config.padded_vocab_size)
        except UserError as err:
            want = f"--train-iters × --global-batch-size = {needed['train']} training samples"
            if "valid" in needed:
                want += (f" and --eval-iters × --global-batch-size = {needed['valid']} "
                         f"validation samples")
            raise UserError(f"{err} (this run needs {want} of --seq-length "
                            f"{self.data.seq_length} tokens)") from None
        if self.ps.rank == 0:
            per_epoch = distinct_samples(datasets["train"], self.data.seq_length)
            log.info("training data: %d samples of %d tokens = %.2f epochs of the train split "
                     "(%d distinct samples)", needed["train"], self.data.seq_length,
                     needed["train"] / per_epoch, per_epoch)
        if self.teacher_cache is not None:
            check_order(self.teacher_cache, datasets["train"], needed["train"])
            datasets["train"] = CachedTeacherDataset(datasets["train"], self.teacher_cache,
                                                     self.kd.top_k,
                                                     with_teacher=self.ps.is_last_stage)
        return datasets

    def _check_data_order(self, resume: CheckpointInfo) -> None:
        """Warn when a resume changes the sample order: GPTDataset's index over more than one
        epoch depends on the number of samples the run asks for (its --train-iters)."""
        saved = resume.path / "run_config.json"
        if self.ps.rank != 0 or not saved.is_file():
            return
        before = json.loads(saved.read_text())["train"]
        t = self.train_cfg
        old, new = (before["train_iters"] * before["global_batch_size"],
                    t.train_iters * t.global_batch_size)
        per_epoch = distinct_samples(self.datasets["train"], self.data.seq_length)
        if old != new and max(old, new) > per_epoch:
            log.warning("the run now asks for %d training samples instead of %d over %d-sample "
                        "epochs: Megatron's multi-epoch index is built for the run's length, so "
                        "the samples from iteration %d on follow another order (some may repeat "
                        "or be skipped within an epoch)", new, old, per_epoch,
                        resume.iteration + 1)

    # ------------------------------------------------------------------ steps
    def train_step(self) -> dict[str, float]:
        """One optimizer step on the next global batch; returns its metrics."""
        t, ps = self.train_cfg, self.ps
        start = time.perf_counter()
        self.ddp.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self.optimizer.param_groups[0]["lr"]
        ids = train_sample_ids(self.state.consumed_samples, t.global_batch_size, ps)
        sums = forward_backward(self.ddp, self.model, ps, self.datasets["train"], ids, kd=self.kd,
                                seq_length=self.data.seq_length,
                                micro_batch_size=t.micro_batch_size, forward_only=False)
        iteration = self.state.iteration + 1
        loss = sums["loss"] / sums["tokens"]
        if not math.isfinite(loss):
            self._diverged(iteration, f"the loss is {loss}")
        _, grad_norm, _ = self.optimizer.step()
        if grad_norm is None:  # no clipping: the optimizer did not compute it
            grad_norm = self.optimizer.get_grad_norm()
        grad_norm = float(grad_norm)
        if not math.isfinite(grad_norm):
            self._diverged(iteration, f"the gradient norm is {grad_norm}")
        self.scheduler.step(increment=1)
        self.state = TrainState(iteration=iteration,
                                consumed_samples=self.state.consumed_samples + t.global_batch_size)
        elapsed = time.perf_counter() - start
        metrics = {"loss": loss, "ce_loss": sums["ce_loss"] / sums["tokens"], "lr": lr,
                   "grad_norm": grad_norm,
                   "tokens_per_s": t.global_batch_size * self.data.seq_length / elapsed,
                   "step_time": elapsed}
        if self.kd is not None:
            metrics["kd_loss"] = sums["kd_loss"] / sums["tokens"]
            if self.kd.intermediate_pairs:
                metrics["is_loss"] = sums["is_loss"] / sums["tokens"]
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Student validation loss (and KD loss against the teacher) on the first
        ``eval_iters × global_batch_size`` validation samples. Collective."""
        t, ps = self.train_cfg, self.ps
        samples = t.eval_iters * t.global_batch_size
        ids = shard_for_data_parallel(samples, ps.dp_rank, ps.dp_size)
        self.ddp.eval()
        with torch.no_grad():
            sums = forward_backward(self.ddp, self.model, ps, self.datasets["valid"], ids,
                                    kd=self.kd, seq_length=self.data.seq_length,
                                    micro_batch_size=t.micro_batch_size, forward_only=True)
        self.ddp.train()
        result = {"val_loss": sums["ce_loss"] / sums["tokens"]}
        if not math.isfinite(result["val_loss"]):
            self._diverged(self.state.iteration, f"the validation loss is {result['val_loss']}")
        result["val_ppl"] = math.exp(min(result["val_loss"], 700.0))
        if self.kd is not None and self.teacher_cache is None:  # the cache holds no held-out
            result["val_kd_loss"] = sums["kd_loss"] / sums["tokens"]
        return result

    def save(self) -> Path:
        info = self.student_info
        tokenizer = info.tokenizer_dir or (self.teacher_info.tokenizer_dir
                                           if self.teacher_info else None)
        return save_training_checkpoint(
            self.train_cfg.save, student=self.student, model_config=info.model_config,
            projection=self.model.projection, optimizer=self.optimizer,
            scheduler=self.scheduler, state=self.state, ps=self.ps, tokenizer_dir=tokenizer,
            files={"run_config.json": json.dumps(self.run_config(), indent=2, default=str)})

    def run_config(self) -> dict[str, Any]:
        return {"train": dataclasses.asdict(self.train_cfg),
                "kd": dataclasses.asdict(self.kd) if self.kd else None,
                "data": dataclasses.asdict(self.data),
                "student": str(self.student_info.path),
                "teacher": str(self.teacher_info.path) if self.teacher_info else None,
                "teacher_cache": str(self.teacher_cache.root) if self.teacher_cache else None,
                "layout": {"tp": self.ps.tp_size, "pp": self.ps.pp_size, "dp": self.ps.dp_size}}

    # ------------------------------------------------------------------ the loop
    def run(self, on_step: Callable[[int, dict[str, float]], None] | None = None) -> RunResult:
        """Train up to ``train_iters`` steps (from where a resumed run stands): log, evaluate
        and checkpoint on their intervals, save at the end (or at the exit interval, or after
        the step during which SIGTERM/SIGINT arrived: ``RunResult.interrupted``).

        ``on_step(iteration, metrics)`` is called on every rank after each step (a caller's
        progress view, e.g. the architecture search's ETA)."""
        t = self.train_cfg
        progress = Progress(t.save, total_iters=t.train_iters, start_iter=self.state.iteration,
                            active=self.ps.rank == 0, wandb_project=t.wandb_project,
                            wandb_run_name=t.wandb_run_name, run_config=self.run_config())
        signals = ExitSignals() if t.exit_signal_handler else ExitSignals(signals=())
        with signals:
            try:
                interrupted = self._loop(progress, signals, on_step)
            finally:
                progress.close()
        return RunResult(state=self.state, history=self.history, interrupted=interrupted)

    def _loop(self, progress: Progress, signals: ExitSignals,
              on_step: Callable[[int, dict[str, float]], None] | None) -> str | None:
        """The steps of ``run``; returns the name of the signal that stopped them early."""
        t = self.train_cfg
        if self.state.iteration == 0 and t.eval_interval:
            self._record_eval(progress)
        while self.state.iteration < t.train_iters:
            metrics = self.train_step()
            it = self.state.iteration
            progress.step(it, metrics)
            self.history.append({"iteration": it, **metrics})
            last = it == t.train_iters
            if it % t.log_interval == 0 or last:
                progress.flush_line(it)
            if on_step is not None:
                on_step(it, metrics)
            if t.eval_interval and (it % t.eval_interval == 0 or last):
                self._record_eval(progress)
            received = signals.agreed(self.ps.device)  # the same on every rank
            stop = bool(t.exit_interval) and it % t.exit_interval == 0
            if last or stop or received or (t.save_interval and it % t.save_interval == 0):
                path = self.save()
                progress.note(f"saved {path}")
            if last:
                break
            if received is not None:
                progress.note(f"{received.name} received: stopped after iteration {it} of "
                              f"{t.train_iters}")
                return received.name
            if stop:
                progress.note(f"exiting at iteration {it} (exit interval {t.exit_interval})")
                break
        return None

    def _record_eval(self, progress: Progress) -> None:
        result = self.evaluate()
        progress.evaluation(self.state.iteration, result)
        self.history.append({"iteration": self.state.iteration, **result})

    def _diverged(self, iteration: int, what: str) -> None:
        from minitron_megatron.checkpoint import latest_iteration

        if iteration == 0:  # before any step: the starting model itself gives NaN/inf
            raise TrainingDiverged(
                f"training stopped before its first step: {what} on the starting model "
                f"({self.student_info.path}); its weights are corrupt or diverged: check it with "
                f"`minitron evaluate`, or start from another checkpoint.")
        saved = latest_iteration(self.train_cfg.save) if self.train_cfg.save.exists() else None
        where = (f"the last good checkpoint is iteration {saved} in {self.train_cfg.save}; "
                 f"resume from it with --load {self.train_cfg.save}" if saved is not None
                 else "no checkpoint was saved; start again")
        raise TrainingDiverged(
            f"training stopped at iteration {iteration}: {what}. Nothing was saved after it; "
            f"{where} after lowering --lr (or raising --lr-warmup-iters, or --clip-grad) or "
            f"checking the data.")
