"""FashionMNIST and CIFAR-10 through torchvision's real readers, on tiny files written in the real formats."""

from __future__ import annotations

import gzip
import os
import pickle
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_metrics
from torchvision import transforms
from vision_files import (
    CIFAR10_LABEL_NAMES,
    write_cifar10,
    write_fashion_mnist,
    write_idx_labels,
    write_py2_pickle,
)

from ddp_trainer import config, data
from ddp_trainer.cli import train
from ddp_trainer.cli.shard import main as shard_main
from ddp_trainer.data import vision
from ddp_trainer.data.samplers import PerSampleSeeded, SampleKey
from ddp_trainer.distributed import DistEnv

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def train_in_process(recipe: str, data_root: Path, output_dir: Path, *overrides: str) -> int:
    """`ddp-train --config configs/RECIPE` in this process, on CPU, reading `data_root`, writing `output_dir`."""
    return train.main(
        [
            "--config",
            str(CONFIGS / recipe),
            "trainer.device=cpu",
            "trainer.progress_bar=false",
            f"output_dir={output_dir}",
            f"data.root={data_root}",
            "data.num_workers=0",
            *overrides,
        ]
    )


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: these models are tiny, and two threads on two shared cores spin each other to a crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fashion_mnist_files(tmp_path_factory: pytest.TempPathFactory):
    """800 train / 100 test learnable 28x28 images, shared by the FashionMNIST tests (nothing writes there)."""
    return write_fashion_mnist(tmp_path_factory.mktemp("fashion_mnist_data"))


@pytest.fixture(scope="module")
def cifar10_files(tmp_path_factory: pytest.TempPathFactory):
    """5 x 8 train / 12 test 32x32 colour images, shared by the CIFAR-10 tests (nothing writes there)."""
    return write_cifar10(tmp_path_factory.mktemp("cifar10_data"))


@pytest.mark.parametrize("recipe", ["fashion_mnist_mlp.yaml", "fashion_mnist_cnn.yaml"])
def test_fashion_mnist_recipe_learns_well_above_chance(recipe, fashion_mnist_files, tmp_path):
    written = fashion_mnist_files
    output_dir = tmp_path / "run"
    code = train_in_process(recipe, written.root, output_dir, "trainer.epochs=2", "data.batch_size=8")
    assert code == 0
    metrics = read_metrics(output_dir)
    assert [line["epoch"] for line in metrics] == [1, 2]
    last = metrics[-1]
    assert last["train/samples"] == len(written.train)
    assert last["val/samples"] == len(written.test)
    assert last["step"] == 2 * len(written.train) // 8
    # Both recipes reach 100% here after two epochs over 4 data seeds x 3 training seeds (the CNN's SGD is the
    # slower one: 39-90% after its first epoch); 80% leaves margin and is still eight times chance.
    assert last["val/accuracy"] >= 0.8


