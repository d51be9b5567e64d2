"""Data: build train/val DataLoaders for this rank from the `data` config section."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, is_dataclass, replace
from dataclasses import fields as dataclass_fields
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from ddp_trainer.claim import refusal_of, refused_if_any
from ddp_trainer.config import DataConfig, locate
from ddp_trainer.data.datasets import digits, synthetic
from ddp_trainer.data.samplers import PerSampleSeeded, ResumableDistributedSampler
from ddp_trainer.data.stream_formats import open_stream
from ddp_trainer.data.streaming import ShardedIterableDataset
from ddp_trainer.data.user_streams import RankShardedStream, StreamLoader
from ddp_trainer.distributed import DistEnv, gather_objects
from ddp_trainer.errors import UsageError
from ddp_trainer.rng import RANK_STREAMS, mixed_seed
from ddp_trainer.tasks import inputs_and_targets
from ddp_trainer.workers import StopProofLoader

Collate = Callable[[list[Any]], Any] | None


class EpochOrder(Protocol):
    """What the trainer asks of the training data's order (a sampler's or a stream's), to checkpoint and resume it."""

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning."""

    def position(self, batches_done: int) -> dict[str, Any]:
        """Where the epoch stands after `batches_done` batches since it (or the resume) started, to checkpoint."""

    def resume(self, position: dict[str, Any]) -> bool:
        """Continue at `position`; False when it cannot, and the epoch restarts from its beginning."""


@dataclass
class DataBundle:
    """This rank's loaders, the training order a checkpoint keeps, the split sizes and the batches per epoch."""

    train_loader: DataLoader
    val_loader: DataLoader | None
    train_order: EpochOrder
    train_size: int | None  # None: a user's stream, of unknown length
    val_size: int | None
    batches_per_epoch: int | None  # the same on every rank; None when ranks may differ (a user's stream)


def to_device(batch: Any, device: torch.device, channels_last: bool) -> Any:
    """The batch (tensors in tuples, lists, dicts and dataclasses, or objects with `.to`) on `device`, NHWC images."""
    if torch.is_tensor(batch):
        # From pinned memory, the copy overlaps compute; NHWC images are laid out by that same copy, not a second one.
        nhwc = channels_last and batch.dim() == 4 and batch.is_floating_point()
        memory_format = torch.channels_last if nhwc else torch.preserve_format
        return batch.to(device, non_blocking=True, memory_format=memory_format)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device, channels_last) for key, value in batch.items()}
    if isinstance(batch, list | tuple):
        moved = [to_device(value, device, channels_last) for value in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)  # a namedtuple takes fields
    # A task's own collate may make either: left as they were, their tensors stayed on the CPU beside a CUDA model.
    if is_dataclass(batch) and not isinstance(batch, type):
        given = {field.name: getattr(batch, field.name) for field in dataclass_fields(batch) if field.init}
        moved = replace(batch, **{name: to_device(value, device, channels_last) for name, value in given.items()})
        for field in dataclass_fields(batch):  # those __init__ does not take (object.__setattr__: frozen ones too)
            if not field.init and hasattr(moved, field.name):
                object.__setattr__(moved, field.name, to_device(getattr(moved, field.name), device, channels_last))
        return moved
    if callable(getattr(batch, "to", None)):  # a batch type of its own (a graph library's, say)
        moved = batch.to(device)
        return batch if moved is None else moved  # some move in place
    return batch


def sample_shape(dataset: Dataset, split: str = "validation") -> tuple[int, ...]:
    """The shape of one sample's inputs, for model builders that size their first layer from it; `split` names it."""
    if isinstance(dataset, ShardedIterableDataset):
        first = dataset.first_sample()
    elif isinstance(dataset, IterableDataset):
        first = next(iter(dataset), None)
        if first is None:
            raise UsageError(f"data: the {split} stream yielded no sample to size the model's first layer from")
    else:
        first = dataset[0]
    return tuple(inputs_and_targets(first)[0].shape)


def class_count(dataset: Dataset) -> int | None:
    """How many classes a dataset names in its `classes` attribute (torchvision's convention), if it does."""
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes else None


