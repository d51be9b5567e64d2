"""Datasets and models built through `_target_` by the tests, as a user's own code would be."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from ddp_trainer.data.datasets import TensorClassification, digits
from ddp_trainer.errors import UsageError


def blobs(train_size: int = 96, val_size: int = 37, features: int = 8, classes: int = 3) -> tuple[Dataset, Dataset]:
    """Gaussian blobs around fixed class centres: tiny and learnable."""
    generator = torch.Generator().manual_seed(7)
    centres = 3 * torch.randn(classes, features, generator=generator)

    def make(count: int) -> TensorClassification:
        labels = torch.arange(count) % classes
        inputs = centres[labels] + torch.randn(count, features, generator=generator)
        return TensorClassification(inputs, labels, [str(c) for c in range(classes)])

    return make(train_size), make(val_size)


def regression_blobs() -> tuple[Dataset, Dataset]:
    """`blobs` with a real-valued target per sample (the first feature), as a regression dataset has."""
    return tuple(TensorDataset(split.inputs, split.inputs[:, 0]) for split in blobs())


def blobs_without_validation() -> tuple[Dataset, None]:
    """`blobs`' training split, and no validation split."""
    return blobs()[0], None


def blob_loaders() -> tuple[DataLoader, DataLoader]:
    """`blobs` in DataLoaders: what a script's loader code returns, where the datasets belong."""
    train, val = blobs()
    return DataLoader(train, batch_size=8), DataLoader(val, batch_size=8)


class RecordingDataset(Dataset):
    """Appends every index it serves to `record_file`, one per line (num_workers=0 only)."""

    def __init__(self, inner: Dataset, record_file: Path) -> None:
        self.inner, self.record_file, self.classes = inner, record_file, inner.classes

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self.record_file.open("a") as file:
            file.write(f"{index}\n")
        return self.inner[index]


class Augmented(Dataset):
    """Random augmentation as user code writes it: noise from torch, NumPy and Python's global RNGs per sample."""

    def __init__(self, inner: Dataset) -> None:
        self.inner, self.classes = inner, inner.classes

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, label = self.inner[index]
        noise = 0.3 * torch.randn(inputs.shape) + float(np.random.uniform(-0.1, 0.1)) + random.uniform(-0.1, 0.1)
        return inputs + noise, label


def augmented_blobs(augment: bool = True) -> tuple[Dataset, Dataset]:
    """`blobs` with random augmentation of the training split (with `augment`, as a factory of the user's might)."""
    train, val = blobs()
    return (Augmented(train) if augment else train), val


def recording_blobs(record_dir: str, train_size: int = 96, val_size: int = 37) -> tuple[Dataset, Dataset]:
    """`blobs` that log which indices each rank reads."""
    rank = os.environ.get("RANK", "0")
    train, val = blobs(train_size, val_size)
    folder = Path(record_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return RecordingDataset(train, folder / f"train_rank{rank}.txt"), RecordingDataset(val, folder / f"val_{rank}.txt")


class FaultyDataset(Dataset):
    """After serving `after` items on a faulty rank: raises (`fault="crash"`), finds a bad record (`"bad"`: a one-line
    error), hangs for an hour (`"stall"`), is busy for 8 s once (`"slow"`) or gets SLURM's preemption warning
    (`"usr2"`) or SIGTERM (`"term"`) once."""

    def __init__(self, inner: Dataset, fault: str | None, after: int) -> None:
        self.inner, self.fault, self.after, self.served, self.classes = inner, fault, after, 0, inner.classes

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.served += 1
        if self.fault is not None and self.served > self.after:
            if self.fault == "crash":
                raise RuntimeError(f"injected failure on rank {os.environ.get('RANK')}")
            if self.fault == "bad":
                raise UsageError(f"data: record {index} of /data/blobs is unreadable (on rank {os.environ['RANK']})")
            if self.fault in ("usr2", "term"):
                signum = signal.SIGUSR2 if self.fault == "usr2" else signal.SIGTERM
                self.fault = None
                os.kill(os.getpid(), signum)
                return self.inner[index]
            if self.fault == "slow":
                self.fault = None
                time.sleep(8)
                return self.inner[index]
            time.sleep(3600)  # a rank stuck on a dead filesystem
        return self.inner[index]


def faulty_blobs(fault: str, fault_rank: int, after: int, train_size: int = 96) -> tuple[Dataset, Dataset]:
    """`blobs` whose training split crashes or stalls on one rank part-way through the first epoch."""
    train, val = blobs(train_size=train_size)
    faulty_rank = os.environ.get("RANK", "0") == str(fault_rank)
    return FaultyDataset(train, fault if faulty_rank else None, after), val


def blobs_differing_on(rank: int, difference: str) -> tuple[Dataset, Dataset]:
    """`blobs` as one rank alone sees them: fewer training samples (`"shorter"`) or its files gone (`"missing"`)."""
    if os.environ.get("RANK", "0") != str(rank):
        return blobs()
    if difference == "missing":
        raise UsageError("data.root=/data is missing the blobs files (on this rank's node only)")
    return blobs(train_size=40)


def small_net(features: int = 8, hidden: int = 16, classes: int = 3) -> nn.Module:
    """A user's own model factory with keyword arguments."""
    return nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes))


