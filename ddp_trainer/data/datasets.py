"""Map-style datasets that need nothing but what ships with our dependencies: digits and synthetic."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ddp_trainer.config import SyntheticConfig
from ddp_trainer.errors import UsageError, sized_by

DIGITS_SPLIT_SEED = 0  # fixed, not cfg.seed: the validation set must be the same set in every run


class TensorClassification(TensorDataset):
    """Inputs and integer labels held in memory, with the `classes` attribute torchvision datasets have."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> None:
        super().__init__(inputs, labels)
        self.inputs, self.labels, self.classes = inputs, labels, list(classes)


def _digits_table() -> np.ndarray:
    """scikit-learn's bundled digits as it stores them: per row 64 pixel values (0-16), then the label."""
    # Read from its file, not through load_digits(): importing scikit-learn adds 2 s to every rank's start-up.
    spec = importlib.util.find_spec("sklearn")
    folders = spec.submodule_search_locations if spec is not None else None
    path = Path(folders[0], "datasets", "data", "digits.csv.gz") if folders else None
    if path is not None and path.is_file():
        return np.loadtxt(path, delimiter=",")
    from sklearn.datasets import load_digits  # a scikit-learn that keeps the file elsewhere

    images, labels = load_digits(return_X_y=True)
    return np.column_stack([images, labels])


def digits(val_fraction: float) -> tuple[TensorClassification, TensorClassification]:
    """scikit-learn's bundled 8x8 digits (1,797 real images), scaled to [0, 1] and split train/val."""
    table = torch.from_numpy(_digits_table())
    images = table[:, :-1].reshape(-1, 1, 8, 8).float() / 16.0
    labels = table[:, -1].long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    val_count = round(len(labels) * val_fraction)
    if val_count in (0, len(labels)):  # the model is sized from a validation sample: there must be one
        split = "validation" if val_count == 0 else "training"
        raise UsageError(
            f"config key 'data.val_fraction' = {val_fraction} leaves none of the {len(labels)} digits for {split}"
        )
    classes = [str(digit) for digit in range(10)]
    val_index, train_index = order[:val_count], order[val_count:]
    return (
        TensorClassification(images[train_index], labels[train_index], classes),
        TensorClassification(images[val_index], labels[val_index], classes),
    )


def synthetic(cfg: SyntheticConfig) -> tuple[TensorClassification, TensorClassification]:
    """Random inputs labelled by a fixed random linear teacher: learnable, shaped like any image dataset."""
    generator = torch.Generator().manual_seed(1234)
    shape = tuple(cfg.input_shape)

    def make(count: int) -> TensorClassification:
        inputs = torch.randn(count, *shape, generator=generator)
        return TensorClassification(inputs, (inputs.flatten(1) @ teacher).argmax(dim=1), classes)

    classes = [str(index) for index in range(cfg.num_classes)]
    with sized_by("data.synthetic (train_size, val_size, input_shape, num_classes)"):
        teacher = torch.randn(int(torch.tensor(shape).prod()), cfg.num_classes, generator=generator)
        return make(cfg.train_size), make(cfg.val_size)
