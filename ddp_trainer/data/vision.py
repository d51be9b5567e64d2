"""torchvision's FashionMNIST and CIFAR-10 read from `data.root`, with errors that say where files belong."""

from __future__ import annotations

from pathlib import Path

from torchvision import datasets, transforms

from ddp_trainer.errors import UsageError

CIFAR10_MEAN = (0.4915, 0.4823, 0.4468)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class CIFAR10Files(datasets.CIFAR10):
    """torchvision's CIFAR10 that checks the batch files exist instead of hashing them.

    Hashing 170 MB on every rank at every start is slow, and files a user converted or subset themselves
    have other hashes; a download still verifies the archive's md5.
    """

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


def _require_files(root: str, dataset: str, folder: str, names: list[str], download: bool) -> None:
    files = Path(root).expanduser() / folder
    missing = [files / name for name in names if not (files / name).is_file()]
    if missing and not download:
        raise UsageError(
            f"data.root={Path(root).expanduser()} is missing {dataset} files; expected {missing[0]} "
            f"(set data.download=true to fetch it, or copy the files there)"
        )


def fashion_mnist(root: str, download: bool) -> tuple[datasets.FashionMNIST, datasets.FashionMNIST]:
    """FashionMNIST 28x28 grey garments, normalised to [-1, 1] as in the tutorial."""
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    _require_files(root, "FashionMNIST", "FashionMNIST/raw", names, download)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    return (
        datasets.FashionMNIST(root, train=True, download=download, transform=transform),
        datasets.FashionMNIST(root, train=False, download=download, transform=transform),
    )


def cifar10(root: str, download: bool, augment: bool) -> tuple[CIFAR10Files, CIFAR10Files]:
    """CIFAR-10 with its channel statistics; random crop and flip on the training split when `augment`."""
    names = [name for name, _ in CIFAR10Files.train_list + CIFAR10Files.test_list] + [CIFAR10Files.meta["filename"]]
    _require_files(root, "CIFAR-10", CIFAR10Files.base_folder, names, download)
    normalize = [transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    augmentation = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    return (
        CIFAR10Files(root, train=True, download=download, transform=transforms.Compose(augmentation + normalize)),
        CIFAR10Files(root, train=False, download=download, transform=transforms.Compose(normalize)),
    )
