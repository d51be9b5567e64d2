"""A user's IterableDataset on N ranks x W workers: each record once, uneven ranks, exact mid-epoch resume."""

from __future__ import annotations

import itertools
import math
from unittest.mock import ANY

import pytest
import torch
import torch.distributed as dist
from conftest import REPO_DIR, read_metrics, run_cli, run_script
from dist_helpers import run_ranks
from torch import nn
from torch.distributed import get_rank, get_world_size
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import ddp_trainer
from ddp_trainer import checkpoint
from ddp_trainer.cli import train
from ddp_trainer.data.user_streams import RankShardedStream
from ddp_trainer.errors import UsageError

CPU = ["trainer.device=cpu", "trainer.progress_bar=false"]


class Range(IterableDataset):
    """The tutorial's dataset: splits start..end across readers with get_worker_info()."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end

    def __iter__(self):  # noqa: ANN204
        info = get_worker_info()
        if info is None:
            return iter(range(self.start, self.end))
        per_worker = math.ceil((self.end - self.start) / info.num_workers)
        first = self.start + info.id * per_worker
        return iter(range(first, min(first + per_worker, self.end)))


class Unaware(IterableDataset):
    """A dataset that knows nothing of workers or ranks."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self):  # noqa: ANN204
        return iter(range(self.count))


class Narrowing(IterableDataset):
    """The PyTorch docs' worker_init_fn split, done in __iter__: it narrows its own start..end to its reader's part."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end

    def __iter__(self):  # noqa: ANN204
        info = get_worker_info()
        if info is not None:
            per_worker = math.ceil((self.end - self.start) / info.num_workers)
            self.start += info.id * per_worker
            self.end = min(self.start + per_worker, self.end)
        return iter(range(self.start, self.end))


class RankSplit(IterableDataset):
    """Splits 0..count by torch.distributed's rank, as many a blog post's dataset does."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self):  # noqa: ANN204
        return iter(range(dist.get_rank(), self.count, dist.get_world_size()))


class RankSplitByName(RankSplit):
    """RankSplit through the names `from torch.distributed import get_rank` bound when its module was imported."""

    def __iter__(self):  # noqa: ANN204
        return iter(range(get_rank(), self.count, get_world_size()))


def records_of(dataset: IterableDataset, world_size: int, workers: int) -> list[list[int]]:
    """Every rank's records, read through real DataLoader workers."""
    ranks = []
    for rank in range(world_size):
        stream = RankShardedStream(dataset, 4, rank, world_size, workers, seed=0)
        loader = DataLoader(stream, batch_size=None, num_workers=workers)
        ranks.append([record for _, batch in loader for record in batch.tolist()])
    return ranks


@pytest.mark.parametrize("dataset", [Range(0, 37), Unaware(37)], ids=["splits-itself", "knows-nothing"])
def test_every_record_is_read_once_across_ranks_and_workers(dataset):
    ranks = records_of(dataset, world_size=2, workers=2)
    assert sorted(ranks[0] + ranks[1]) == list(range(37))
    assert len(ranks[0]) != len(ranks[1])  # 10 + 10 against 10 + 7: the ranks' batch counts differ


def test_a_dataset_that_narrows_itself_as_it_is_iterated_reads_all_its_records_every_pass():
    # Without workers each pass read the user's own object, narrowed by the pass before: half the data, then a quarter.
    dataset = Narrowing(0, 37)
    for _ in range(2):
        assert sorted(itertools.chain(*records_of(dataset, world_size=2, workers=0))) == list(range(37))


@pytest.mark.parametrize("dataset", [RankSplit(37), RankSplitByName(37)], ids=["dist.get_rank", "get_rank"])
def test_a_dataset_that_splits_by_rank_too_is_refused_saying_what_to_split_by(tmp_path, dataset):
    # It trained on 1/N of its records, and validated on 1/N, without a word (by the imported name: still so).
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        name = type(dataset).__name__
        with pytest.raises(UsageError, match=rf"^{name} asks torch.distributed for its rank: get_worker_info\(\) "):
            records_of(dataset, world_size=2, workers=0)
        assert sorted(itertools.chain(*records_of(Range(0, 37), world_size=2, workers=0))) == list(range(37))
    finally:
        dist.destroy_process_group()


