"""Regression with the Python API on scikit-learn's bundled diabetes data (442 patients, 10 features).

    python examples/regression_diabetes.py                       # one process, into runs/diabetes
    torchrun --standalone --nproc-per-node=2 examples/regression_diabetes.py output_dir=runs/diabetes_2
    python examples/regression_diabetes.py trainer.epochs=50 output_dir=runs/diabetes_50   # any key=value override

Each line trains into a folder of its own: started again, a folder's run resumes (and refuses another world size).

The model is defined here, in the script; ddp_trainer.fit runs it on however many ranks launched the script.
"""

import sys

import torch
from sklearn.datasets import load_diabetes
from torch import nn
from torch.utils.data import TensorDataset

import ddp_trainer
from ddp_trainer.errors import CliError


def diabetes_splits(val_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """Standardised features and targets (disease progression after a year), split with a fixed seed."""
    features, target = load_diabetes(return_X_y=True)
    inputs = torch.tensor(features, dtype=torch.float32)
    targets = torch.tensor(target, dtype=torch.float32)
    inputs = (inputs - inputs.mean(0)) / inputs.std(0)
    targets = (targets - targets.mean()) / targets.std()  # MSE in units of the target's spread
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))
    val_count = round(len(targets) * val_fraction)
    val, train = order[:val_count], order[val_count:]
    return TensorDataset(inputs[train], targets[train]), TensorDataset(inputs[val], targets[val])


class Regressor(nn.Module):
    """A small MLP with one output per patient."""

    def __init__(self, features: int = 10, hidden: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Predicted (standardised) progression, shape (batch, 1)."""
        return self.layers(inputs)


def main(overrides: list[str]) -> dict:
    """Train and return the last epoch's metrics (the same on every rank)."""
    torch.manual_seed(0)  # the same initial weights on every rank and at every world size
    train, val = diabetes_splits()
    defaults = ["output_dir=runs/diabetes", "trainer.epochs=30", "data.batch_size=32", "optim.lr=3e-3"]
    return ddp_trainer.fit(Regressor(), train, val, task="regression", overrides=[*defaults, *overrides])


if __name__ == "__main__":
    try:
        record = main(sys.argv[1:])
    except CliError as error:  # a mistyped override, say: the CLI's one line and exit code, not a traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    print(f"val/mse {record['val/mse']:.4f} val/mae {record['val/mae']:.4f} after epoch {record['epoch']}")
