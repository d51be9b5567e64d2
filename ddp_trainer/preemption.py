"""Stop signals (SLURM's warning, SIGTERM): handlers only note the signal; the trainer acts at a step boundary."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class StopSignals:
    """Installs handlers that remember the first stop signal received; `restore()` puts the old ones back."""

    def __init__(self, signums: Sequence[signal.Signals] = STOP_SIGNALS) -> None:
        self.received: int = 0
        self._previous = {signum: signal.signal(signum, self._note) for signum in signums}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.received:
            # A second signal is not waited for (a rank stuck in a collective never reaches the next step).
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        # Only a flag: saving here could interrupt a collective half-way. The trainer acts after the step.
        self.received = signum

    def restore(self) -> None:
        """Reinstall the handlers that were there before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: SLURM signals every process of a step; workers must outlive the checkpoint."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