class SeededById(IterableDataset):
    """Every record, in an order seeded by get_worker_info().id: it reads the id, yet splits nothing."""

    def __iter__(self):  # noqa: ANN204
        return iter(torch.randperm(10, generator=torch.Generator().manual_seed(get_worker_info().id)).tolist())


def test_a_dataset_that_reads_only_its_reader_id_is_warned_that_every_reader_may_read_it_all():
    # Taken as splitting itself, it was trained once per reader each epoch: without a word.
    with pytest.warns(UserWarning, match=r"SeededById reads get_worker_info\(\).id alone: .* each of the 2 readers"):
        ranks = records_of(SeededById(), world_size=2, workers=0)
    assert sorted(ranks[0]) == sorted(ranks[1]) == list(range(10))


def test_a_dataset_that_knows_nothing_is_split_here_and_told_so():
    with pytest.warns(UserWarning, match="Unaware does not read get_worker_info"):
        first = records_of(Unaware(10), world_size=3, workers=0)[0]  # in this process, where warnings are seen
    assert first == [0, 3, 6, 9]


def test_an_empty_stream_and_a_schedule_that_needs_a_length_are_refused(tmp_path):
    model, args = nn.Linear(1, 2), [*CPU, f"output_dir={tmp_path}"]
    with pytest.raises(UsageError, match="the training stream yielded no record in epoch 1"):
        ddp_trainer.fit(model, Unaware(0), overrides=args)
    with pytest.raises(UsageError, match="optim.scheduler=cosine needs the run's length.*set trainer.max_steps"):
        ddp_trainer.fit(model, Unaware(8), overrides=[*args, "optim.scheduler=cosine"])
    with pytest.raises(UsageError, match=r"optim.scheduler=step needs .*: use optim.scheduler=none, or cosine \+ "):
        ddp_trainer.fit(model, Unaware(8), overrides=[*args, "optim.scheduler=step"])


class Spent(IterableDataset):
    """(value, label) records on its first `passes` passes, then none: generators made once, handed out again."""

    def __init__(self, count: int, passes: int) -> None:
        self.passes = iter([((torch.tensor([float(i)]), i % 2) for i in range(count)) for _ in range(passes)])

    def __iter__(self):  # noqa: ANN204
        return next(self.passes, iter(()))


def test_a_stream_spent_after_its_first_pass_is_refused_not_trained_or_scored_as_empty(tmp_path):
    args = [*CPU, "trainer.epochs=2", "data.batch_size=4"]
    with pytest.raises(UsageError, match=r"training stream yielded no record in epoch 2 \(its __iter__ must start"):
        ddp_trainer.fit(nn.Linear(1, 2), Spent(8, 1), overrides=[*args, f"output_dir={tmp_path / 'train'}"])
    # Scored as empty, validation read a loss of 0: a perfect score, and best.pt would have taken that epoch.
    with pytest.raises(UsageError, match=r"^data: the validation data yielded no batch"):
        ddp_trainer.fit(nn.Linear(1, 2), Spent(8, 2), Spent(4, 1), overrides=[*args, f"output_dir={tmp_path / 'val'}"])
    assert [line["val/samples"] for line in read_metrics(tmp_path / "val")] == [4]
    assert checkpoint.load(tmp_path / "val" / "checkpoints" / "best.pt")["epoch"] == 1