def test_cifar10_resnet18_recipe_trains_one_epoch(cifar10_files, tmp_path):
    written = cifar10_files
    output_dir = tmp_path / "run"
    code = train_in_process("cifar10_resnet18.yaml", written.root, output_dir, "trainer.epochs=1", "data.batch_size=8")
    assert code == 0
    (metrics,) = read_metrics(output_dir)
    assert metrics["epoch"] == 1
    assert metrics["train/samples"] == len(written.train)
    assert metrics["val/samples"] == len(written.test)
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["val/loss"])
    weights = torch.load(output_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert weights["conv1.weight"].shape == (64, 3, 3, 3)  # the CIFAR stem, not the 7x7/2 ImageNet one
    assert "layer4.1.conv2.weight" in weights  # resnet18's last block
    assert weights["fc.weight"].shape == (len(CIFAR10_LABEL_NAMES), 512)  # classes counted from batches.meta


def test_cifar10_reads_label_names_and_pixels_from_the_batch_files(cifar10_files):
    written = cifar10_files
    train_set, val_set = vision.cifar10(str(written.root), download=False, augment=True)
    assert train_set.classes == list(CIFAR10_LABEL_NAMES)
    assert np.array_equal(train_set.data, written.train.images)
    assert train_set.targets == written.train.labels.tolist()
    assert np.array_equal(val_set.data, written.test.images)
    assert val_set.targets == written.test.labels.tolist()


def test_cifar10_augments_training_images_with_random_crop_and_flip(cifar10_files):
    train_set, _ = vision.cifar10(str(cifar10_files.root), download=False, augment=True)
    steps = train_set.transform.transforms
    assert [type(step) for step in steps] == [
        transforms.RandomCrop,
        transforms.RandomHorizontalFlip,
        transforms.ToTensor,
        transforms.Normalize,
    ]
    assert steps[0].size == (32, 32) and steps[0].padding == 4
    torch.manual_seed(0)
    views = {train_set[0][0].numpy().tobytes() for _ in range(8)}
    assert len(views) > 1  # the same image comes out differently: the augmentation draws at random


def test_cifar10_only_normalises_validation_images(cifar10_files):
    written = cifar10_files
    _, val_set = vision.cifar10(str(written.root), download=False, augment=True)
    assert [type(step) for step in val_set.transform.transforms] == [transforms.ToTensor, transforms.Normalize]
    image, label = val_set[3]
    pixels = torch.from_numpy(written.test.images[3]).permute(2, 0, 1).double() / 255  # HWC uint8 -> CHW [0, 1]
    mean = torch.tensor(vision.CIFAR10_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(vision.CIFAR10_STD, dtype=torch.float64).view(3, 1, 1)
    assert label == int(written.test.labels[3])
    assert image.shape == (3, 32, 32)
    torch.testing.assert_close(image.double(), (pixels - mean) / std, rtol=0, atol=1e-5)


def test_cifar10_without_augment_only_normalises_training_images(cifar10_files):
    train_set, _ = vision.cifar10(str(cifar10_files.root), download=False, augment=False)
    assert [type(step) for step in train_set.transform.transforms] == [transforms.ToTensor, transforms.Normalize]


@pytest.mark.parametrize(
    ("recipe", "expected_file"),
    [
        ("fashion_mnist_mlp.yaml", Path("FashionMNIST", "raw", "train-images-idx3-ubyte")),
        ("cifar10_resnet18.yaml", Path("cifar-10-batches-py", "data_batch_1")),
    ],
)
def test_missing_files_exit_2_with_one_line_naming_the_expected_file(recipe, expected_file, tmp_path, capsys):
    data_root = tmp_path / "empty"
    data_root.mkdir()
    code = train_in_process(recipe, data_root, tmp_path / "run")
    assert code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert str(data_root / expected_file) in lines[0]
    assert "data.download=true" in lines[0]
    assert not (tmp_path / "run").exists()  # refused before the run wrote anything


@pytest.mark.parametrize(
    ("recipe", "name", "folder", "cause"),
    [
        ("fashion_mnist_mlp.yaml", "FashionMNIST", "FashionMNIST/raw", "Error downloading train-images-idx3-ubyte.gz"),
        ("cifar10_resnet18.yaml", "CIFAR-10", "cifar-10-batches-py", "<urlopen error no network here>"),
    ],
)
def test_a_download_without_network_exits_2_with_one_line_saying_so(
    recipe, name, folder, cause, tmp_path, capsys, monkeypatch
):
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(urllib.request, "urlopen", offline)  # what an offline compute node's DNS failure raises
    assert train_in_process(recipe, tmp_path / "data", tmp_path / "run", "data.download=true") == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        f"ddp-train: error: {name} could not be downloaded into {tmp_path / 'data' / folder} ({cause}"
    )
    assert lines[0].endswith("copy the files there yourself and set data.download=false")


@pytest.mark.parametrize(
    ("recipe", "write", "removed"),
    [
        ("fashion_mnist_cnn.yaml", write_fashion_mnist, Path("FashionMNIST", "raw", "t10k-labels-idx1-ubyte")),
        ("cifar10_resnet18.yaml", write_cifar10, Path("cifar-10-batches-py", "batches.meta")),
    ],
)
def test_partly_copied_dataset_names_the_file_still_missing(recipe, write, removed, tmp_path, capsys):
    data_root = tmp_path / "data"
    write(data_root)
    (data_root / removed).unlink()
    assert train_in_process(recipe, data_root, tmp_path / "run") == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert str(data_root / removed) in lines[0]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _gzip(path: Path) -> None:
    path.write_bytes(gzip.compress(path.read_bytes()))  # as downloaded, not yet unpacked


def _bytes_keys(path: Path) -> None:
    batch = pickle.loads(path.read_bytes(), encoding="latin1")
    path.write_bytes(pickle.dumps({key.encode(): value for key, value in batch.items()}))  # re-saved by Python 3


def _drop_five_labels(path: Path) -> None:
    labels = np.frombuffer(path.read_bytes()[8:], dtype=np.uint8)
    write_idx_labels(path, labels[:-5])


def _no_rows(path: Path) -> None:
    batch = pickle.loads(path.read_bytes(), encoding="latin1")
    write_py2_pickle(path, {**batch, "data": batch["data"][:0], "labels": [], "filenames": []})


def _float_pixels(path: Path) -> None:
    batch = pickle.loads(path.read_bytes(), encoding="latin1")
    write_py2_pickle(path, {**batch, "data": batch["data"].astype(np.float64)})


def _text_labels(path: Path) -> None:
    batch = pickle.loads(path.read_bytes(), encoding="latin1")
    write_py2_pickle(path, {**batch, "labels": [f"class {label}" for label in batch["labels"]]})


def _a_label_past_the_classes(path: Path) -> None:
    labels = np.frombuffer(path.read_bytes()[8:], dtype=np.uint8).copy()
    labels[-1] = 12
    write_idx_labels(path, labels)


@pytest.mark.parametrize(
    ("recipe", "write", "damaged", "damage", "said"),
    [
        # The file itself, not the list of files that might be at fault.
        (
            "fashion_mnist_mlp.yaml",
            write_fashion_mnist,
            "train-images-idx3-ubyte",
            _truncate,
            "cannot read train-images-idx3-ubyte in",
        ),
        ("cifar10_resnet18.yaml", write_cifar10, "data_batch_3", _truncate, "cannot read data_batch_3 in"),
        (
            "fashion_mnist_mlp.yaml",
            write_fashion_mnist,
            "train-images-idx3-ubyte",
            _gzip,
            "cannot read train-images-idx3-ubyte in",
        ),
        ("cifar10_resnet18.yaml", write_cifar10, "data_batch_2", _bytes_keys, "cannot read data_batch_2 in"),
        (
            "fashion_mnist_mlp.yaml",
            write_fashion_mnist,
            "t10k-labels-idx1-ubyte",
            _drop_five_labels,
            "100 images but 95",
        ),
        (
            "fashion_mnist_mlp.yaml",
            write_fashion_mnist,
            "train-labels-idx1-ubyte",
            _a_label_past_the_classes,
            "hold label 12, but FashionMNIST has 10 classes (0 to 9)",  # was an IndexError traceback at its step
        ),
        ("cifar10_resnet18.yaml", write_cifar10, "test_batch", _no_rows, "hold no image"),  # an IndexError, too
        # Both loaded, then failed with a traceback: PIL's at the first step, torch.as_tensor's at the start.
        ("cifar10_resnet18.yaml", write_cifar10, "data_batch_1", _float_pixels, "hold float64 pixels, not the"),
        ("cifar10_resnet18.yaml", write_cifar10, "data_batch_4", _text_labels, "hold labels that are not integers (<U"),
    ],
)
def test_a_damaged_dataset_file_exits_2_with_one_line_naming_it(recipe, write, damaged, damage, said, tmp_path, capsys):
    data_root = tmp_path / "data"
    written = write(data_root)
    (path,) = written.root.rglob(damaged)
    damage(path)
    assert train_in_process(recipe, data_root, tmp_path / "run") == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert said in lines[0] and damaged in lines[0] and str(path.parent) in lines[0]
    assert not (tmp_path / "run").exists()


class Calls:
    """Pickled, it asks the unpickler to call os.system: what a file from elsewhere can hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # noqa: ANN204
        return os.system, (self.command,)


def test_a_cifar10_batch_that_names_a_function_is_refused_without_calling_it(tmp_path, capsys):
    # torchvision reads the batches with pickle.load: a data.root from elsewhere (a checkpoint's, under evaluate)
    # ran the command its file named.
    data_root, marker = tmp_path / "data", tmp_path / "ran"
    written = write_cifar10(data_root)
    (path,) = written.root.rglob("data_batch_1")
    path.write_bytes(pickle.dumps(Calls(f"touch {marker}"), protocol=2))
    assert train_in_process("cifar10_resnet18.yaml", data_root, tmp_path / "run") == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"cannot read data_batch_1 in {path.parent} (it names posix.system, which a CIFAR-10 batch never" in line
    assert not marker.exists()


def test_a_cifar10_batch_with_numpy_integer_labels_is_read(tmp_path):
    # Home-made batches often keep their labels as NumPy integers: pickled through numpy's `scalar`, also allowed.
    written = write_cifar10(tmp_path / "data")
    (path,) = written.root.rglob("data_batch_1")
    batch = pickle.loads(path.read_bytes(), encoding="latin1")
    path.write_bytes(pickle.dumps({**batch, "labels": [np.int64(label) for label in batch["labels"]]}, protocol=2))
    train, _ = vision.cifar10(str(tmp_path / "data"), download=False, augment=False)
    assert train.targets[: len(batch["labels"])] == batch["labels"]


def test_data_root_under_home_is_found_as_torchvision_finds_it(fashion_mnist_files, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "data").symlink_to(fashion_mnist_files.root, target_is_directory=True)
    monkeypatch.setenv("HOME", str(home))
    assert train_in_process("fashion_mnist_mlp.yaml", Path("~/data"), tmp_path / "run", "trainer.epochs=1") == 0


def test_cifar10_training_augmentation_is_seeded_per_sample_and_epoch(cifar10_files):
    cfg = config.load(None, ["data.name=cifar10", f"data.root={cifar10_files.root}", "data.batch_size=4"])
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
    loader = data.build_loaders(*data.build_datasets(cfg.data, env, cfg.seed), cfg.data, env, cfg.seed).train_loader
    assert isinstance(loader.dataset, PerSampleSeeded)
    views = [loader.dataset[SampleKey(epoch, 0)][0] for epoch in (0, 0, 1)]
    assert torch.equal(views[0], views[1])  # the same sample in the same epoch: the same crop and flip
    assert not torch.equal(views[0], views[2])  # another epoch: another draw


class Draws(torch.utils.data.Dataset):
    """A stand-in for a large dataset whose every sample is a random draw: what its augmentation would take."""

    def __len__(self) -> int:
        return 2_000_000

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(4)


def test_per_sample_seeds_differ_for_a_sample_and_the_one_a_million_later_in_the_next_epoch():
    # A multiply-add mix by 1,000,003 gave (epoch 0, index 1,000,003) the seed of (epoch 1, index 0).
    seeded = PerSampleSeeded(Draws(), seed=0)
    assert not torch.equal(seeded[SampleKey(0, 1_000_003)], seeded[SampleKey(1, 0)])
    assert torch.equal(seeded[SampleKey(1, 0)], seeded[SampleKey(1, 0)])


def test_cifar10_shards_hold_the_images_unaugmented_whatever_the_recipe_says(cifar10_files, tmp_path):
    args = ["--config", "configs/cifar10_resnet18.yaml", f"data.root={cifar10_files.root}", "--shards", "2"]
    for out in ("first", "second"):
        assert shard_main([*args, "--out", str(tmp_path / out)]) == 0
    shards = [np.load(tmp_path / out / "train" / "shard-00000.npz")["x"] for out in ("first", "second")]
    plain, _ = vision.cifar10(str(cifar10_files.root), download=False, augment=False)
    assert np.array_equal(shards[0], shards[1])  # the recipe's random crop and flip would make them differ
    assert np.allclose(shards[0][0], plain[0][0].numpy())
