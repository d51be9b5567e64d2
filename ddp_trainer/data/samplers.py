"""Samplers that split a map-style dataset across ranks: padded and resumable for training, exact for evaluation."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sized
from typing import Any

from torch.utils.data import DistributedSampler, Sampler


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch) that can start an epoch part-way, for mid-epoch resume."""

    def __init__(self, dataset: Sized, batch_size: int, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size, self.start_index = batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning, in its own seed-reproducible order."""
        super().set_epoch(epoch)
        self.start_index = 0

    def position(self, batches_done: int) -> dict[str, Any]:
        """Checkpointable position after `batches_done` more batches on every rank."""
        samples_done = self.start_index + batches_done * self.batch_size
        return {"epoch": self.epoch, "world_size": self.num_replicas, "samples_done": samples_done}

    def resume(self, position: dict[str, Any]) -> bool:
        """Continue a stored position; False (the epoch restarts) if the world size changed: positions are per rank."""
        self.set_epoch(position["epoch"])
        if position["world_size"] != self.num_replicas:
            return False
        self.start_index = position["samples_done"]
        return True

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start_index, None)

    def __len__(self) -> int:
        return max(self.num_samples - self.start_index, 0)


class UnpaddedDistributedSampler(Sampler[int]):
    """Rank r takes indices r, r + world, r + 2*world, ...: every sample exactly once, ranks may differ by one.

    DistributedSampler pads the last ranks with repeated samples so counts match; for evaluation that would
    count some samples twice. Evaluation runs no collective per batch, so uneven counts are safe here.
    """

    def __init__(self, dataset_size: int, world_size: int, rank: int) -> None:
        self.indices = range(rank, dataset_size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
