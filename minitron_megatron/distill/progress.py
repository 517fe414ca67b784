"""Progress of a run: a console line per log interval, ``metrics.jsonl`` in the save directory,
and Weights & Biases when a project is given (optional extra, imported lazily; honours
``WANDB_MODE=offline``). Only the rank that owns the logger (rank 0) writes anything."""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

from minitron_megatron.checkpoint import write_text_atomic
from minitron_megatron.errors import UserError

METRICS_FILE = "metrics.jsonl"

log = logging.getLogger("minitron.distill")


def require_wandb() -> None:
    """Fail before any work when ``--wandb-project`` is given but wandb is not installed."""
    if importlib.util.find_spec("wandb") is None:
        raise UserError("--wandb-project needs the wandb package: pip install "
                        "'minitron-megatron[wandb]' (with WANDB_MODE=offline it logs without "
                        "network), or drop --wandb-project.")


class Progress:
    """Console + JSONL (+ wandb) metrics of one run, written by rank 0 only."""

    def __init__(self, save_dir: Path, *, total_iters: int, start_iter: int, active: bool,
                 wandb_project: str | None = None, wandb_run_name: str | None = None,
                 run_config: dict[str, Any] | None = None):
        self.active = active
        self.total = total_iters
        self.path = Path(save_dir) / METRICS_FILE
        self.window: list[dict[str, float]] = []
        self.started = time.monotonic()
        self.start_iter = start_iter
        self.last_iter = start_iter
        self.wandb = None
        if not active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a resumed run drops what followed its checkpoint; a fresh run starts a new file
        _truncate_after(self.path, start_iter if start_iter > 0 else -1)
        if wandb_project:
            require_wandb()
            import wandb

            self.wandb = wandb.init(project=wandb_project, dir=str(save_dir),
                                    name=wandb_run_name or Path(save_dir).name,
                                    config=run_config or {}, resume="allow")

    def step(self, iteration: int, metrics: dict[str, float]) -> None:
        """Record one training step; print the averaged line every ``log_interval`` steps."""
        if not self.active:
            return
        record = {"iteration": iteration, **metrics}
        self._write(record)
        self.window.append(metrics)
        self.last_iter = iteration

    def flush_line(self, iteration: int) -> None:
        """Print the progress line averaged over the steps since the last one."""
        if not self.active or not self.window:
            return
        avg = {k: sum(m[k] for m in self.window) / len(self.window) for k in self.window[0]}
        elapsed = time.monotonic() - self.started
        done = iteration - self.start_iter
        eta = elapsed / max(done, 1) * (self.total - iteration)
        parts = [f"iteration {iteration:>6d}/{self.total}", f"loss {avg['loss']:.4f}"]
        if "kd_loss" in avg:
            parts.append(f"kd loss {avg['kd_loss']:.4f}")
        parts += [f"lr {avg['lr']:.3e}", f"grad norm {avg['grad_norm']:.3f}",
                  f"{avg['tokens_per_s']:.0f} tok/s",
                  f"ETA {datetime.timedelta(seconds=round(eta))}"]
        print(" | ".join(parts), flush=True)
        self.window.clear()

    def evaluation(self, iteration: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        self._write({"iteration": iteration, **metrics})
        print(f"validation at iteration {iteration}: " +
              " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items()),
              flush=True)

    def note(self, message: str) -> None:
        if self.active:
            log.info(message)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "iteration"},
                           step=record["iteration"])


def read_metrics(save_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (training steps and evaluations), in order."""
    path = Path(save_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_after(path: Path, iteration: int) -> None:
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("iteration", 0) <= iteration]
    write_text_atomic(path, "".join(line + "\n" for line in kept))
