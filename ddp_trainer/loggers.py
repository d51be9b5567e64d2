"""Rank 0's outputs: console lines with a progress bar, metrics.jsonl and config.yaml. Other ranks stay quiet."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

Item = TypeVar("Item")


class RunLogger:
    """Writes the run's text outputs from rank 0; every method is a no-op on the other ranks."""

    def __init__(self, output_dir: Path, is_main: bool, progress_bar: bool) -> None:
        self.output_dir, self.is_main = output_dir, is_main
        self.metrics_path = output_dir / "metrics.jsonl"
        # A bar redrawn into a log file is noise; only draw it for a person watching a terminal.
        self.show_bar = is_main and progress_bar and sys.stderr.isatty()
        self.bar: tqdm | None = None

    def start(self, config_yaml: str, completed_epochs: int) -> None:
        """Write config.yaml and keep only metrics lines of epochs the resumed checkpoint already holds."""
        if not self.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "config.yaml").write_text(config_yaml)
        if self.metrics_path.exists():
            # A crash between writing an epoch's line and its checkpoint would otherwise repeat that epoch's line.
            kept = [line for line in self.metrics_path.read_text().splitlines() if _epoch_of(line) <= completed_epochs]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def progress(self, batches: Iterable[Item], total: int, description: str) -> Iterator[Item]:
        """Iterate `batches`, drawing a progress bar on rank 0 when stderr is a terminal."""
        if not self.show_bar:
            yield from batches
            return
        with tqdm(batches, total=total, desc=description, leave=False, dynamic_ncols=True) as self.bar:
            yield from self.bar
        self.bar = None

    def show_running(self, metrics: dict[str, float]) -> None:
        """Put the latest global running metrics on the progress bar."""
        if self.bar is not None:
            loss, accuracy = metrics["train/loss"], metrics["train/accuracy"]
            self.bar.set_postfix(loss=f"{loss:.4f}", accuracy=f"{100 * accuracy:.1f}%")

    def info(self, message: str) -> None:
        """Print one line on rank 0."""
        if self.is_main:
            print(message, flush=True)

    def log_epoch(self, record: dict[str, Any], epochs: int) -> None:
        """Append the epoch's global metrics to metrics.jsonl and print them."""
        if not self.is_main:
            return
        with self.metrics_path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        self.info(
            f"epoch {record['epoch']}/{epochs} step {record['step']} | train/loss {record['train/loss']:.4f} "
            f"| val/loss {record['val/loss']:.4f} | val/accuracy {100 * record['val/accuracy']:.2f}% "
            f"| {record['time/epoch_s']:.1f}s"
        )


def _epoch_of(line: str) -> float:
    try:
        return json.loads(line).get("epoch", 0)
    except json.JSONDecodeError:
        return float("inf")  # a half-written last line from a crash: drop it
