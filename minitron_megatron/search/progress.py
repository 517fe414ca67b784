"""The search's progress view (rank 0): which candidate (``i/N`` and its shape), its
distillation step, and an ETA for the whole search.

The ETA is measured, not guessed: remaining zero-shot evaluations × their mean time, plus
remaining distillation steps (of the current and the later candidates) × the mean step time,
plus the per-candidate overhead (writing the pruned checkpoint, loading both models, the final
evaluation and save) measured on the candidates finished so far. Until the first distillation
step is timed, the line says so instead of inventing a number.
"""

from __future__ import annotations

import datetime
import time

from minitron_megatron.search.results import CandidateResult
from minitron_megatron.search.space import format_params


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class SearchProgress:
    """Console lines of one search; silent on every rank but the logging one."""

    def __init__(self, *, active: bool, train_iters: int, log_interval: int):
        self.active = active
        self.train_iters = train_iters
        self.log_interval = log_interval
        self.zero_shot_times: list[float] = []
        self.step_times: list[float] = []
        self.overheads: list[float] = []
        self.zero_shot_left = 0
        self.kd_left = 0
        """Candidates still to distill, the current one included."""

        self.label = ""
        self.current_steps: list[float] = []
        self.current_start = 0.0

    def say(self, message: str) -> None:
        if self.active:
            print(f"search: {message}", flush=True)

    # ------------------------------------------------------------------ ETA
    def _kd_eta(self, steps_done_current: int) -> float | None:
        if not self.kd_left:
            return 0.0
        if not self.step_times:
            return None
        per_step = sum(self.step_times) / len(self.step_times)
        steps = self.kd_left * self.train_iters - steps_done_current
        overhead = sum(self.overheads) / len(self.overheads) if self.overheads else 0.0
        return steps * per_step + self.kd_left * overhead

    def eta(self, steps_done_current: int = 0) -> str:
        zero_shot = 0.0
        if self.zero_shot_left:
            zero_shot = (self.zero_shot_left * sum(self.zero_shot_times)
                         / max(len(self.zero_shot_times), 1))
        kd = self._kd_eta(steps_done_current)
        if kd is None and self.zero_shot_left:
            return (f"ETA {_clock(zero_shot)} for the zero-shot losses, then {self.kd_left} "
                    f"distillation(s) (not timed yet)")
        if kd is None:
            return "search ETA once a distillation step is timed"
        return f"search ETA {_clock(zero_shot + kd)}"

    # ------------------------------------------------------------------ events
    def start_zero_shot(self, pending: int) -> None:
        self.zero_shot_left = pending

    def zero_shot_done(self, index: int, total: int, record: CandidateResult,
                       seconds: float) -> None:
        self.zero_shot_times.append(seconds)
        self.zero_shot_left -= 1
        self.say(f"zero-shot {index}/{total} {record.name} ({format_params(record.params)}): "
                 f"val loss {record.zero_shot_loss:.4f} ({seconds:.1f} s) | {self.eta()}")

    def start_distillation(self, pending: int) -> None:
        self.kd_left = pending

    def candidate_start(self, index: int, total: int, record: CandidateResult,
                        resuming: bool) -> None:
        self.label = f"candidate {index}/{total} {record.name}"
        self.current_steps = []
        self.current_start = time.perf_counter()
        what = "resuming its distillation" if resuming else "pruning and distilling"
        self.say(f"{self.label} ({format_params(record.params)}, zero-shot loss "
                 f"{record.zero_shot_loss:.4f}): {what} for {self.train_iters} steps")

    def step(self, iteration: int, metrics: dict[str, float]) -> None:
        """``Trainer.run``'s per-step hook."""
        self.step_times.append(metrics["step_time"])
        self.current_steps.append(metrics["step_time"])
        if iteration % self.log_interval == 0 or iteration == self.train_iters:
            self.say(f"{self.label} | step {iteration}/{self.train_iters} | "
                     f"{self.eta(iteration)}")

    def candidate_done(self, record: CandidateResult, best: CandidateResult) -> None:
        elapsed = time.perf_counter() - self.current_start
        if self.current_steps:  # a candidate whose run was already finished has no steps
            self.overheads.append(max(elapsed - sum(self.current_steps), 0.0))
        self.kd_left -= 1
        self.say(f"{self.label}: post-KD val loss {record.post_kd_loss:.4f} (zero-shot "
                 f"{record.zero_shot_loss:.4f}), {elapsed:.0f} s; best so far {best.name} "
                 f"({best.post_kd_loss:.4f}) | {self.eta()}")
