"""A user's IterableDataset on N ranks x W DataLoader workers: each record read by exactly one of the N x W readers.

The dataset sees, through `torch.utils.data.get_worker_info()`, one reader among all ranks' workers: `id` in
0..N*W-1 and `num_workers` N*W, so a dataset that splits itself across DataLoader workers (the PyTorch docs'
pattern) splits across ranks too. A dataset that never asks is split here: each reader keeps every (N*W)-th record.
Readers batch their own records; ranks may end up with different batch counts, which `feeds.AgreedFeed` handles.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist
from torch.utils.data import IterableDataset, default_collate, get_worker_info
from torch.utils.data._utils import worker as worker_module

from ddp_trainer.errors import UsageError
from ddp_trainer.workers import StopProofLoader

# The slot of a batch that is not for training: a stand-in for a rank whose part of a resumed epoch is empty.
SPARE = -1


class ReaderInfo:
    """What `get_worker_info()` returns to the user's dataset: one reader among all ranks' workers."""

    def __init__(self, reader: int, readers: int, seed: int, dataset: IterableDataset) -> None:
        self._id, self._num_workers, self.seed, self.dataset = reader, readers, seed, dataset
        self.read = False  # whether the dataset asked who it is, i.e. splits its records itself
        self.read_count = False  # whether it asked how many readers there are: a split needs that, a seed does not
        self.asked_rank = False  # whether it asked torch.distributed for its rank, to split by rank too

    @property
    def id(self) -> int:
        """This reader's index among all ranks' DataLoader workers."""
        self.read = True
        return self._id

    @property
    def num_workers(self) -> int:
        """How many readers share the stream: ranks x DataLoader workers."""
        self.read = self.read_count = True
        return self._num_workers


@contextlib.contextmanager
def presenting(info: ReaderInfo) -> Iterator[None]:
    """Make `get_worker_info()` return `info` inside the block (the DataLoader's own info outside it), and note in
    `info` a call of `torch.distributed.get_rank()` from this thread."""
    previous, worker_module._worker_info = worker_module._worker_info, info
    c10d, reading = dist.distributed_c10d, threading.get_ident()
    default_group = c10d._get_default_group

    def noted() -> dist.ProcessGroup:
        # Met inside get_rank however the dataset holds it: `from torch.distributed import get_rank`, bound at its
        # import, never saw a patched dist.get_rank. Not another thread's call (a save's).
        asked = sys._getframe(1).f_code is c10d.get_rank.__code__ and threading.get_ident() == reading
        info.asked_rank = info.asked_rank or asked
        return default_group()

    c10d._get_default_group = noted
    try:
        yield
    finally:
        c10d._get_default_group = default_group
        worker_module._worker_info = previous


class RankShardedStream(IterableDataset):
    """Wraps a user's IterableDataset: this rank's readers' records in batches, as (reader slot, batch) pairs.

    Resumable mid-epoch: a position counts the batches trained from each reader slot; a resumed reader skips its
    records of those batches, which is exact when the dataset yields the same records in the same order for the
    same epoch and reader (see docs/streaming.md).
    """

    def __init__(
        self,
        dataset: IterableDataset,
        batch_size: int,
        rank: int,
        world_size: int,
        workers: int,
        seed: int,
        collate: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.workers, self.seed, self.collate = max(workers, 1), seed, collate or default_collate
        self.passes = 0  # passes its StreamLoader started: only the first warns of a dataset that splits nothing
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning; a dataset with `set_epoch` of its own (to reshuffle) hears it too."""
        self.epoch, self.first_slot = epoch, 0
        self.skipped = [0] * self.workers  # batches each reader slot skips: those trained before a resume
        self.slots: list[int] = []  # the reader slot of each batch handed out since the epoch (or resume) started
        if callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(epoch)

    def handed_out(self, slot: int) -> None:
        """Note that a batch of reader `slot` went to the trainer."""
        self.slots.append(slot)

    def position(self, batches_done: int) -> dict[str, Any]:
        """This rank's position after training the first `batches_done` batches handed out: batches per slot."""
        trained = list(self.skipped)
        for slot in self.slots[:batches_done]:
            trained[slot] += 1
        # The DataLoader takes its workers' batches round robin: the slot after the last trained one comes next.
        first_slot = (self.slots[batches_done - 1] + 1) % self.workers if batches_done else self.first_slot
        return {**self._layout(), "epoch": self.epoch, "trained": trained, "first_slot": first_slot}

    def resume(self, position: dict[str, Any]) -> bool:
        """Continue this rank's part of an epoch; False (restart the epoch) if ranks, workers or batch size changed."""
        self.set_epoch(position["epoch"])
        if {key: position[key] for key in self._layout()} != self._layout():
            return False
        self.skipped, self.first_slot = list(position["trained"]), position["first_slot"]
        return True

    def _layout(self) -> dict[str, int]:
        return {"world_size": self.world_size, "workers": self.workers, "batch_size": self.batch_size}

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        # Not a generator: a loader without workers calls this before it counts the pass, as workers copy it then.
        return self._pass(warn=self.passes == 0)

    def _pass(self, warn: bool) -> Iterator[tuple[int, Any]]:
        worker = get_worker_info()
        local = worker.id if worker is not None else 0
        # Rotated so that the DataLoader's first worker serves the reader whose batch came next when saved.
        slot = (local + self.first_slot) % self.workers
        reader, readers = self.rank * self.workers + slot, self.world_size * self.workers
        seed = ((self.seed * 1_000_003 + self.epoch) * 65_537 + reader) % 2**64  # torch.manual_seed takes it
        # A copy per pass, as a new DataLoader worker has: a dataset that narrows its own range in __iter__ (the
        # PyTorch docs' worker_init_fn split, moved there) would narrow further each pass in this process.
        info = ReaderInfo(reader, readers, seed, copy.copy(self.dataset))
        skip, spare, yielded = self.skipped[slot], None, False
        for records in self._batches(info, warn):
            if skip:  # trained before the resume
                skip, spare = skip - 1, records
                continue
            yielded = True
            yield slot, self.collate(records)
        if not yielded and spare is not None:
            yield SPARE, self.collate(spare)  # this reader's part was all trained: a stand-in for the feed

    def _batches(self, info: ReaderInfo, warn: bool) -> Iterator[list[Any]]:
        records = self._records(info, warn)
        while batch := list(itertools.islice(records, self.batch_size)):  # the last one may be short
            yield batch

    def _records(self, info: ReaderInfo, warn: bool) -> Iterator[Any]:
        """The records of reader `info.id`: split by the dataset if it asked who it is, else every readers-th one."""
        with presenting(info):
            source = iter(info.dataset)
        for index in itertools.count():
            with presenting(info):
                record = next(source, _END)
            if info.asked_rank and self.world_size > 1:  # also where its split left this reader no record
                raise UsageError(
                    f"{type(self.dataset).__name__} asks torch.distributed for its rank: get_worker_info() already "
                    f"names one of all {info._num_workers} readers (ranks x workers), so a split by rank too drops "
                    "records; split by get_worker_info().id and .num_workers alone"
                )
            if record is _END:
                return
            if warn and index == 0 and not info.read_count and info._num_workers > 1 and info._id == 0:
                warnings.warn(_unsplit(type(self.dataset).__name__, info), stacklevel=1)
            if info.read or index % info._num_workers == info._id:
                yield record


class StreamLoader(StopProofLoader):
    """The DataLoader of a `RankShardedStream`: it counts the passes it starts."""

    def _get_iterator(self) -> Iterator[Any]:
        iterator = super()._get_iterator()  # its workers copied the stream here, each epoch anew
        self.dataset.passes += 1
        return iterator


def _unsplit(name: str, info: ReaderInfo) -> str:
    """The warning for a dataset that never asked how many readers there are: it may not split its records."""
    readers = f"each of the {info._num_workers} readers (ranks x workers)"
    if info.read:  # `id` alone: a split that keeps reader 0's records only, or a seed
        return (
            f"{name} reads get_worker_info().id alone: taken as splitting its records itself; if it only seeds from "
            f"id, {readers} trains on all of them"
        )
    return f"{name} does not read get_worker_info(): {readers} reads all records and keeps every one of theirs"


_END = object()
