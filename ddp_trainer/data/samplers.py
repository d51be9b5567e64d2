"""Samplers that split a map-style dataset across ranks: padded and resumable for training, exact for evaluation."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from torch.utils.data import DistributedSampler, Sampler


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch) that can start an epoch part-way, for mid-epoch resume."""

    start_index: int = 0

    def set_start_index(self, start_index: int) -> None:
        """Skip this rank's first `start_index` samples of the current epoch's order."""
        self.start_index = start_index

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