class SlowNet(nn.Module):
    """`small_net` whose training forward takes at least `delay_s`: an epoch long enough to time."""

    def __init__(self, delay_s: float, features: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.net, self.delay_s = small_net(features, classes=classes), delay_s

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Sleep when training, then classify."""
        if self.training:
            time.sleep(self.delay_s)
        return self.net(inputs)


def classifier(features: int = 8, num_classes: int = 3, dropout: float = 0.0) -> nn.Module:
    """A model factory whose parameters share their names with `model.num_classes` and `model.dropout`."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_classes))


class WithUnusedHead(nn.Module):
    """A model with a head its forward never uses, as multi-task models have: DDP must be told to expect it."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.unused_head = nn.Linear(8, 3), nn.Linear(8, 5)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.body(inputs)


class AnyOptions(nn.Module):
    """A model class taking any keyword argument (`**options`), which it keeps as `.options`."""

    def __init__(self, features: int = 8, classes: int = 3, **options: object) -> None:
        super().__init__()
        self.linear, self.options = nn.Linear(features, classes), options

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.linear(inputs)


def folder_blobs(root: str, val_size: int = 37) -> tuple[Dataset, Dataset]:
    """`blobs` as if read from the folder `root`, which both splits keep as `.root`."""
    train, val = blobs(val_size=val_size)
    train.root = val.root = root
    return train, val


def fetched_digits(root: str, offline: bool = False) -> tuple[Dataset, Dataset]:
    """The digits, fetched into the folder `root` first where it lacks them, as a download is: a line in
    `root/fetches` for each fetch. `offline`: the fetch fails, as a download without network does."""
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "digits.fetched").exists():
        if offline:
            raise UsageError(f"the digits could not be downloaded into {root} (no network)")
        with (folder / "fetches").open("a") as fetches:
            fetches.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # a download takes a while: ranks that found the folder empty together all fetch
        (folder / "digits.fetched").touch()
    return digits(0.2)


def by_position(width: int, /, depth: int = 1) -> nn.Module:
    """A factory whose first parameter only a position can give."""
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))


def rank_seeded_mlp(features: int = 8, hidden: int = 16, classes: int = 3) -> nn.Module:
    """An MLP seeded by the rank that builds it, as a script that never seeds alike would: rank 0's must win."""
    torch.manual_seed(int(os.environ.get("RANK", "0")))
    layers = [nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)]
    return nn.Sequential(nn.Flatten(), *layers)


def deep_mlp(features: int = 8, width: int = 1024, depth: int = 12, classes: int = 3) -> nn.Module:
    """An MLP of `depth` equal hidden Linear layers: as many FSDP units of 4 MB each (at width 1024)."""
    hidden = [layer for _ in range(depth) for layer in (nn.Linear(width, width), nn.ReLU())]
    return nn.Sequential(nn.Linear(features, width), nn.ReLU(), *hidden, nn.Linear(width, classes))


def batchnorm_net(features: int = 8, hidden: int = 16, classes: int = 3, dropout: float = 0.0) -> nn.Module:
    """A model with buffers (BatchNorm running statistics) that drift apart on each rank during training."""
    layers = [nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, classes)]
    return nn.Sequential(*layers, nn.Dropout(dropout))  # last: the layers keep their indices


