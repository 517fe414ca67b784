"""Configs of a distillation (or fine-tuning) run: the KD objective and the training schedule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from minitron_megatron.errors import UserError

LrDecayStyle = Literal["cosine", "linear", "constant"]
LR_DECAY_STYLES = get_args(LrDecayStyle)


@dataclass(kw_only=True, frozen=True)
class KDConfig:
    """The distillation objective: ``α·CE + (1 − α)·(τ²·KL + β·L_is)`` per token.

    ``β`` is the paper's loss balancer: recomputed every micro-batch as ``L_logits / L_is``
    (values, not gradients), so the intermediate-state term keeps the logit term's magnitude.
    """

    temperature: float = 1.0
    """Softmax temperature τ of both models; the KL is multiplied by τ² (see ``kd_loss``)."""

    ce_weight: float = 0.0
    """α: weight of the student's next-token cross entropy against the ground truth; the KD
    term gets 1 − α."""

    reverse: bool = False
    """Use the reverse KL(p_student ‖ p_teacher) instead of the forward KL(p_teacher ‖
    p_student)."""

    top_k: int | None = None
    """Keep only the teacher's k largest logits (global over TP), renormalised."""

    intermediate_pairs: tuple[tuple[int, int], ...] = ()
    """(student layer, teacher layer) pairs, 0-based, whose output hidden states are matched
    by a cosine loss (through a learned linear projection when the widths differ), weighted by
    the loss balancer; on the command line ``S:T,...``, e.g. ``3:7,5:11``."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise UserError(f"--kd-temperature must be positive, got {self.temperature}.")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise UserError(f"--kd-ce-weight must be in [0, 1], got {self.ce_weight}.")
        if self.top_k is not None and self.top_k <= 0:
            raise UserError(f"--kd-top-k must be positive, got {self.top_k}.")
        if self.reverse and self.top_k:
            raise UserError("--kd-reverse with --kd-top-k is undefined (the reverse KL against "
                            "a truncated teacher is infinite); drop one of them.")
        pairs = tuple((int(s), int(t)) for s, t in self.intermediate_pairs)
        if any(s < 0 or t < 0 for s, t in pairs):
            raise UserError(f"--kd-intermediate layer indices must be ≥ 0, got {pairs}.")
        object.__setattr__(self, "intermediate_pairs", pairs)

    @property
    def kd_weight(self) -> float:
        return 1.0 - self.ce_weight

    @staticmethod
    def parse_pairs(text: str | None) -> tuple[tuple[int, int], ...]:
        """``"3:7,5:11"`` → ``((3, 7), (5, 11))``."""
        if not text:
            return ()
        pairs = []
        for item in text.split(","):
            parts = item.strip().split(":")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise UserError(f"--kd-intermediate expects STUDENT:TEACHER layer pairs like "
                                f"'3:7,5:11' (0-based), got {text!r}.")
            pairs.append((int(parts[0]), int(parts[1])))
        return tuple(pairs)

    def check_layers(self, student_layers: int, teacher_layers: int) -> None:
        for s, t in self.intermediate_pairs:
            if s >= student_layers or t >= teacher_layers:
                raise UserError(
                    f"--kd-intermediate pair {s}:{t} is out of range: the student has "
                    f"{student_layers} layers (0..{student_layers - 1}) and the teacher "
                    f"{teacher_layers} (0..{teacher_layers - 1}).")


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """Schedule, optimizer and bookkeeping of the training loop (Megatron-LM flag names)."""

    save: Path
    """Directory of the run: checkpoints, ``metrics.jsonl``."""

    train_iters: int
    """Optimizer steps in the whole run (a resumed run continues up to this)."""

    global_batch_size: int
    """Samples per optimizer step, over all data-parallel ranks and micro-batches."""

    micro_batch_size: int = 1
    """Samples per forward pass on one rank."""

    lr: float = 1e-4
    """Peak learning rate (reached at the end of warmup)."""

    min_lr: float = 0.0
    """Learning rate at the end of the decay."""

    lr_warmup_iters: int = 0
    """Linear warmup from 0 to ``lr`` over this many steps."""

    lr_decay_style: LrDecayStyle = "cosine"
    """Decay from ``lr`` to ``min_lr`` over the steps after warmup: cosine, linear or constant."""

    lr_decay_iters: int | None = None
    """Steps of the decay (``None``: until ``train_iters``)."""

    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay."""

    adam_beta1: float = 0.9
    """Adam's decay rate of the gradient's running mean."""

    adam_beta2: float = 0.95
    """Adam's decay rate of the squared gradient's running mean."""

    adam_eps: float = 1e-8
    """Added to Adam's denominator for numerical stability."""

    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""

    eval_interval: int = 0
    """Evaluate every this many steps (and at the start and the end); 0 disables."""

    eval_iters: int = 1
    """Global batches of validation samples per evaluation."""

    save_interval: int = 0
    """Checkpoint every this many steps (and at the end); 0: only at the end."""

    log_interval: int = 1
    """Print a progress line every this many steps."""

    load: Path | None = None
    """Resume from the latest checkpoint of this run directory (if it holds one)."""

    exit_interval: int = 0
    """Stop (after saving) once the iteration is a multiple of this; 0 never (as Megatron-LM's
    --exit-interval: split a long run into jobs that fit a time limit)."""

    exit_signal_handler: bool = True
    """On SIGTERM (SLURM preemption, time limit) or SIGINT (Ctrl-C): finish the current step,
    save, and stop (``RunResult.interrupted``); all ranks agree on the step. ``False`` leaves
    the signals' default action (the process dies; up to ``save_interval`` steps are lost)."""

    override_opt_param_scheduler: bool = False
    """On resume, take this config's LR schedule (lr, min_lr, warmup, decay steps and style,
    weight decay) instead of the checkpoint's, from the saved iteration on."""

    use_checkpoint_opt_param_scheduler: bool = False
    """On resume, keep the checkpoint's LR schedule even where this config's differs. With
    neither flag a resume whose schedule differs is refused (as Megatron-LM does)."""

    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (GPU; needs bf16/fp16 params)."""

    wandb_project: str | None = None
    """Also log to this Weights & Biases project (``pip install wandb``; works offline)."""

    wandb_run_name: str | None = None
    """Name of the wandb run (default: the save directory's name)."""

    def __post_init__(self) -> None:
        for name in ("train_iters", "global_batch_size", "micro_batch_size", "eval_iters",
                     "log_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, "
                                f"got {value!r}.")
        for name in ("eval_interval", "save_interval", "lr_warmup_iters", "exit_interval"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be ≥ 0.")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"need 0 ≤ --min-lr ≤ --lr and --lr > 0, got lr={self.lr}, "
                            f"min_lr={self.min_lr}.")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise UserError(f"--lr-decay-style must be one of {LR_DECAY_STYLES}, got "
                            f"{self.lr_decay_style!r}.")
        if self.lr_warmup_iters >= self.decay_iters and self.lr_decay_style != "constant":
            raise UserError(f"--lr-warmup-iters ({self.lr_warmup_iters}) must be smaller than "
                            f"the decay steps ({self.decay_iters}).")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise UserError("--override-opt-param-scheduler takes this command's LR schedule "
                            "and --use-checkpoint-opt-param-scheduler the saved one; pass one "
                            "of them.")
        if self.clip_grad < 0:
            raise UserError(f"--clip-grad must be ≥ 0, got {self.clip_grad}.")
        object.__setattr__(self, "save", Path(self.save))
        if self.load is not None:
            object.__setattr__(self, "load", Path(self.load))

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.train_iters

    def microbatches(self, dp_size: int) -> int:
        """Micro-batches per step on each rank, with an actionable error when they don't fit."""
        per_step = self.micro_batch_size * dp_size
        if self.global_batch_size % per_step:
            raise UserError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size {self.micro_batch_size} × data-parallel size {dp_size} = "
                f"{per_step}; choose a global batch that is a multiple of {per_step}.")
        return self.global_batch_size // per_step
