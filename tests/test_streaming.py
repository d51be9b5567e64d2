"""Sharded streams in one process: the epoch plan, DataLoader workers, positions and resume."""

from __future__ import annotations

import itertools
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ddp_trainer.data.stream_formats import JsonlShards, NpzShards, read_index
from ddp_trainer.data.streaming import (
    ShardedIterableDataset,
    balanced_batches,
    epoch_sequence,
    remaining_records,
)
from ddp_trainer.errors import UsageError
from ddp_trainer.fields import SHAPE

SHARD_SIZES = [0, 37, 5, 60]  # uneven, one empty, fewer files than 2 ranks x 3 workers


class InMemoryShards(ShardedIterableDataset):
    """Shard 'files' named by their index; record ids are global positions, so consumption is checkable."""

    def __init__(self, sizes: list[int], **options) -> None:
        self.sizes = sizes
        super().__init__([Path(str(index)) for index in range(len(sizes))], **options)

    def load_shard(self, path: Path) -> list[torch.Tensor]:
        start = sum(self.sizes[: int(path.name)])
        return [torch.tensor(start + offset) for offset in range(self.sizes[int(path.name)])]


def stream(rank: int = 0, world_size: int = 1, batch_size: int = 8, **options) -> InMemoryShards:
    return InMemoryShards(SHARD_SIZES, batch_size=batch_size, rank=rank, world_size=world_size, **options)


def consumed(dataset: ShardedIterableDataset, workers: int, batches: int | None = None) -> list[list[int]]:
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    return [batch.tolist() for batch in itertools.islice(loader, batches)]


def flatten(batches: list[list[int]]) -> list[int]:
    return [record for batch in batches for record in batch]


@pytest.mark.parametrize(("size", "world_size", "batch_size"), [(102, 2, 8), (1438, 2, 32), (7, 3, 2), (64, 4, 16)])
def test_every_rank_gets_the_same_number_of_batches_and_every_record_once(size, world_size, batch_size):
    plan = balanced_batches(np.arange(size), world_size, batch_size)
    assert len({len(rank_batches) for rank_batches in plan}) == 1
    sizes = [len(batch) for rank_batches in plan for batch in rank_batches]
    assert min(sizes) >= 1 and max(sizes) <= batch_size
    assert sorted(np.concatenate([b for rank_batches in plan for b in rank_batches]).tolist()) == list(range(size))


def test_impossible_balance_is_refused_with_what_to_change():
    with pytest.raises(UsageError, match="data.batch_size=1: .* use a larger data.batch_size"):
        balanced_batches(np.arange(3), 2, 1)
    with pytest.raises(UsageError, match="^3 records cannot give each of 4 ranks a batch .*; train on fewer ranks$"):
        balanced_batches(np.arange(3), 4, 64)  # no batch size helps


def test_order_differs_by_epoch_and_repeats_by_seed():
    assert np.array_equal(epoch_sequence(SHARD_SIZES, 0, 1, True, 16), epoch_sequence(SHARD_SIZES, 0, 1, True, 16))
    assert not np.array_equal(epoch_sequence(SHARD_SIZES, 0, 1, True, 16), epoch_sequence(SHARD_SIZES, 0, 2, True, 16))
    assert not np.array_equal(epoch_sequence(SHARD_SIZES, 0, 1, True, 16), epoch_sequence(SHARD_SIZES, 1, 1, True, 16))
    assert sorted(epoch_sequence(SHARD_SIZES, 3, 0, True, 16).tolist()) == list(range(102))


def test_shuffle_buffer_bounds_how_far_a_record_moves_within_the_shard_order():
    unshuffled_within = epoch_sequence([50, 50], 0, 0, True, 1)
    windowed = epoch_sequence([50, 50], 0, 0, True, 10)
    for start in range(0, 100, 10):
        assert sorted(windowed[start : start + 10]) == sorted(unshuffled_within[start : start + 10])
    assert not np.array_equal(windowed, unshuffled_within)


class Held(list):
    """A shard's records, in a list that a weak reference can watch."""


class CountedShards(InMemoryShards):
    """Shards that count how many were read, and the most held at once."""

    def __init__(self, sizes: list[int], **options) -> None:
        self.loads, self.held, self.most_held = 0, 0, 0
        super().__init__(sizes, **options)

    def load_shard(self, path: Path) -> Held:
        shard = Held(super().load_shard(path))
        weakref.finalize(shard, self.dropped)
        self.loads, self.held = self.loads + 1, self.held + 1
        self.most_held = max(self.most_held, self.held)
        return shard

    def dropped(self) -> None:
        self.held -= 1


