"""Sharded streams: every record once per epoch, the same number of batches on every rank, resumable mid-epoch.

The plan of an epoch is a pure function of (shard sizes, seed, epoch, world size, batch size):
1. shards in a seeded order, their records in file order, shuffled within windows of `shuffle_buffer` records;
2. that sequence cut into `world_size x batches_per_rank` balanced batches (sizes differ by at most one, none
   larger than `batch_size`), rank r taking a contiguous run of them so it reads few shards;
3. DataLoader worker w of W taking its rank's batches w, w+W, ...; the DataLoader's round-robin over workers
   then yields them in plan order, whatever W is.
Every rank gets the same number of batches, so DDP's gradient all_reduce never waits on a finished rank, and no
record is dropped or repeated. A mid-epoch position is a list of segments (world size, batch size, batches done):
resuming removes exactly the records those segments consumed, also when the world size changed.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from ddp_trainer.errors import UsageError

Segment = tuple[int, int, int]  # (world_size, batch_size, batches done per rank)


def epoch_sequence(counts: Sequence[int], seed: int, epoch: int, shuffle: bool, window: int) -> np.ndarray:
    """Global record ids of one epoch in reading order: shard order and windowed shuffle from (seed, epoch)."""
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(counts)) if shuffle else np.arange(len(counts))
    pieces = [np.arange(offsets[shard], offsets[shard + 1]) for shard in order]
    sequence = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if shuffle and window > 1:
        for start in range(0, len(sequence), window):
            rng.shuffle(sequence[start : start + window])  # shuffles the view in place
    return sequence


def balanced_batches(sequence: np.ndarray, world_size: int, batch_size: int) -> list[list[np.ndarray]]:
    """[rank][batch] -> record ids: the same number of non-empty batches on every rank, each record once."""
    if len(sequence) < world_size:  # no batch size helps: some rank would have no record at all
        raise UsageError(
            f"{len(sequence)} records cannot give each of {world_size} ranks a batch without repeating a record; "
            "train on fewer ranks"
        )
    per_rank = math.ceil(len(sequence) / world_size)
    batches_per_rank = math.ceil(per_rank / batch_size)
    if len(sequence) < world_size * batches_per_rank:
        raise UsageError(
            f"data.batch_size={batch_size}: {len(sequence)} records cannot fill the same number of batches on "
            f"{world_size} ranks without repeating a record; use a larger data.batch_size"
        )
    batches = np.array_split(sequence, world_size * batches_per_rank)
    return [batches[rank * batches_per_rank : (rank + 1) * batches_per_rank] for rank in range(world_size)]


def remaining_records(sequence: np.ndarray, segments: Sequence[Segment]) -> np.ndarray:
    """The records of `sequence` that the given segments of an epoch have not consumed, in order."""
    for world_size, batch_size, done in segments:
        plan = balanced_batches(sequence, world_size, batch_size)
        consumed = [batch for rank_batches in plan for batch in rank_batches[:done]]
        if consumed:
            sequence = sequence[~np.isin(sequence, np.concatenate(consumed))]
    return sequence


class ShardedIterableDataset(IterableDataset):
    """A stream of shard files split across ranks and DataLoader workers; yields whole batches.

    Subclasses implement `load_shard(path)`, returning a random-access sequence of samples, and may override
    `count_records` (e.g. from an index) and `collate`. Use with `DataLoader(dataset, batch_size=None)`.
    """

    def __init__(
        self,
        shards: Sequence[Path],
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        counts: Sequence[int] | None = None,
        balanced: bool = True,
    ) -> None:
        self.shards = [Path(shard) for shard in shards]
        self.counts = list(counts) if counts is not None else [self.count_records(path) for path in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.shuffle_buffer, self.balanced = seed, shuffle, shuffle_buffer, balanced
        self.epoch, self.segments = 0, []
        self._plan_cache: tuple[tuple[Any, ...], list[np.ndarray]] | None = None
        # The shards one shuffle window can span: its two ends, and as many whole shards as fit in it. Sized by the
        # smallest shards together, not by the smallest alone: one remainder shard of a record would hold them all.
        smallest_first = np.cumsum(sorted(count for count in self.counts if count))
        self.cache_size = 3 + int(np.searchsorted(smallest_first, shuffle_buffer))

    def load_shard(self, path: Path) -> Sequence[Any]:
        """All samples of one shard, indexable by position."""
        raise NotImplementedError

    def count_records(self, path: Path) -> int:
        """Number of records in one shard (default: load it and count)."""
        return len(self.load_shard(path))

    def collate(self, samples: list[Any]) -> Any:
        """Turn a list of samples into a batch."""
        return default_collate(samples)

    def __len__(self) -> int:
        return len(self.rank_plan())

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (a new shard order and shuffle)."""
        self.epoch, self.segments = epoch, []

    def position(self, batches_done: int) -> dict[str, Any]:
        """Checkpointable position after `batches_done` batches of the current segment on every rank."""
        segments = [*self.segments, (self.world_size, self.batch_size, batches_done)]
        if len(segments) > 1 and segments[-2][:2] == segments[-1][:2]:
            segments[-2:] = [(self.world_size, self.batch_size, segments[-2][2] + batches_done)]
        return {"epoch": self.epoch, "segments": [list(segment) for segment in segments]}

    def resume(self, position: dict[str, Any]) -> bool:
        """Continue an epoch at a stored position; exact at any world size, so always True."""
        self.epoch, self.segments = position["epoch"], [tuple(segment) for segment in position["segments"]]
        return True

    def rank_plan(self) -> list[np.ndarray]:
        """Record ids of each batch this rank yields from the current position to the end of the epoch."""
        key = (self.epoch, tuple(self.segments))
        if self._plan_cache is None or self._plan_cache[0] != key:  # len() and iter() both ask, every epoch
            self._plan_cache = (key, self._compute_rank_plan())
        return self._plan_cache[1]

    def _compute_rank_plan(self) -> list[np.ndarray]:
        sequence = epoch_sequence(self.counts, self.seed, self.epoch, self.shuffle, self.shuffle_buffer)
        if not self.balanced:  # evaluation: each record once, counts may differ (evaluation has no collective)
            chunk = np.array_split(sequence, self.world_size)[self.rank]
            return [chunk[start : start + self.batch_size] for start in range(0, len(chunk), self.batch_size)]
        segments, skip = self.segments, 0
        if segments and segments[-1][:2] == (self.world_size, self.batch_size):
            # Same layout as the stored run: continue its very plan, batch for batch.
            segments, skip = segments[:-1], segments[-1][2]
        plan = balanced_batches(remaining_records(sequence, segments), self.world_size, self.batch_size)
        return plan[self.rank][skip:]

    def __iter__(self) -> Iterator[Any]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        cache: OrderedDict[int, Sequence[Any]] = OrderedDict()
        for batch in self.rank_plan()[worker_id::num_workers]:
            shards = np.searchsorted(self.offsets, batch, side="right") - 1
            positions = batch - self.offsets[shards]
            pairs = zip(shards.tolist(), positions.tolist(), strict=True)
            samples = [self._shard(shard, cache)[position] for shard, position in pairs]
            yield self.collate(samples)

    def _shard(self, shard: int, cache: OrderedDict[int, Sequence[Any]]) -> Sequence[Any]:
        if shard not in cache:
            if len(cache) == self.cache_size:  # before the next is read, so no more than cache_size are ever held
                cache.popitem(last=False)  # the shard read longest ago: windows move forward through the shard order
            cache[shard] = self.load_shard(self.shards[shard])
            if len(cache[shard]) != self.counts[shard]:  # a record left out, or one read past the end
                raise UsageError(
                    f"{self.shards[shard]} holds {len(cache[shard])} records, but its index says {self.counts[shard]}"
                )
        return cache[shard]

    def first_sample(self) -> Any:
        """One sample, to learn the input shape."""
        shard = next((index for index, count in enumerate(self.counts) if count), None)
        if shard is None:
            raise UsageError(f"the stream in {self.shards[0].parent if self.shards else '?'} has no records")
        return self.load_shard(self.shards[shard])[0]
