"""A user IterableDataset, written as the PyTorch tutorial writes it, trained on several ranks and workers.

    python examples/digits_stream.py                              # one process, into runs/digits_stream_example
    torchrun --standalone --nproc-per-node=2 examples/digits_stream.py data.num_workers=2 output_dir=runs/stream_2

`DigitsRange` streams a range of scikit-learn's bundled digit images and splits its range across DataLoader
workers with `get_worker_info()`, exactly the tutorial's pattern. It knows nothing of ranks: under ddp_trainer,
`get_worker_info()` counts the workers of every rank (id in 0..ranks*workers-1), so the same split covers them all
and each image is trained on once per epoch. Ranks may get different numbers of batches; training waits for none.
"""

import math
import sys

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import IterableDataset, get_worker_info

import ddp_trainer
from ddp_trainer.errors import CliError


class DigitsRange(IterableDataset):
    """The digit images start..end-1, as (8x8 image scaled to [0, 1], label) pairs, split across workers."""

    def __init__(self, start: int, end: int) -> None:
        super().__init__()
        assert end > start
        self.start, self.end = start, end
        digits = load_digits()
        self.images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
        self.labels = torch.tensor(digits.target)

    def __iter__(self):
        worker_info = get_worker_info()
        if worker_info is None:  # single-process data loading: the whole range
            iter_start, iter_end = self.start, self.end
        else:  # in a worker process: split the workload
            per_worker = int(math.ceil((self.end - self.start) / float(worker_info.num_workers)))
            iter_start = self.start + worker_info.id * per_worker
            iter_end = min(iter_start + per_worker, self.end)
        return ((self.images[index], self.labels[index]) for index in range(iter_start, iter_end))


def main(overrides: list[str]) -> dict:
    """Train an MLP on images 0..1436, validate on 1437..1796; returns the last epoch's record."""
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    defaults = ["output_dir=runs/digits_stream_example", "trainer.epochs=10", "data.batch_size=32", "optim.lr=3e-3"]
    return ddp_trainer.fit(model, DigitsRange(0, 1437), DigitsRange(1437, 1797), overrides=[*defaults, *overrides])


if __name__ == "__main__":
    try:
        record = main(sys.argv[1:])
    except CliError as error:  # a mistyped override, say: the CLI's one line and exit code, not a traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    print(f"val/accuracy {record['val/accuracy']:.4f} on {record['val/samples']} images after epoch {record['epoch']}")
