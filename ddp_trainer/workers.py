"""DataLoader workers: they ignore stop signals, must report that they started, and are stopped on every way out.

A worker forked while another thread of this process holds CPython's thread-list lock stops inside the fork for
good (CPython gh-112275: 3.8 to 3.11, until fixed in their later releases). gloo's threads take that lock whenever a
finished collective frees a tensor Python made, so a rank that forks its validation workers right after an all_reduce
sometimes meets it. A worker reports from its worker_init_fn; one that has not within WORKER_START_S never will, so
the loader forks its workers again.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils import signal_handling

from ddp_trainer.preemption import STOP_SIGNALS

WORKER_START_S = 30.0  # a forked worker reaches its worker_init_fn within milliseconds, even on a busy node
START_TRIES = 3
_ID_BYTES = 4  # a pipe write of fewer than PIPE_BUF bytes is never split: each worker's id arrives whole

_report_to: int | None = None  # the pipe workers forked now write their id to (a copy of this process's memory)
_FORKING = threading.Lock()  # one loader at a time sets _report_to and forks (the API may run in several threads)


def init_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: ignore stop signals (workers must outlive the checkpoint); report having started."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked since the fork: one that came is dropped
    if _report_to is not None:  # a report the loader no longer waits for stays unread in the pipe
        os.write(_report_to, worker_id.to_bytes(_ID_BYTES, "little"))


# Weak: an iterator that goes away as usual stops its own workers (its __del__).
_ITERATORS_WITH_WORKERS: weakref.WeakSet = weakref.WeakSet()


class StopProofLoader(DataLoader):
    """A DataLoader whose workers ignore stop signals, are forked again if one never starts, and are stopped by this
    process on every way out.

    Exiting, multiprocessing sends its daemonic children SIGTERM and waits for them without a timeout: a rank that
    raised, its loader still held by the traceback, would wait forever for workers that ignore SIGTERM, and so would
    its torchrun or SLURM job.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, worker_init_fn=init_worker, **kwargs)

    def _get_iterator(self) -> Iterator[Any]:
        # Worker seeds (and a random sampler's order) are drawn as workers start: a second start draws the same ones.
        generator = self.generator or torch.default_generator
        drawn = generator.get_state()
        for _ in range(START_TRIES):
            iterator, silent = self._start_workers()
            if not silent:
                return iterator
            _abandon(iterator, silent)
            generator.set_state(drawn)
            print(
                f"ddp-trainer: {len(silent)} of {self.num_workers} DataLoader workers did not start within "
                f"{WORKER_START_S:g} s (stuck in their fork): starting the workers again",
                file=sys.stderr,
            )
        raise RuntimeError(
            f"DataLoader workers did not start within {WORKER_START_S:g} s, {START_TRIES} times: each stopped inside "
            "its fork (a lock another thread held); data.num_workers=0 loads without forking"
        )

    def _start_workers(self) -> tuple[Iterator[Any], set[int]]:
        """A new iterator, and the ids of its workers that did not report starting in time."""
        global _report_to
        # No worker, or none that copies this process's locks: none can be stuck on one. (Workers first: asking for
        # the default context fixes multiprocessing's start method, which a loader without workers must leave alone.)
        if (
            not self.num_workers
            or (self.multiprocessing_context or multiprocessing.get_context()).get_start_method() != "fork"
        ):
            return self._new_iterator(), set()
        with _FORKING:
            read_end, _report_to = os.pipe()
            try:
                iterator = self._new_iterator()
            except BaseException:
                os.close(read_end)
                raise
            finally:
                os.close(_report_to)  # the workers have their copies
                _report_to = None
        try:
            return iterator, _unreported(read_end, self.num_workers)
        finally:
            os.close(read_end)

    def _new_iterator(self) -> Iterator[Any]:
        # Workers start with the stop signals blocked until worker_init_fn ignores them: before it, torch's worker
        # handler makes a SIGTERM from anyone but the parent fatal, and torchrun and SLURM signal every process.
        # Here they wait too: this process notes one that came once its workers exist.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            iterator = super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if self.num_workers:  # at once: a Ctrl-C while they report must not leave them running
            _ITERATORS_WITH_WORKERS.add(iterator)
        return iterator


def _unreported(read_end: int, workers: int) -> set[int]:
    """The ids of the workers that have not written theirs to `read_end` within WORKER_START_S."""
    silent, deadline = set(range(workers)), time.monotonic() + WORKER_START_S
    reports_ready = select.poll()  # not select.select: a rank may hold more than its 1,024 descriptors
    reports_ready.register(read_end, select.POLLIN)
    while silent and reports_ready.poll(max(0.0, deadline - time.monotonic()) * 1000):
        reports = os.read(read_end, _ID_BYTES * workers)
        if not reports:  # every worker of this iterator has exited
            break
        silent -= {int.from_bytes(reports[at : at + _ID_BYTES], "little") for at in range(0, len(reports), _ID_BYTES)}
    return silent


def _abandon(iterator: Any, silent: set[int]) -> None:
    """Stop an iterator whose `silent` workers never started: they are killed (a fork stuck that early blocks the
    SIGTERM torch would send), the others stopped as usual."""
    signal_handling._remove_worker_pids(id(iterator))  # else torch's SIGCHLD handler reports the kill as a crash
    iterator._worker_pids_set = False
    for worker_id in silent:
        iterator._workers[worker_id].kill()
    _stop(iterator)


def _stop(iterator: Any) -> None:
    """Ask an iterator's workers to finish; kill those still running 5 s later."""
    iterator._shutdown_workers()  # what the iterator's __del__ runs (private: torch has no public way)
    for worker in iterator._workers:
        if worker.is_alive():  # stuck (on a dead filesystem, say): the SIGTERM torch sends it is ignored
            worker.kill()


def stop_loader_workers() -> None:
    """Ask the workers of every loader iterator still alive to finish; kill those still running 5 s later."""
    for iterator in list(_ITERATORS_WITH_WORKERS):
        _stop(iterator)


# torch imported multiprocessing and its own exit handlers before this line: handlers run last in, first out, so
# the workers are stopped before multiprocessing waits for them (and before torch turns the shutdown into a no-op).
atexit.register(stop_loader_workers)
