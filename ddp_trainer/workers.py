"""DataLoader workers: they ignore stop signals, and this process stops them on every way out."""

from __future__ import annotations

import atexit
import signal
import weakref
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from ddp_trainer.preemption import STOP_SIGNALS


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: SLURM signals every process of a step; workers must outlive the checkpoint."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked since the fork: one that came is dropped


# Weak: an iterator that goes away as usual stops its own workers (its __del__).
_ITERATORS_WITH_WORKERS: weakref.WeakSet = weakref.WeakSet()


class StopProofLoader(DataLoader):
    """A DataLoader whose workers ignore stop signals, and whose workers this process stops on every way out.

    Exiting, multiprocessing sends its daemonic children SIGTERM and waits for them without a timeout: a rank that
    raised, its loader still held by the traceback, would wait forever for workers that ignore SIGTERM, and so would
    its torchrun or SLURM job.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, worker_init_fn=ignore_stop_signals, **kwargs)

    def _get_iterator(self) -> Iterator[Any]:
        # Workers start with the stop signals blocked until worker_init_fn ignores them: before it, torch's worker
        # handler makes a SIGTERM from anyone but the parent fatal, and torchrun and SLURM signal every process.
        # Here they wait too: this process notes one that came once its workers exist.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            iterator = super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if self.num_workers:
            _ITERATORS_WITH_WORKERS.add(iterator)
        return iterator


def stop_loader_workers() -> None:
    """Ask the workers of every loader iterator still alive to finish; kill those still running 5 s later."""
    for iterator in list(_ITERATORS_WITH_WORKERS):
        iterator._shutdown_workers()  # what the iterator's __del__ runs (private: torch has no public way)
        for worker in iterator._workers:
            if worker.is_alive():  # stuck (on a dead filesystem, say): the SIGTERM torch sends it is ignored
                worker.kill()


# torch imported multiprocessing and its own exit handlers before this line: handlers run last in, first out, so
# the workers are stopped before multiprocessing waits for them (and before torch turns the shutdown into a no-op).
atexit.register(stop_loader_workers)
