"""Samplers: training order per epoch, resumable positions, evaluation that counts each sample once."""

from __future__ import annotations

import pytest
import torch

from ddp_trainer.data.samplers import ResumableDistributedSampler, UnpaddedDistributedSampler


@pytest.mark.parametrize(("size", "world_size"), [(359, 2), (10, 3), (7, 8), (1, 1)])
def test_unpadded_sampler_covers_every_index_exactly_once(size, world_size):
    served = [index for rank in range(world_size) for index in UnpaddedDistributedSampler(size, world_size, rank)]
    assert sorted(served) == list(range(size))


def test_padded_training_sampler_would_double_count_validation():
    padded = [i for rank in range(2) for i in ResumableDistributedSampler(range(359), num_replicas=2, rank=rank)]
    assert len(padded) == 360  # why evaluation uses the unpadded sampler


def test_start_index_skips_exactly_the_consumed_prefix():
    sampler = ResumableDistributedSampler(range(50), num_replicas=2, rank=1, seed=3)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_start_index(10)
    assert list(sampler) == full[10:]
    assert len(sampler) == len(full) - 10


def test_order_depends_on_seed_and_epoch_only():
    def order(seed: int, epoch: int) -> list[int]:
        sampler = ResumableDistributedSampler(range(64), num_replicas=1, rank=0, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(5, 2)) == list(range(64))


def test_unpadded_sampler_works_in_a_dataloader():
    loader = torch.utils.data.DataLoader(range(11), batch_size=4, sampler=UnpaddedDistributedSampler(11, 2, 1))
    assert [batch.tolist() for batch in loader] == [[1, 3, 5, 7], [9]]