class IdRecordingNet(nn.Module):
    """Input column 0 is a record id: each training forward appends a line of its batch's ids to a file per rank."""

    def __init__(self, record_dir: str, features: int = 4, classes: int = 3, delay_s: float = 0.0) -> None:
        super().__init__()
        self.record_file = Path(record_dir) / f"rank{os.environ.get('RANK', '0')}.txt"
        self.record_file.parent.mkdir(parents=True, exist_ok=True)
        self.linear, self.delay_s = nn.Linear(features, classes), delay_s

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Record the batch's ids when training (slowly, if asked, so a test can kill mid-epoch), classify."""
        if self.training:
            time.sleep(self.delay_s)
            with self.record_file.open("a") as file:
                file.write(" ".join(str(int(record)) for record in inputs[:, 0]) + "\n")
        return self.linear(inputs[:, 1:])


class NanAtStep(nn.Module):
    """A small classifier whose training forward on call `nan_step` (1-based) of `nan_rank` returns NaN logits, or
    with `poisons="gradient"` finite logits whose gradients are NaN, or with `"infinite_loss"` logits whose loss is
    infinite and whose gradients are finite."""

    def __init__(
        self, nan_step: int, nan_rank: int = 0, features: int = 8, classes: int = 3, poisons: str = "loss"
    ) -> None:
        super().__init__()
        self.linear, self.calls = nn.Linear(features, classes), 0
        self.poison = os.environ.get("RANK", "0") == str(nan_rank)
        self.nan_step, self.poisons = nan_step, poisons

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits, or NaN once."""
        logits = self.linear(inputs)
        if self.training:
            self.calls += 1
            if self.poison and self.calls == self.nan_step:
                if self.poisons == "gradient":  # sqrt(0) adds 0, and its infinite slope times 0 is NaN
                    return logits + torch.sqrt(self.linear.weight.sum() * 0.0)
                if self.poisons == "infinite_loss":  # classes 1 and 2 impossible: their samples' loss is infinite
                    return torch.cat([logits[:, :1], torch.full_like(logits[:, 1:], float("-inf"))], dim=1)
                return logits * float("nan")
        return logits


class ProbeNet(nn.Module):
    """A tiny conv classifier that records, per forward, how it was called: mode, autocast dtype, memory format."""

    calls: list[dict] = []  # class-level, read by in-process tests after a run

    def __init__(self, channels: int = 3, classes: int = 3, delay_s: float = 0.0) -> None:
        super().__init__()
        self.conv, self.head, self.delay_s = nn.Conv2d(channels, 4, 3, padding=1), nn.Linear(4, classes), delay_s

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Record the call, wait if asked (so a run takes measurable time), classify."""
        device = images.device.type
        ProbeNet.calls.append(
            {
                "training": self.training,
                "autocast": torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None,
                "channels_last_input": images.is_contiguous(memory_format=torch.channels_last),
                "channels_last_weight": self.conv.weight.is_contiguous(memory_format=torch.channels_last),
            }
        )
        time.sleep(self.delay_s)
        return self.head(self.conv(images).mean(dim=(2, 3)))


class BlobStream(IterableDataset):
    """A stream of blobs that knows nothing of workers or ranks (the trainer splits it)."""

    def __init__(self, inner: Dataset) -> None:
        self.inner = inner

    def __iter__(self):  # noqa: ANN204
        return (self.inner[index] for index in range(len(self.inner)))


def blob_streams(train_size: int = 96, val_size: int = 37) -> tuple[IterableDataset, IterableDataset]:
    """`blobs` as two IterableDatasets, for `data._target_`."""
    train, val = blobs(train_size, val_size)
    return BlobStream(train), BlobStream(val)


class DictSamples(Dataset):
    """`inner`'s samples as {"inputs", "targets"} dicts: the other sample form the classification task reads."""

    def __init__(self, inner: Dataset) -> None:
        self.inner, self.classes = inner, inner.classes

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        inputs, targets = self.inner[index]
        return {"inputs": inputs, "targets": targets}


def dict_blobs() -> tuple[Dataset, Dataset]:
    """`blobs` with samples as dicts."""
    train, val = blobs()
    return DictSamples(train), DictSamples(val)


small_net_moved = small_net  # the same factory under the name it has after a move


def forwarding_blobs(**options: int) -> tuple[Dataset, Dataset]:
    """`blobs`, its options passed on as a user's wrapper passes them: a key it does not take fails there."""
    return blobs(**options)
