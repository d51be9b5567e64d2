"""The training sampler that splits a map-style dataset across ranks, padded and resumable; per-sample seeds."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sized
from typing import Any, NamedTuple

from torch.utils.data import Dataset, DistributedSampler

from ddp_trainer.rng import SAMPLE_AUGMENTATION, mixed_seed, seeded


class SampleKey(NamedTuple):
    """A training sample's index and the epoch it is drawn in: together they seed its random augmentation."""

    epoch: int
    index: int


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch) that can start an epoch part-way, for mid-epoch resume."""

    def __init__(
        self, dataset: Sized, batch_size: int, num_replicas: int, rank: int, seed: int, keys: bool = False
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size, self.start_index, self.keys = batch_size, 0, keys

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning, in its own seed-reproducible order."""
        super().set_epoch(epoch)
        self.start_index = 0

    def position(self, batches_done: int) -> dict[str, Any]:
        """Checkpointable position after `batches_done` more batches on every rank."""
        samples_done = self.start_index + batches_done * self.batch_size
        return {"epoch": self.epoch, "world_size": self.num_replicas, "samples_done": samples_done}

    def resume(self, position: dict[str, Any]) -> bool:
        """Continue a stored position; False (the epoch restarts) if the world size changed (positions are per rank),
        or it is below 0 (a file made by hand). Past the end it is the epoch's end: a short last batch counts whole."""
        self.set_epoch(position["epoch"])
        if position["world_size"] != self.num_replicas or position["samples_done"] < 0:
            return False
        self.start_index = position["samples_done"]
        return True

    def __iter__(self) -> Iterator[int | SampleKey]:
        indices = itertools.islice(super().__iter__(), self.start_index, None)
        return (SampleKey(self.epoch, index) for index in indices) if self.keys else indices

    def __len__(self) -> int:
        return max(self.num_samples - self.start_index, 0)


class PerSampleSeeded(Dataset):
    """A training set whose random augmentation is seeded by (seed, epoch, index), not by a worker's RNG stream.

    Worker RNG streams depend on where an epoch started and on the worker count, so a resumed epoch would
    augment its remaining samples differently; a seed per sample makes them the same as in an uninterrupted run.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> Any:
        with seeded(mixed_seed(SAMPLE_AUGMENTATION, self.seed, key.epoch, key.index)):
            return self.dataset[key.index]
