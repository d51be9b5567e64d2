"""Samplers: training order per epoch, resumable positions, evaluation that counts each sample once."""

from __future__ import annotations

import functools

import pytest
import torch

from ddp_trainer import data
from ddp_trainer.config import DataConfig
from ddp_trainer.data.samplers import ResumableDistributedSampler
from ddp_trainer.distributed import DistEnv
from ddp_trainer.rng import RANK_STREAMS, RESEEDED_RANK, SAMPLE_AUGMENTATION, mixed_seed


def validation_batches(size: int, world_size: int, rank: int) -> list[list[int]]:
    """The sample indices of each validation batch (4 per batch) that `rank` of `world_size` evaluates."""
    env = DistEnv(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"), backend=None)
    samples = torch.utils.data.TensorDataset(torch.arange(size))
    return [batch.tolist() for (batch,) in data._val_loader(samples, DataConfig(batch_size=4), env, 0, None)]


@pytest.mark.parametrize(("size", "world_size"), [(359, 2), (10, 3), (7, 8), (1, 1)])
def test_validation_covers_every_index_exactly_once(size, world_size):
    served = [
        index for rank in range(world_size) for batch in validation_batches(size, world_size, rank) for index in batch
    ]
    assert sorted(served) == list(range(size))


def test_padded_training_sampler_would_double_count_validation():
    samplers = [ResumableDistributedSampler(range(359), 8, num_replicas=2, rank=rank, seed=0) for rank in range(2)]
    padded = [index for sampler in samplers for index in sampler]
    assert len(padded) == 360  # why validation takes every world_size-th sample instead


def test_resume_skips_exactly_the_consumed_batches():
    sampler = ResumableDistributedSampler(range(50), 5, num_replicas=2, rank=1, seed=3)
    sampler.set_epoch(4)
    full = list(sampler)
    position = sampler.position(batches_done=2)
    sampler.set_epoch(0)
    assert sampler.resume(position) is True
    assert list(sampler) == full[10:]
    assert len(sampler) == len(full) - 10


def test_resume_at_another_world_size_restarts_the_epoch():
    stored = ResumableDistributedSampler(range(50), 5, num_replicas=2, rank=0, seed=3)
    stored.set_epoch(1)
    sampler = ResumableDistributedSampler(range(50), 5, num_replicas=1, rank=0, seed=3)
    assert sampler.resume(stored.position(batches_done=2)) is False
    assert len(list(sampler)) == 50 and sampler.epoch == 1


def test_a_position_below_zero_restarts_the_epoch_and_one_past_the_end_ends_it():
    # A file made by hand: -5 was islice's ValueError traceback at the first batch.
    sampler = ResumableDistributedSampler(range(50), 10, num_replicas=2, rank=0, seed=3)
    assert sampler.resume({**sampler.position(batches_done=2), "epoch": 1, "samples_done": -5}) is False
    assert len(list(sampler)) == 25 and sampler.epoch == 1
    # 3 batches of 10 is past the rank's 25 samples: saved after its short last batch, the epoch is done.
    assert sampler.resume(sampler.position(batches_done=3)) is True
    assert list(sampler) == [] and len(sampler) == 0


def test_order_depends_on_seed_and_epoch_only():
    def order(seed: int, epoch: int) -> list[int]:
        sampler = ResumableDistributedSampler(range(64), 8, num_replicas=1, rank=0, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(5, 2)) == list(range(64))


def test_a_validation_rank_takes_every_world_sizeth_sample_from_its_own():
    assert validation_batches(11, 2, 1) == [[1, 3, 5, 7], [9]]


def test_rank_streams_of_neighbouring_seeds_share_nothing():
    # seed + rank gave rank 1 of seed 0 the streams of rank 0 of seed 1, and wrapped the largest seed's rank 1 to 0.
    ranks = functools.partial(mixed_seed, RANK_STREAMS)
    assert ranks(0, 1) != ranks(1, 0) and ranks(2**32 - 1, 1) != ranks(0, 0)
    assert ranks(0, 1) == ranks(0, 1) and all(0 <= ranks(2**32 - 1, rank) < 2**32 for rank in range(8))
    # SeedSequence drops trailing zeros: without the use, rank 1's streams were sample 0's augmentation in epoch 1.
    assert ranks(0, 1) != mixed_seed(SAMPLE_AUGMENTATION, 0, 1, 0) != mixed_seed(RESEEDED_RANK, 0, 1, 0)
