"""A character-level language model with the Python API, on text that ships with scikit-learn (no download).

    python examples/char_language_model.py                        # into runs/char_lm
    torchrun --standalone --nproc-per-node=2 examples/char_language_model.py trainer.epochs=5 output_dir=runs/char_lm_2

The text is the documentation of scikit-learn's bundled datasets (sklearn/datasets/descr/*.rst, about 43,000
characters). Each sample is a window of `context + 1` characters: the task "language_model" reads it as inputs
[:, :-1] and next-character targets [:, 1:], and reports val/loss (per character) and val/perplexity.
"""

import importlib.resources
import sys

import torch
from torch import nn
from torch.utils.data import Dataset

import ddp_trainer
from ddp_trainer.errors import CliError


def bundled_text() -> str:
    """scikit-learn's dataset descriptions, in file-name order."""
    folder = importlib.resources.files("sklearn.datasets.descr")
    return "".join(
        path.read_text() for path in sorted(folder.iterdir(), key=lambda path: path.name) if path.name.endswith(".rst")
    )


class CharWindows(Dataset):
    """Non-overlapping windows of `context + 1` character ids from one stretch of text."""

    def __init__(self, ids: torch.Tensor, context: int) -> None:
        self.ids, self.length = ids, context + 1

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        start = index * self.length
        return self.ids[start : start + self.length]


class CharModel(nn.Module):
    """Embedding -> GRU -> logits over the vocabulary, for every position."""

    def __init__(self, vocabulary: int, width: int = 128) -> None:
        super().__init__()
        self.embed, self.rnn = nn.Embedding(vocabulary, width), nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, vocabulary)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-character logits, shape (batch, time, vocabulary)."""
        hidden, _ = self.rnn(self.embed(ids))
        return self.head(hidden)


def main(overrides: list[str], context: int = 64) -> dict:
    """Train on the first 90% of the text, validate on the rest; return the last epoch's metrics."""
    text = bundled_text()
    vocabulary = sorted(set(text))
    ids = torch.tensor([vocabulary.index(char) for char in text])
    split = int(0.9 * len(ids))
    torch.manual_seed(0)  # the same initial weights on every rank and at every world size
    model = CharModel(len(vocabulary))
    defaults = ["output_dir=runs/char_lm", "trainer.epochs=10", "data.batch_size=32", "optim.lr=3e-3"]
    train, val = CharWindows(ids[:split], context), CharWindows(ids[split:], context)
    return ddp_trainer.fit(model, train, val, task="language_model", overrides=[*defaults, *overrides])


if __name__ == "__main__":
    try:
        record = main(sys.argv[1:])
    except CliError as error:  # a mistyped override, say: the CLI's one line and exit code, not a traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    print(f"val/perplexity {record['val/perplexity']:.2f} after epoch {record['epoch']}")