def build_datasets(cfg: DataConfig, env: DistEnv, seed: int) -> tuple[Dataset, Dataset]:
    """The (train, val) pair for `data.name` or `data._target_`: map-style, or this rank's sharded streams."""
    if cfg.name == "stream" and cfg._target_ is None:
        return _open_streams(cfg, env, seed)
    if cfg.download and env.distributed:
        # One download per node: rank 0 fetches while the others wait, then each other node's first rank fetches what
        # its data.root lacks (a folder the nodes do not share), then every rank reads its files. A fetch that fails
        # stops every rank in its words: the others would wait for the fetcher, then blame it as lost.
        for fetches in (env.is_main, env.local_rank == 0 and not env.is_main):
            refused_if_any(env, refusal_of(lambda: map_datasets(cfg)) if fetches else None)
    return map_datasets(cfg)


def unaugmented(cfg: DataConfig) -> DataConfig:
    """`cfg` with augmentation off: for the built-in datasets, and for a `_target_` factory that was passed augment."""
    kwargs = {**cfg.kwargs, "augment": False} if "augment" in cfg.kwargs else cfg.kwargs
    return replace(cfg, augment=False, kwargs=kwargs)


def map_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """The map-style (train, val) pair for `data.name` or `data._target_`, each checked to be a dataset with a sample
    (a factory's validation split may be None: a run without validation)."""
    pair = _made(cfg)
    for split, dataset in zip(("training", "validation"), pair, strict=True):
        if dataset is not None or split == "training":
            check_dataset(dataset, f"data: the {split} split of {cfg._target_ or cfg.name}")
    return pair


