"""The embedded default: scikit-learn's bundled digits, read from its file without importing scikit-learn."""

from __future__ import annotations

import importlib.util

import pytest
import sklearn.datasets
import torch
from sklearn.datasets import load_digits

from ddp_trainer.data import datasets


@pytest.mark.parametrize("file_found", [True, False])
def test_digits_are_scikit_learns_images_and_labels_split_alike_in_every_run(file_found, monkeypatch):
    find_spec = importlib.util.find_spec
    if file_found:  # read from the file: scikit-learn's loader, and its 2 s import, are not needed

        def unwanted() -> None:
            raise AssertionError("load_digits() was called")

        monkeypatch.setattr(sklearn.datasets, "load_digits", unwanted)
    else:  # a scikit-learn that keeps its data file elsewhere is read through load_digits()
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "sklearn" else find_spec(name))
    train, val = datasets.digits(0.2)
    bunch = load_digits()
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(datasets.DIGITS_SPLIT_SEED))
    for part, index in ((val, order[:359]), (train, order[359:])):
        expected = torch.tensor(bunch.images[index.numpy()], dtype=torch.float32).unsqueeze(1) / 16.0
        assert part.inputs.dtype == torch.float32 and torch.equal(part.inputs, expected)
        assert part.labels.dtype == torch.long and part.labels.tolist() == bunch.target[index.numpy()].tolist()
    assert train.classes == val.classes == [str(digit) for digit in range(10)]
