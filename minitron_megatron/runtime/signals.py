"""Stop a training run cleanly on SIGTERM / SIGINT (Megatron-LM's ``--exit-signal-handler``).

SLURM sends SIGTERM on preemption and at the time limit; Ctrl-C sends SIGINT. While an
``ExitSignals`` block is active these signals only set a flag; the training loop asks
``agreed()`` at each step boundary, which all-reduces the flag over every rank, so all ranks
stop after the same step (a signal may reach one rank only, or reach ranks a step apart), save
the same checkpoint and exit. Outside the block the previous handlers are back in place.

Example::

    with ExitSignals() as signals:
        while training:
            step()
            if (received := signals.agreed(ps.device)) is not None:
                save()
                break      # received.name == "SIGTERM"
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from types import FrameType

import torch
import torch.distributed as dist

EXIT_INTERRUPTED = 75
"""Exit status of a run stopped by a signal after saving (``EX_TEMPFAIL`` of sysexits.h: try
again later, e.g. relaunch with ``--load``). Distinct from 0 (done), 1 (crash), 2 (user error)
and 128 + N (killed by signal N without saving)."""

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ExitSignals:
    """Record the given signals instead of dying; ``agreed`` turns them into one decision."""

    def __init__(self, signals: Sequence[signal.Signals] = DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        """The last signal this process received (local; ranks may differ)."""
        self._previous: dict[signal.Signals, object] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def __enter__(self) -> ExitSignals:
        # handlers can only be installed from the main thread; elsewhere (a caller's worker
        # thread) the block records nothing and the process keeps its usual behaviour
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self, device: torch.device | None = None) -> signal.Signals | None:
        """The signal every rank acts on, or ``None``. Collective over all ranks when
        torch.distributed is initialised: the largest signal number any rank received (SIGTERM
        wins over SIGINT), so every rank takes the same decision at the same step."""
        if not self.signals:
            return None
        code = torch.tensor([int(self.received or 0)], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            code = code.to(device or "cpu")  # NCCL needs the rank's GPU
            dist.all_reduce(code, op=dist.ReduceOp.MAX)
        value = int(code.item())
        return signal.Signals(value) if value else None


class RunInterrupted(Exception):
    """A run stopped by a signal after saving; ``signal`` is its name, the message says where
    the run stands and how to continue."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.signal = signal_name