def _made(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    if cfg._target_ is not None:
        pair = locate(cfg._target_, "data._target_")(**cfg.kwargs)
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise UsageError(f"data._target_={cfg._target_} must return (train_dataset, val_dataset)")
        return pair[0], pair[1]
    if cfg.name == "stream":
        raise UsageError("data.name=stream is read as shards, not as a map-style dataset")
    if cfg.name == "digits":
        return digits(cfg.val_fraction)
    if cfg.name == "synthetic":
        return synthetic(cfg.synthetic)
    from ddp_trainer.data import vision  # lazy: torchvision's datasets only when asked for

    if cfg.name == "fashion_mnist":
        return vision.fashion_mnist(cfg.root, cfg.download)
    return vision.cifar10(cfg.root, cfg.download, cfg.augment)


# The keys of the data section that each built-in dataset reads: set for another one, they do nothing.
READS = {
    "digits": ("val_fraction",),
    "synthetic": ("synthetic",),
    "fashion_mnist": ("root", "download"),
    "cifar10": ("root", "download", "augment"),
    "stream": ("root", "stream"),
}


def unused_keys(cfg: DataConfig) -> str | None:
    """A note naming the keys set for another built-in dataset, which this one builds without; None if none are."""
    if cfg._target_ is not None or cfg.name not in READS:
        return None
    defaults, unused = DataConfig(), []
    for key in sorted({key for keys in READS.values() for key in keys} - set(READS[cfg.name])):
        value, default = getattr(cfg, key), getattr(defaults, key)
        if is_dataclass(value):  # a section: its keys one by one
            unused += [
                f"data.{key}.{spec.name}={getattr(value, spec.name)}"
                for spec in dataclass_fields(value)
                if getattr(value, spec.name) != getattr(default, spec.name)
            ]
        elif value != default:
            unused.append(f"data.{key}={value}")
    return f"{', '.join(unused)}: unused by data.name={cfg.name}" if unused else None


def _open_streams(cfg: DataConfig, env: DistEnv, seed: int) -> tuple[ShardedIterableDataset, ShardedIterableDataset]:
    root = Path(cfg.root).expanduser()
    common = {"batch_size": cfg.batch_size, "rank": env.rank, "world_size": env.world_size, "seed": seed}
    shuffle = {"shuffle": True, "shuffle_buffer": cfg.stream.shuffle_buffer}
    train_set = open_stream(root / "train", {**common, **shuffle, "balanced": True}, cfg.stream)
    val_set = open_stream(root / "val", {**common, "shuffle": False, "balanced": False}, cfg.stream)
    return train_set, val_set


def _loader(
    dataset: Dataset, cfg: DataConfig, env: DistEnv, seed: int, kind: type[DataLoader] = StopProofLoader, **options: Any
) -> DataLoader:
    return kind(
        dataset,
        num_workers=cfg.num_workers,
        # Pinned host memory lets the copy to the GPU overlap compute; on CPU it only costs.
        pin_memory=env.device.type == "cuda" if cfg.pin_memory is None else cfg.pin_memory,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
        # Each loader draws its workers' seeds from its own generator, never from the global RNG: an extra
        # evaluation or a resumed iterator then leaves the training randomness (dropout) untouched.
        generator=torch.Generator().manual_seed(mixed_seed(RANK_STREAMS, seed, env.rank)),
        **options,
    )


def _sampled_loader(
    dataset: Dataset, sampler: Sampler | range, cfg: DataConfig, env: DistEnv, seed: int, collate: Collate
) -> DataLoader:
    # Persistent workers skip re-forking (and re-importing) at every epoch; the sampler lives in this process.
    persistent = cfg.persistent_workers and cfg.num_workers > 0
    options = {"sampler": sampler, "batch_size": cfg.batch_size, "persistent_workers": persistent}
    return _loader(dataset, cfg, env, seed, collate_fn=collate, **options)


def _user_stream(
    dataset: IterableDataset, cfg: DataConfig, env: DistEnv, seed: int, collate: Collate, **options: Any
) -> DataLoader:
    stream = RankShardedStream(dataset, cfg.batch_size, env.rank, env.world_size, cfg.num_workers, seed, collate)
    return _loader(stream, cfg, env, seed, StreamLoader, batch_size=None, **options)


def _val_loader(
    val_set: Dataset | None, cfg: DataConfig, env: DistEnv, seed: int, collate: Collate
) -> DataLoader | None:
    """Each validation sample on exactly one rank: an unpadded sampler, or a user's stream split by readers."""
    if val_set is None:
        return None
    if isinstance(val_set, IterableDataset):  # (reader slot, batch) -> batch
        return _user_stream(val_set, cfg, env, seed, collate, collate_fn=itemgetter(1))
    # Not DistributedSampler: it pads the last ranks with repeats, which evaluation would count twice. Ranks may
    # differ by one sample: evaluation runs no collective per batch.
    sampler = range(env.rank, len(val_set), env.world_size)
    return _sampled_loader(val_set, sampler, cfg, env, seed, collate)


def build_loaders(
    train_set: Dataset, val_set: Dataset | None, cfg: DataConfig, env: DistEnv, seed: int, collate: Collate = None
) -> DataBundle:
    """Loaders for this rank: a seeded, padded DistributedSampler for training, an unpadded one for validation;
    shard streams; or a user's IterableDataset split over ranks x workers. `collate` makes a batch of samples (a
    task's, for sequences of different lengths), torch's `default_collate` if None."""
    _check_same_on_every_rank(train_set, val_set, env)
    if isinstance(train_set, ShardedIterableDataset):
        # Workers copy the dataset when an epoch's iteration starts; persistent workers would keep the first epoch.
        train_loader = _loader(train_set, cfg, env, seed, batch_size=None)
        val_loader = None if val_set is None else _loader(val_set, cfg, env, seed, batch_size=None)
        val_size = 0 if val_set is None else sum(val_set.counts)
        return DataBundle(train_loader, val_loader, train_set, sum(train_set.counts), val_size, len(train_set))
    val_loader = _val_loader(val_set, cfg, env, seed, collate)
    val_size = None if isinstance(val_set, IterableDataset) else len(val_set or ())
    if isinstance(train_set, IterableDataset):
        train_loader = _user_stream(train_set, cfg, env, seed, collate)
        return DataBundle(train_loader, val_loader, train_loader.dataset, None, val_size, batches_per_epoch=None)
    # Of the built-in training sets only CIFAR-10's draws random numbers per sample; a user's `_target_` must say so.
    augments = cfg._target_ is None and cfg.name == "cifar10" and cfg.augment
    per_sample_seed = augments if cfg.per_sample_seed is None else cfg.per_sample_seed
    sampler = ResumableDistributedSampler(train_set, cfg.batch_size, env.world_size, env.rank, seed, per_sample_seed)
    samples = PerSampleSeeded(train_set, seed) if per_sample_seed else train_set
    train_loader = _sampled_loader(samples, sampler, cfg, env, seed, collate)
    return DataBundle(train_loader, val_loader, sampler, len(train_set), val_size, len(train_loader))


def check_dataset(dataset: object, said: str) -> None:
    """UsageError unless `dataset` is an IterableDataset or a map-style dataset with a sample; `said` names it."""
    if isinstance(dataset, DataLoader):
        raise UsageError(
            f"{said} is a DataLoader; give its dataset (.dataset): every rank builds its own loader from "
            "data.batch_size and data.num_workers (a collate_fn becomes a task's collate method)"
        )
    if isinstance(dataset, tuple | dict | torch.Tensor):  # indexable, but by field or row, not by sample
        raise UsageError(
            f"{said} is a {type(dataset).__name__}; give a Dataset of samples, e.g. TensorDataset(inputs, targets)"
        )
    map_style = hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")  # a Hugging Face Dataset, say
    if not map_style and not isinstance(dataset, IterableDataset):
        raise UsageError(
            f"{said} must be a map-style Dataset (with __getitem__ and __len__) or an IterableDataset, not "
            f"{type(dataset).__name__}"
        )
    if map_style and len(dataset) == 0:  # a stream's length is known only as it is read
        raise UsageError(f"{said} is empty")


def _check_same_on_every_rank(train_set: Dataset, val_set: Dataset | None, env: DistEnv) -> None:
    """Refuse, on every rank alike, datasets that differ between ranks: each must get them all, the same."""
    # The samplers split one dataset by index, and every rank plans a stream's epoch from its own shard list: unequal
    # ones would hang training, count validation wrongly, or train some records twice and others never.
    by_rank = gather_objects(tuple(_layout(split) for split in (train_set, val_set)), env)
    if len(set(by_rank)) <= 1:
        return
    if isinstance(train_set, ShardedIterableDataset):
        raise UsageError(
            f"the ranks read different shard files in data.root: {_first_difference(by_rank)}; give every node the "
            "same shards, as `python -m ddp_trainer.cli.shard` wrote them"
        )
    listed = ", ".join(f"rank {rank}: {train} / {val}" for rank, (train, val) in enumerate(by_rank))
    raise UsageError(
        f"the ranks were given datasets of different lengths (train / val samples, {listed}): give every rank "
        "the whole datasets, the samplers split them"
    )


def _layout(split: Dataset | None) -> int | tuple[tuple[str, int], ...] | None:
    """What every rank must be given alike: a map-style split's length, or a stream's shard files and their records."""
    if isinstance(split, ShardedIterableDataset):
        return tuple(zip((path.name for path in split.shards), split.counts, strict=True))
    return None if split is None or isinstance(split, IterableDataset) else len(split)


def _first_difference(by_rank: list[tuple[Any, Any]]) -> str:
    """The first shard file in which a rank's streams differ from rank 0's, in words."""
    rank = next(rank for rank, layout in enumerate(by_rank) if layout != by_rank[0])
    splits = zip(("train", "val"), by_rank[rank], by_rank[0], strict=True)
    split, theirs, ours = next((name, *layouts) for name, *layouts in splits if layouts[0] != layouts[1])
    files = range(max(len(theirs or ()), len(ours or ())))
    index = next(index for index in files if _file(theirs, index) != _file(ours, index))
    return f"rank {rank}'s {split} shard {index} is {_file(theirs, index)} where rank 0's is {_file(ours, index)}"


def _file(layout: tuple[tuple[str, int], ...] | None, index: int) -> str:
    """A stream's `index`th shard file and its record count, in words."""
    if layout is None or index >= len(layout):
        return "missing"
    name, count = layout[index]
    return f"{name} ({count} records)"
