"""The `ddp-train plot` command: a run's metrics.jsonl as a PNG of loss and the task's metrics, train vs val."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddp_trainer.atomic import write_atomic
from ddp_trainer.cli import run_as
from ddp_trainer.errors import UsageError, say
from ddp_trainer.loggers import is_number

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SPLITS = ("train", "val")
NOT_PLOTTED = ("samples", "skipped_steps", "grad_norm")  # counts and diagnostics, not curves to compare
MAX_PANELS = 24  # a run's tasks report a few metrics; thousands of panels would take minutes and gigabytes


def metrics_file(path: Path) -> Path:
    """The metrics.jsonl that `path` names: the file itself, or the one inside a run directory."""
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"{file} does not exist (give a run directory or its metrics.jsonl)")
    return file


def read_epochs(file: Path) -> list[dict[str, Any]]:
    """The epoch lines of a metrics.jsonl, in file order; lines without an `epoch` key are skipped."""
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {file} as text: {error}") from error
    records, lines = [], text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as error:  # a line nested past the parser's depth, too
            if number == len(lines) and not text.endswith("\n"):  # a run stopped as it wrote it; its resume drops it
                say(f"{file} line {number} was cut short as it was written: left out", sys.stderr)
                continue
            raise UsageError(f"{file} line {number} is not valid JSON: {getattr(error, 'msg', error)}") from None
        if isinstance(record, dict) and "epoch" in record:
            _check_numbers(record, f"{file} line {number}")
            records.append(record)
    if not records:
        raise UsageError(f"{file} has no epoch lines (each line should be a JSON object with an 'epoch' key)")
    return records


def _check_numbers(record: dict[str, Any], where: str) -> None:
    # A string would be drawn as a category, a list or a dict fails inside matplotlib.
    for key in (key for key in record if key == "epoch" or key.partition("/")[0] in SPLITS):
        if record[key] is not None and not is_number(record[key]):
            raise UsageError(f"{where}: {key} is {record[key]!r}, not a number")
        if is_number(record[key]) and 1e300 < abs(record[key]) < float("inf"):  # matplotlib's ticks overflow
            raise UsageError(f"{where}: {key} is {record[key]!r}, too large to draw")


def epoch_series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of one metric, leaving out the epochs whose line lacks it."""
    present = [record for record in records if record.get(key) is not None]
    return [record["epoch"] for record in present], [record[key] for record in present]


def panels(records: Sequence[dict[str, Any]]) -> list[str]:
    """The metrics to draw: loss first, then every other train/ or val/ metric in the records (accuracy, mae...)."""
    names = ["loss"]
    for record in records:
        for key in record:
            split, _, metric = key.partition("/")
            if split in SPLITS and metric not in names and metric not in NOT_PLOTTED:
                names.append(metric)
    return names


def plot_metrics(records: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """A figure with a panel per metric (loss, accuracy, ...), each drawing train and val against the epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: only this command draws
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    # A bare Figure on the Agg canvas: no pyplot state, no display needed on a cluster node.
    names = panels(records)
    if len(names) > MAX_PANELS:
        raise UsageError(f"the file names {len(names)} metrics, more than the {MAX_PANELS} panels plot draws")
    figure = Figure(figsize=(5 * len(names), 4), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, panel in zip(figure.subplots(1, len(names), squeeze=False)[0], names, strict=True):
        for split in SPLITS:
            epochs, values = epoch_series(records, f"{split}/{panel}")
            if epochs:
                axes.plot(epochs, values, marker="o", label=split)
        axes.set(title=panel, xlabel="epoch", ylabel=panel)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel.endswith("accuracy"):
            axes.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))  # stored as fractions, read as percent
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend()
    figure.suptitle(title)
    return figure


def save_figure(figure: Figure, output: Path) -> None:
    """Write the figure as a PNG, creating the folder it goes in; a PNG already there is replaced whole or kept."""
    try:
        # Into a file beside it, then renamed over it: a full disk leaves the old plot, not a truncated one.
        write_atomic(output, lambda file: figure.savefig(file, format="png"))
    except OSError as error:
        raise UsageError(f"cannot write {output}: {error.strerror or error}") from error


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line arguments: the run directory or metrics.jsonl, and where to write the PNG."""
    parser = argparse.ArgumentParser(
        prog="ddp-train plot", description="Plot loss and each metric per epoch (train vs val) from a run's metrics."
    )
    parser.add_argument(
        "metrics", type=Path, metavar="RUN_DIR_OR_METRICS_JSONL", help="a run's output_dir or its metrics.jsonl"
    )
    parser.add_argument("--output", type=Path, metavar="PNG", help="default: metrics.png next to metrics.jsonl")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ddp-train plot`; returns 0 (errors are raised as UsageError to the caller)."""
    args = parse_args(argv)
    file = metrics_file(args.metrics)
    output = args.output or file.with_name("metrics.png")
    if output.suffix.lower() != ".png":  # matplotlib would add ".png" to the name, or refuse the format in a traceback
        raise UsageError(f"--output {output} must name a .png file")
    save_figure(plot_metrics(read_epochs(file), title=str(file.parent)), output)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    run_as("plot")