def test_two_uneven_ranks_train_every_record_once_and_resume_mid_epoch_exactly(tmp_path):
    """The digits stream example: 4 readers of 360, 360, 360, 357 images in batches of 7, so one rank holds 104
    batches and the other 103. Stopped at step 103, when one rank's part is all trained and the other's next batch
    comes from its second worker, then resumed, the run ends with the weights of the uninterrupted run. The model is
    sharded with FSDP: the stand-in batch of the rank that ran dry must join FSDP's collectives as it joins DDP's."""
    script = REPO_DIR / "examples" / "digits_stream.py"
    common = [*CPU, "trainer.epochs=1", "data.batch_size=7", "data.num_workers=2", "optim.name=sgd"]
    common += ["trainer.strategy=fsdp", "trainer.fsdp_wrap=[Linear]"]
    straight = run_script(script, [*common, f"output_dir={tmp_path / 'straight'}"], nproc=2)  # as users run it
    assert straight.returncode == 0, straight.stderr
    for stop in ("trainer.max_steps=103", "trainer.max_steps=-1"):
        split = run_ranks([*common, stop, f"output_dir={tmp_path / 'split'}"], script=script)
        assert split.returncode == 0, split.stderr
    record = read_metrics(tmp_path / "straight")[-1]
    assert (record["step"], record["train/samples"], record["val/samples"]) == (104, 1437, 360)
    resumed = read_metrics(tmp_path / "split")[-1]
    assert resumed == {**record, "time/train_s": ANY, "time/epoch_s": ANY}
    weights = [checkpoint.load(tmp_path / run / "checkpoints" / "last")["model"] for run in ("straight", "split")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_the_stream_example_runs_in_one_process(tmp_path):
    result = run_script(
        REPO_DIR / "examples" / "digits_stream.py", [*CPU, "trainer.epochs=1", f"output_dir={tmp_path}"]
    )
    assert result.returncode == 0, result.stderr
    record = read_metrics(tmp_path)[-1]
    assert (record["world_size"], record["step"], record["train/samples"], record["val/samples"]) == (1, 45, 1437, 360)
    assert "on 360 images after epoch 1" in result.stdout


class Named(IterableDataset):
    """Dict records that carry a string id beside the tensors, as a user's stream of files or documents does."""

    def __init__(self, count: int = 40) -> None:
        self.count = count

    def __iter__(self):  # noqa: ANN204
        for index in range(self.count):
            yield {"id": f"record-{index}", "inputs": torch.full((4,), float(index % 3)), "targets": index % 3}


def test_a_stream_of_records_with_string_fields_trains(tmp_path):
    overrides = [*CPU, "trainer.epochs=1", "data.batch_size=8", f"output_dir={tmp_path}"]
    record = ddp_trainer.fit(nn.Linear(4, 3), Named(), overrides=overrides)
    assert (record["step"], record["train/samples"]) == (5, 40)


def test_the_stand_in_that_closes_a_short_last_window_leaves_batchnorm_statistics_alone(tmp_path):
    # 13 batches in windows of 3: a zero-weight stand-in closes the last window of 1. Its forward in train mode moved
    # the running statistics by a batch already counted (14 batches tracked).
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    overrides = [*CPU, "trainer.epochs=1", "data.batch_size=8", "trainer.accumulate_grad_batches=3"]
    record = ddp_trainer.fit(model, Named(104), overrides=[*overrides, f"output_dir={tmp_path}"])
    assert (record["step"], record["train/samples"]) == (5, 104)
    assert model[1].num_batches_tracked.item() == 13


def test_a_stream_from_a_target_factory_trains_through_the_command_line(tmp_path):
    target = ["data._target_=factories.blob_streams", "data.val_size=37", "model._target_=factories.small_net"]
    assert train.main([*CPU, *target, "trainer.epochs=2", f"output_dir={tmp_path}"]) == 0
    assert [(line["step"], line["train/samples"], line["val/samples"]) for line in read_metrics(tmp_path)] == [
        (2, 96, 37),
        (4, 96, 37),
    ]


def test_a_stream_split_here_is_warned_of_once_not_each_epoch_its_workers_start_anew(tmp_path):
    # Workers are new processes each epoch, where warnings.warn's "once" starts over: 3 epochs warned 6 times.
    target = ["data._target_=factories.blob_streams", "model._target_=factories.small_net", "data.num_workers=2"]
    result = run_cli([*CPU, *target, "trainer.epochs=3", f"output_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "UserWarning: BlobStream does not read" in line]
    assert len(warned) == 2  # the training stream's and the validation stream's


class SeededByReader(IterableDataset):
    """Draws its records from a torch generator seeded by its reader's seed, as streams that shuffle do."""

    def __iter__(self):
        generator = torch.Generator().manual_seed(get_worker_info().seed)
        yield torch.randint(0, 10, (2,), generator=generator)


def test_the_largest_run_seed_gives_readers_seeds_torch_takes():
    largest = 2**32 - 1  # config's bound; the reader's seed mixes in the epoch and reader
    batches = [batch for _, batch in RankShardedStream(SeededByReader(), 1, 0, 1, 0, largest)]
    assert len(batches) == 1 and batches[0].shape == (1, 2)
