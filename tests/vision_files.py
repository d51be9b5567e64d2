"""Tiny FashionMNIST and CIFAR-10 files in the real on-disk formats, for torchvision's own readers.

No download is possible in the tests, so they write a few hundred learnable images where torchvision expects
the real datasets: IDX files under `<root>/FashionMNIST/raw/` and Python 2 pickles under
`<root>/cifar-10-batches-py/`.
"""

from __future__ import annotations

import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_CLASSES = 10
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{number}" for number in range(1, 6))
CIFAR10_LABEL_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


@dataclass(frozen=True)
class Split:
    """The images (N x H x W for grey, N x H x W x 3 for colour, uint8) and labels of one written split."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class WrittenDataset:
    """What a writer put on disk, so tests can compare torchvision's view with the pixels written."""

    root: Path
    train: Split
    test: Split


def class_patterns(labels: np.ndarray, size: int, rng: np.random.Generator, channels: int | None = None) -> np.ndarray:
    """Noisy images where class c is a bright square filling its own cell of a 4x4 grid, jittered by a pixel.

    Easy enough that a tiny run learns it well above chance, noisy enough that no two images are the same.
    """
    cell = size // 4
    square = cell
    shape = (len(labels), size, size) + ((channels,) if channels else ())
    images = rng.integers(0, 90, size=shape, dtype=np.int64)
    for index, label in enumerate(labels):
        row, col = divmod(int(label), 4)
        top = row * cell + int(rng.integers(-1, 2))
        left = col * cell + int(rng.integers(-1, 2))
        top, left = min(max(top, 0), size - square), min(max(left, 0), size - square)
        brightness = rng.integers(170, 256, size=(square, square) + ((channels,) if channels else ()))
        images[index, top : top + square, left : left + square] = brightness
    return images.astype(np.uint8)


def balanced_labels(count: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """`count` labels cycling through every class, shuffled."""
    return rng.permutation(np.arange(count) % classes).astype(np.uint8)


# --- FashionMNIST: IDX files ---------------------------------------------------------------------------------


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """IDX3: big-endian magic 2051, count, rows, cols, then the uint8 pixels row by row."""
    count, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", IDX_IMAGES_MAGIC, count, rows, cols) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    """IDX1: big-endian magic 2049, count, then one uint8 label per image."""
    path.write_bytes(struct.pack(">II", IDX_LABELS_MAGIC, len(labels)) + labels.astype(np.uint8).tobytes())


def write_fashion_mnist(root: Path, train_size: int = 800, test_size: int = 100, seed: int = 0) -> WrittenDataset:
    """`<root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte` with 28x28 class patterns."""
    rng = np.random.default_rng(seed)
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    splits = {}
    for prefix, count in (("train", train_size), ("t10k", test_size)):
        labels = balanced_labels(count, FASHION_MNIST_CLASSES, rng)
        images = class_patterns(labels, 28, rng)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
        splits[prefix] = Split(images, labels)
    return WrittenDataset(root, splits["train"], splits["t10k"])


# --- CIFAR-10: Python 2 pickles ------------------------------------------------------------------------------


class _Py2Str(bytes):
    """A Python 2 `str`: pickled as a byte string that `pickle.load(..., encoding="latin1")` decodes to str."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    """Writes what the real CIFAR-10 files hold: protocol 2, Python 2 byte-string keys, names and pixel buffers.

    Keys such as 'data' are Python 2 strs in the real files, so Python 3 sees them as str only through the
    `encoding="latin1"` torchvision passes; a Python 3 pickle of b"data" would load as bytes and not be found.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: _Py2Str) -> None:
        data = bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[_Py2Str] = save_py2_str

    def reducer_override(self, obj: object) -> object:
        if isinstance(obj, np.ndarray):
            # numpy's own reduce, with the raw pixel buffer as a Python 2 str as numpy 1.x on Python 2 wrote it.
            reconstruct = obj.__reduce__()[0]
            state = (1, obj.shape, obj.dtype, False, _Py2Str(np.ascontiguousarray(obj).tobytes()))
            return reconstruct, (np.ndarray, (0,), _Py2Str(b"b")), state
        return NotImplemented


def _py2(value: object) -> object:
    """Turn the str keys and values of a (nested) dict or list into Python 2 strs."""
    if isinstance(value, str):
        return _Py2Str(value.encode("latin1"))
    if isinstance(value, dict):
        return {_py2(key): _py2(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_py2(item) for item in value]
    return value


def write_py2_pickle(path: Path, value: dict) -> None:
    """Pickle `value` the way Python 2 pickled the CIFAR-10 batches (protocol 2, byte-string text)."""
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(_py2(value))
    path.write_bytes(buffer.getvalue())


def _cifar_batch(name: str, split: Split, first_index: int) -> dict:
    planar = split.images.transpose(0, 3, 1, 2).reshape(len(split), 3 * 32 * 32)  # R plane, G plane, B plane
    return {
        "batch_label": name,
        "labels": [int(label) for label in split.labels],
        "data": np.ascontiguousarray(planar, dtype=np.uint8),
        "filenames": [f"image_{first_index + index:05d}.png" for index in range(len(split))],
    }


def write_cifar10(root: Path, per_batch: int = 8, test_size: int = 12, seed: int = 0) -> WrittenDataset:
    """`<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}` with 32x32 colour class patterns."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    classes = len(CIFAR10_LABEL_NAMES)
    train_labels = balanced_labels(per_batch * len(CIFAR10_TRAIN_BATCHES), classes, rng)
    train = Split(class_patterns(train_labels, 32, rng, channels=3), train_labels)
    for number, name in enumerate(CIFAR10_TRAIN_BATCHES):
        part = slice(number * per_batch, (number + 1) * per_batch)
        batch = Split(train.images[part], train.labels[part])
        write_py2_pickle(folder / name, _cifar_batch(f"training batch {number + 1} of 5", batch, part.start))
    test_labels = balanced_labels(test_size, classes, rng)
    test = Split(class_patterns(test_labels, 32, rng, channels=3), test_labels)
    write_py2_pickle(folder / "test_batch", _cifar_batch("testing batch 1 of 1", test, 0))
    meta = {"num_cases_per_batch": per_batch, "label_names": list(CIFAR10_LABEL_NAMES), "num_vis": 3 * 32 * 32}
    write_py2_pickle(folder / "batches.meta", meta)
    return WrittenDataset(root, train, test)
