"""torchvision's FashionMNIST and CIFAR-10 read from `data.root`, with errors that say where files belong."""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from torchvision import datasets, transforms

from ddp_trainer.errors import UsageError, first_line

Split = TypeVar("Split", datasets.FashionMNIST, datasets.CIFAR10)

# What torchvision's readers raise on a truncated or foreign file: the IDX reader asserts its header, and a CIFAR batch
# pickled with other keys fails on the lookup. A failed download raises an OSError or a RuntimeError.
UNREADABLE = (
    OSError,
    RuntimeError,
    ValueError,
    EOFError,
    pickle.UnpicklingError,
    AssertionError,
    LookupError,
    TypeError,
)

# What a CIFAR-10 batch's pickle may name: NumPy's arrays, as Python 2 and 3 pickle them. Any other global (os.system)
# would be called as torchvision's pickle.load reads the file.
ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),  # labels a home-made batch keeps as NumPy integers
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}

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


class _ArraysOnly(pickle.Unpickler):
    """Builds NumPy arrays and plain values only: any other class or function a pickle names is refused."""

    def find_class(self, module: str, name: str) -> Any:
        """The global a pickle names, if it is one of ARRAY_GLOBALS."""
        if (module, name) not in ARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch never does")
        return super().find_class(module, name)


def _load_batch(path: Path) -> Any:
    with open(path, "rb") as file:
        return _ArraysOnly(file, encoding="latin1").load()


def _cifar10_split(root: str, train: bool, transform: Callable, download: bool, files: list[Path]) -> CIFAR10Files:
    # torchvision reads the batches with pickle.load, which calls what a file names: each is read here first with
    # NumPy's arrays alone allowed, so a folder from elsewhere (a checkpoint's data.root) runs no code.
    for path in files:
        if path.is_file():
            _load_batch(path)
    return CIFAR10Files(root, train, transform, download=download)


def _require_files(root: str, dataset: str, folder: str, names: list[str], download: bool) -> Path:
    """The dataset's folder under `root`, refused in one line when a file is missing and no download is set."""
    files = Path(root).expanduser() / folder
    missing = [files / name for name in names if not (files / name).is_file()]
    if missing and not download:
        raise UsageError(
            f"data.root={Path(root).expanduser()} is missing {dataset} files; expected {missing[0]} "
            f"(set data.download=true to fetch it, or copy the files there)"
        )
    return files


def _read(dataset: str, where: Path, download: bool, files: list[str], build: Callable[[], Split]) -> Split:
    """`build()`, where a failed download or a file that is truncated or foreign stops the run in one line."""
    try:
        split = build()
    except UNREADABLE as error:
        # A download fails with URLError (an OSError), or FashionMNIST's "Error downloading ..." after each mirror.
        if download and (isinstance(error, OSError) or str(error).startswith("Error downloading")):
            raise UsageError(
                f"{dataset} could not be downloaded into {where} ({first_line(error)}): without network access, "
                "copy the files there yourself and set data.download=false"
            ) from None
        culprit = _unreadable(where, files)
        named = culprit or f"one of {', '.join(files)}"  # each reads alone: they do not fit together
        raise UsageError(
            f"{dataset} cannot read {named} in {where} ({first_line(error)}): a truncated or foreign file; copy it "
            "again, or remove it and set data.download=true"
        ) from None
    _check_contents(split, f"{dataset}'s {' and '.join(files)} in {where}", dataset)
    return split


def _check_contents(split: Split, named: str, dataset: str) -> None:
    """Refuse files that load but would fail only at a sample, mid-epoch: the model is sized from one sample."""
    if len(split.data) == 0:  # a batch pickled without its rows
        raise UsageError(f"{named} hold no image; copy them again")
    if len(split.data) != len(split.targets):  # an images file and a labels file from different copies
        raise UsageError(f"{named} hold {len(split.data)} images but {len(split.targets)} labels; copy them again")
    pixels = str(split.data.dtype).removeprefix("torch.")  # a tensor (FashionMNIST) or a NumPy array (CIFAR-10)
    labels = np.asarray(split.targets)
    if pixels != "uint8" or labels.dtype.kind not in "iu":  # PIL takes 8-bit pixels only; the loss, integer labels
        found = f"{pixels} pixels" if pixels != "uint8" else f"labels that are not integers ({labels.dtype})"
        raise UsageError(f"{named} hold {found}, not the format's: a foreign or damaged file; copy it again")
    outside = labels[(labels < 0) | (labels >= len(split.classes))]  # else the loss fails at that sample
    if len(outside):
        raise UsageError(
            f"{named} hold label {int(outside[0])}, but {dataset} has {len(split.classes)} classes "
            f"(0 to {len(split.classes) - 1}): a foreign or damaged file; copy it again"
        )


def _unreadable(where: Path, files: list[str]) -> str | None:
    """The first of `files` that does not load on its own, as torchvision loads it; None if each does."""
    for name in files:
        try:
            if name.endswith("-ubyte"):  # an IDX file: its header says what follows
                datasets.mnist.read_sn3_pascalvincent_tensor(str(where / name), strict=False)
            else:  # a CIFAR-10 batch, its arrays alone unpickled
                _load_batch(where / name)["label_names" if name.endswith(".meta") else "data"]
        except UNREADABLE:
            return name
    return None


def fashion_mnist(root: str, download: bool) -> tuple[datasets.FashionMNIST, datasets.FashionMNIST]:
    """FashionMNIST 28x28 grey garments, normalised to [-1, 1] as in the garment CNN tutorial."""
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    where = _require_files(root, "FashionMNIST", "FashionMNIST/raw", names, download)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    read = functools.partial(_read, "FashionMNIST", where, download)
    return (
        read(names[:2], lambda: datasets.FashionMNIST(root, True, transform, download=download)),
        read(names[2:], lambda: datasets.FashionMNIST(root, False, transform, download=download)),
    )


def cifar10(root: str, download: bool, augment: bool) -> tuple[CIFAR10Files, CIFAR10Files]:
    """CIFAR-10 with its channel statistics; random crop and flip on the training split when `augment`."""
    names = [name for name, _ in CIFAR10Files.train_list + CIFAR10Files.test_list] + [CIFAR10Files.meta["filename"]]
    where = _require_files(root, "CIFAR-10", CIFAR10Files.base_folder, names, download)
    normalize = [transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    augmentation = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    train_files, test_files = names[:5] + names[-1:], names[5:]  # both read batches.meta, the last name
    augmented, plain = transforms.Compose(augmentation + normalize), transforms.Compose(normalize)
    read = functools.partial(_read, "CIFAR-10", where, download)
    paths = [[where / name for name in files] for files in (train_files, test_files)]
    return (
        read(train_files, lambda: _cifar10_split(root, True, augmented, download, paths[0])),
        read(test_files, lambda: _cifar10_split(root, False, plain, download, paths[1])),
    )
