"""Stop signals (SLURM's warning, SIGTERM): handlers only note the signal; the trainer acts at a step boundary.

Loader workers ignore both signals (`workers`), so this process stops them itself on every way out.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import ddp_trainer
from ddp_trainer.distributed import DistEnv, gather_objects
from ddp_trainer.peers import is_peer_failure
from ddp_trainer.slurm import EarlyWarning

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
REPEAT_WINDOW_S = 1.0  # a signal sent again within it is the same stop, not a second one


class Stopped(Exception):
    """Raised out of the step loop once every rank agreed to stop on a signal; the checkpoint is written."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Installs handlers that remember the first stop signal received; `restore()` puts the old ones back.

    A later signal is not waited for: the process ends on it at once, unless it is the same stop again (see
    `_same_stop`).
    """

    def __init__(self, signums: Sequence[signal.Signals] = STOP_SIGNALS) -> None:
        self.received, self.noted_at = 0, 0.0
        # Python delivers signals to the main thread only, and only it may install handlers: a run in another thread
        # (a sweep's worker, a web app's) trains without them.
        self.active = threading.current_thread() is threading.main_thread()
        self._previous: dict[int, Any] = {}
        for signum in signums:
            self.watch(signum)

    def watch(self, signum: signal.Signals) -> None:
        """Note `signum` too from now on (restored with the others); a warning noted while starting up counts."""
        if self.active and signum not in self._previous:
            self._previous[signum] = previous = signal.signal(signum, self._note)
            if isinstance(previous, EarlyWarning) and not self.received:
                self.received = previous.take()
                self.noted_at = time.monotonic()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.received and not self._same_stop(signum, now):
            # Someone insists: not waited for (a rank stuck in a collective never reaches the next step).
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        if not self.received:
            # Only a flag: saving here could interrupt a collective half-way. The trainer acts after the step.
            self.received, self.noted_at = signum, now

    def _same_stop(self, signum: int, now: float) -> bool:
        # At the time limit slurmd sends SIGTERM, SIGCONT, SIGTERM within milliseconds: one stop, which must still
        # checkpoint. A repeated USR2 is only the warning again (`scancel --full` reaches the relay and the ranks).
        return signum == signal.SIGUSR2 or (signum == self.received and now - self.noted_at < REPEAT_WINDOW_S)

    def restore(self) -> None:
        """Reinstall the handlers that were there before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@functools.cache  # one watcher per process, however many runs it starts
def stop_when_orphaned(interval_s: float = 1.0) -> None:
    """Send this rank SIGTERM once the process that started it is gone, so that it saves and stops with the others.

    torchrun starts its workers in sessions of their own: SIGKILLed, it leaves them training, unwatched, where a
    restarted job would start a second set writing into the same output_dir.
    """
    process, launcher = ddp_trainer.STARTED_BY
    if process != os.getpid():  # forked since the import: its launcher is the process that forked it
        launcher = os.getppid()
    if launcher == 1:  # started without a parent to outlive (torchrun as a container's init)
        return

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(interval_s)
        with contextlib.suppress(OSError):  # the launcher's output pipe may have gone with it
            print(f"ddp-trainer: the launcher (pid {launcher}) of this rank is gone: it stops", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def stop_origin(stop: StopSignals, env: DistEnv) -> str:
    """Which ranks had the stop signal, where some had none (a node's launcher gone); empty when every rank had it.

    A collective: every rank calls it, after the stop's save, which gave a signal sent to all time to arrive.
    """
    try:
        had = gather_objects(stop.received, env)
    except RuntimeError as error:
        if not is_peer_failure(error):
            raise
        return ""  # a rank lost as the run stopped (its save failed): the run's last exchange names it in one line
    if all(had):
        return ""
    return f" (sent to rank {', '.join(str(rank) for rank, signum in enumerate(had) if signum)} only: see its output)"