def test_a_small_remainder_shard_does_not_make_a_reader_hold_every_shard():
    # A window of 1,000 records spans at most 7 shards of 200: its two ends and 5 whole ones. Sized by the 1-record
    # shard alone, the cache held up to 1,002 shards: here all 21, in every DataLoader worker of every rank.
    sizes = [200] * 20 + [1]
    dataset = CountedShards(sizes, counts=sizes, batch_size=8, rank=0, world_size=1, shuffle_buffer=1000)
    assert sorted(torch.cat(list(dataset)).tolist()) == list(range(4001))
    assert dataset.loads == 21  # each shard read once: the cache still holds what a window needs
    assert dataset.most_held <= 8


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_workers_split_a_rank_without_duplicates_in_plan_order(workers):
    dataset = stream(shuffle_buffer=16)
    dataset.set_epoch(2)
    batches = consumed(dataset, workers)
    assert batches == [plan_batch.tolist() for plan_batch in dataset.rank_plan()]
    assert sorted(flatten(batches)) == list(range(102))


@pytest.mark.parametrize("workers", [0, 3])
def test_two_ranks_with_workers_cover_the_epoch_once_with_equal_batch_counts(workers):
    per_rank = [consumed(stream(rank=rank, world_size=2), workers) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    assert sorted(flatten(per_rank[0]) + flatten(per_rank[1])) == list(range(102))


def test_epochs_differ_and_runs_with_one_seed_agree_through_workers():
    def epoch_order(seed: int, epoch: int) -> list[int]:
        dataset = stream(seed=seed)
        dataset.set_epoch(epoch)
        return flatten(consumed(dataset, workers=2))

    assert epoch_order(0, 0) == epoch_order(0, 0)
    assert epoch_order(0, 0) != epoch_order(0, 1)


@pytest.mark.parametrize("workers", [0, 3])
def test_resume_at_the_same_world_size_continues_batch_for_batch(workers):
    whole = consumed(stream(batch_size=4), workers)
    first = stream(batch_size=4)
    head = consumed(first, workers, batches=7)
    resumed = stream(batch_size=4)
    assert resumed.resume(first.position(batches_done=7)) is True
    assert head + consumed(resumed, workers) == whole


@pytest.mark.parametrize("new_world_size", [1, 3])
def test_resume_at_another_world_size_consumes_the_rest_exactly_once(new_world_size):
    before = [stream(rank=rank, world_size=2, batch_size=4) for rank in range(2)]
    seen = [record for dataset in before for record in flatten(consumed(dataset, 0, batches=5))]
    position = before[0].position(batches_done=5)
    for rank in range(new_world_size):
        dataset = stream(rank=rank, world_size=new_world_size, batch_size=4)
        dataset.resume(position)
        seen += flatten(consumed(dataset, 0))
    assert sorted(seen) == list(range(102))


def test_positions_of_two_resumes_in_one_epoch_chain():
    first = stream(batch_size=4)
    seen = flatten(consumed(first, 0, batches=3))
    second = stream(batch_size=4)
    second.resume(first.position(3))
    seen += flatten(consumed(second, 0, batches=4))
    assert second.position(4)["segments"] == [[1, 4, 7]]
    third = stream(batch_size=4)
    third.resume(second.position(4))
    seen += flatten(consumed(third, 0))
    assert sorted(seen) == list(range(102))


def test_remaining_records_removes_what_the_segments_consumed():
    sequence = np.arange(20)
    assert remaining_records(sequence, [(2, 2, 1)]).tolist() == [i for i in range(20) if i not in (0, 1, 10, 11)]


def test_a_shard_that_disagrees_with_its_index_is_named_in_one_line_from_a_worker():
    # Fewer records than the index says would be read past its end; more would be silently left out.
    lying = InMemoryShards(SHARD_SIZES, batch_size=8, rank=0, world_size=1, counts=[0, 30, 5, 60])
    with pytest.raises(UsageError) as raised:
        consumed(lying, workers=1)
    assert str(raised.value) == "1 holds 37 records, but its index says 30"  # the worker's traceback left out


def test_a_broken_npz_shard_or_index_is_named_in_one_line(tmp_path):
    np.savez(tmp_path / "whole.npz", x=np.zeros((3, 4), dtype=np.float32), y=np.arange(3))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "whole.npz").read_bytes()[:100])
    np.savez(tmp_path / "no_labels.npz", x=np.zeros((3, 4), dtype=np.float32))
    options = {"batch_size": 2, "rank": 0, "world_size": 1}
    for name, reason in (("cut.npz", "BadZipFile"), ("no_labels.npz", "KeyError")):
        said = f"^{tmp_path / name}: not an .npz shard with arrays 'x' and 'y' .{reason}"
        with pytest.raises(UsageError, match=said):
            NpzShards([tmp_path / name], input_shape=None, **options)
    # The second was a RecursionError traceback, the third (a Latin-1 file name) a UnicodeDecodeError one.
    for text in (
        b'{"format": "npz", "shards": [',
        b"[" * 100_000,
        '{"shards": [{"file": "\xe9.npz"}]}'.encode("latin-1"),
    ):
        (tmp_path / "index.json").write_bytes(text)
        with pytest.raises(UsageError, match=f"^{tmp_path / 'index.json'} is not valid JSON"):
            read_index(tmp_path)
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "\n")
    with pytest.raises(UsageError, match=r"deep.jsonl:1: not a record with fields 'x' and 'y' \(RecursionError"):
        JsonlShards(
            [tmp_path / "deep.jsonl"], input_field="x", label_field="y", input_shape=None, **options
        ).load_shard(tmp_path / "deep.jsonl")


