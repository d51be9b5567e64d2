"""Data: build train/val DataLoaders for this rank from the `data` config section."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from ddp_trainer.config import DataConfig, locate
from ddp_trainer.data.samplers import ResumableDistributedSampler, UnpaddedDistributedSampler
from ddp_trainer.distributed import DistEnv, barrier
from ddp_trainer.errors import UsageError


@dataclass
class DataBundle:
    """This rank's loaders plus what model builders need to know about the samples."""

    train_loader: DataLoader
    val_loader: DataLoader
    train_sampler: ResumableDistributedSampler
    input_shape: tuple[int, ...]
    num_classes: int | None


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """The (train, val) pair for `data.name` or `data._target_`."""
    if cfg._target_ is not None:
        pair = locate(cfg._target_, "data._target_")(**cfg.kwargs)
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise UsageError(f"data._target_={cfg._target_} must return (train_dataset, val_dataset)")
        return pair[0], pair[1]
    if cfg.name == "digits":
        from ddp_trainer.data.datasets import digits

        return digits(cfg.val_fraction)
    if cfg.name == "synthetic":
        from ddp_trainer.data.datasets import synthetic

        return synthetic(cfg.synthetic)
    from ddp_trainer.data import vision  # lazy: torchvision's datasets only when asked for

    if cfg.name == "fashion_mnist":
        return vision.fashion_mnist(cfg.root, cfg.download)
    return vision.cifar10(cfg.root, cfg.download, cfg.augment)


def build(cfg: DataConfig, env: DistEnv, seed: int) -> DataBundle:
    """Train loader over a seeded, padded DistributedSampler; val loader over an unpadded one."""
    if cfg.download and env.distributed:
        # One download per job: rank 0 fetches while the others wait, then every rank reads its files.
        if env.is_main:
            build_datasets(cfg)
        barrier(env)
    train_set, val_set = build_datasets(cfg)
    for split, dataset in (("training", train_set), ("validation", val_set)):
        if len(dataset) == 0:
            raise UsageError(f"data: the {split} split of {cfg._target_ or cfg.name} is empty")
    train_sampler = ResumableDistributedSampler(train_set, num_replicas=env.world_size, rank=env.rank, seed=seed)
    loader_options = {
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "pin_memory": env.device.type == "cuda",
        "persistent_workers": cfg.num_workers > 0,
    }
    # Seeds the workers' RNG (random crops, flips) reproducibly and differently on each rank.
    generator = torch.Generator().manual_seed(seed + env.rank)
    train_loader = DataLoader(train_set, sampler=train_sampler, generator=generator, **loader_options)
    val_sampler = UnpaddedDistributedSampler(len(val_set), env.world_size, env.rank)
    val_loader = DataLoader(val_set, sampler=val_sampler, **loader_options)
    classes = getattr(train_set, "classes", None)
    return DataBundle(
        train_loader=train_loader,
        val_loader=val_loader,
        train_sampler=train_sampler,
        input_shape=tuple(val_set[0][0].shape),  # val: no random augmentation, so no RNG is consumed
        num_classes=len(classes) if classes is not None else None,
    )