FORMATS = "expected jsonl or npz, or none for shards of one format"
ONE_SHARD = {"shards": [{"file": "a.npz"}]}


@pytest.mark.parametrize(
    ("index", "problem"),
    [
        ([], 'expected an object whose "shards" lists objects with a "file" name'),
        ({"shards": [{"records": 3}]}, 'expected an object whose "shards" lists objects with a "file" name'),
        ({"shards": [{"file": "a.npz", "records": "3"}]}, "\"records\" of a.npz is '3', not a count"),
        ({"shards": [{"file": "a.npz", "records": -5}]}, '"records" of a.npz is -5, not a count'),
        (
            {"format": "parquet", "shards": [{"file": "a.npz"}]},
            "\"format\" is 'parquet': expected jsonl or npz, or none for shards of one format",
        ),
        (
            {"shards": [{"file": "a.npz"}, {"file": "b.jsonl"}]},
            '"format" is None: expected jsonl or npz, or none for shards of one format',
        ),
        ({**ONE_SHARD, "input_shape": "8x8"}, f"\"input_shape\" is '8x8', not {SHAPE}"),
        ({**ONE_SHARD, "input_shape": [8, 0]}, f'"input_shape" is [8, 0], not {SHAPE}'),
        ({**ONE_SHARD, "classes": "abc"}, "\"classes\" is 'abc', not a list of names"),
        (
            {"shards": [{"file": "../outside.jsonl"}]},
            "\"file\" '../outside.jsonl' is not the name of a file in this folder",
        ),
        ({"shards": [{"file": "/etc/x.npz"}]}, "\"file\" '/etc/x.npz' is not the name of a file in this folder"),
    ],
    ids=[
        "a-list",
        "no-file",
        "records-text",
        "records-negative",
        "format-unknown",
        "formats-mixed",
        "shape-text",
        "shape-zero",
        "classes-text",
        "file-above",
        "file-absolute",
    ],
)
def test_an_index_that_would_misread_the_shards_is_named_in_one_line(tmp_path, index, problem):
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError) as raised:
        read_index(tmp_path)
    assert str(raised.value) == (
        f"{tmp_path / 'index.json'}: {problem} (python -m ddp_trainer.cli.shard writes a valid one)"
    )


def test_an_index_without_a_format_takes_its_files_and_a_shape_that_does_not_fit_is_named(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((3, 8, 8), dtype=np.float32), y=np.arange(3))
    (tmp_path / "index.json").write_text(json.dumps({"shards": [{"file": "a.npz", "records": 3}]}))
    assert read_index(tmp_path)["format"] == "npz"
    options = {"batch_size": 2, "rank": 0, "world_size": 1}
    assert NpzShards([tmp_path / "a.npz"], input_shape=[1, 8, 8], **options).load_shard(tmp_path / "a.npz")[0][
        0
    ].shape == (1, 8, 8)
    with pytest.raises(UsageError) as raised:
        NpzShards([tmp_path / "a.npz"], input_shape=[1, 4, 4], **options).load_shard(tmp_path / "a.npz")
    assert str(raised.value) == (
        f"{tmp_path / 'a.npz'}: a record of shape [8, 8] does not fit data.stream.input_shape (or the index's "
        "input_shape) [1, 4, 4]"
    )
    (tmp_path / "b.jsonl").write_text(json.dumps({"x": [0.0] * 9, "y": 1}) + "\n")
    with pytest.raises(UsageError, match=r"b.jsonl:1: a record of shape \[9\] does not fit data.stream.input_shape"):
        JsonlShards([tmp_path / "b.jsonl"], input_field="x", label_field="y", input_shape=[2, 4], **options).load_shard(
            tmp_path / "b.jsonl"
        )
