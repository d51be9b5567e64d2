"""Checkpoint cost: ddp-trainer's save and load of a resnet18 `last.pt` against bare torch.save / torch.load.

Run: python benchmarks/checkpoint_cost.py [--quick] [--repeats 3]
1. The state is a real `last.pt` written by ddp-trainer (the CIFAR-10 resnet18 recipe on synthetic 32x32 images,
   SGD with momentum); it is saved and loaded in this process by `ddp_trainer.checkpoint` and by bare torch calls.
2. The same recipe trained through the CLI with `checkpoint.every_n_steps` off and on: the difference in an
   epoch's `time/train_s` is what the in-training checkpoints cost, all of it (state, RNG gather, file, barrier).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import (
    Report,
    add_common_arguments,
    filesystem_of,
    launch,
    markdown_table,
    median,
    repeats_for,
    spread,
)
from variants import ddp_trainer_epochs

from ddp_trainer import checkpoint

BATCH_SIZE = 16
STEPS_PER_EPOCH = 24
EVERY_N_STEPS = 4  # 6 checkpoints per epoch: their cost stands well above the noise of an epoch's time
MAX_SAVE_OVERHEAD = 0.10  # target: save_last at most 10% slower than a bare torch.save
FILE_ROUNDS = 9  # a save or load takes ~0.1 s and varies by tens of ms: many rounds, cheaply
RECIPE = [
    "--config",
    "configs/cifar10_resnet18.yaml",
    "data.name=synthetic",
    "data.num_workers=0",
    f"data.batch_size={BATCH_SIZE}",
    f"data.synthetic.train_size={BATCH_SIZE * STEPS_PER_EPOCH}",
    "data.synthetic.val_size=64",
    "model.cifar_stem=false",  # the 7x7/2 stem: 16x less compute on CPU, the same checkpoint within 0.1%
    "trainer.epochs=2",
    "trainer.device=cpu",
    "trainer.resume=none",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=100",
]


def train_seconds(every_n_steps: int, output_dir: Path) -> float:
    """`time/train_s` of the second epoch (the first is warm-up) of the recipe with this checkpoint interval."""
    interval = f"checkpoint.every_n_steps={every_n_steps}"
    launch(["-m", "ddp_trainer.train", *RECIPE, interval, f"output_dir={output_dir}"], processes=1)
    seconds, _ = ddp_trainer_epochs(output_dir)
    return seconds[1]


def bare_save(state: dict[str, Any], path: Path) -> None:
    """torch.save into the page cache, as most training scripts do."""
    torch.save(state, path)


def bare_save_fsync(state: dict[str, Any], path: Path) -> None:
    """torch.save, then fsync: the file is on disk, but a crash mid-write still leaves a partial file."""
    with path.open("wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())


def timed(action: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def file_operations(state: dict[str, Any], folder: Path) -> dict[str, list[float]]:
    """Seconds of each save and load variant, interleaved over FILE_ROUNDS rounds."""
    bare, trainer_dir = folder / "bare.pt", folder / "checkpoints"
    operations: dict[str, Callable[[], object]] = {
        "bare `torch.save`": lambda: bare_save(state, bare),
        "bare `torch.save` + fsync": lambda: bare_save_fsync(state, bare),
        "ddp-trainer `save_last` (keep_last=2)": lambda: checkpoint.save_last(state, trainer_dir, keep_last=2),
        "bare `torch.load(weights_only=True)`": lambda: torch.load(bare, map_location="cpu", weights_only=True),
        "ddp-trainer `load`": lambda: checkpoint.load(trainer_dir / "last.pt"),
    }
    seconds: dict[str, list[float]] = {name: [] for name in operations}
    for _ in range(FILE_ROUNDS + 1):
        for name, action in operations.items():
            seconds[name].append(timed(action))
    return {name: values[1:] for name, values in seconds.items()}  # round 1 warms caches and allocator


def run(repeats: int) -> Report:
    """Measure the in-training overhead, then the file operations on the checkpoint those runs wrote."""
    with tempfile.TemporaryDirectory(prefix="ddp-bench-ckpt-") as temporary:
        folder = Path(temporary)
        training: dict[int, list[float]] = {0: [], EVERY_N_STEPS: []}
        for repeat in range(repeats):
            for every in training:
                training[every].append(train_seconds(every, folder / f"run-{every}-{repeat}"))
        state = torch.load(folder / "run-0-0" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
        megabytes = (folder / "run-0-0" / "checkpoints" / "last.pt").stat().st_size / 1e6
        files = file_operations(state, folder)
        filesystem = filesystem_of(folder)
    return Report("Checkpoint cost (resnet18, SGD with momentum)", _body(files, training, megabytes, filesystem))


def _body(files: dict[str, list[float]], training: dict[int, list[float]], megabytes: float, filesystem: str) -> str:
    bare_save_s = median(files["bare `torch.save`"])
    bare_load_s = median(files["bare `torch.load(weights_only=True)`"])
    rows = []
    for name, values in files.items():
        reference = bare_load_s if "load" in name else bare_save_s
        rows.append([name, f"{1000 * median(values):,.0f}", spread(values), f"{median(values) / reference:.2f}"])
    file_table = markdown_table(["operation", "ms", "spread", "vs bare"], rows)
    save_ratio = median(files["ddp-trainer `save_last` (keep_last=2)"]) / bare_save_s
    verdict = "met" if save_ratio <= 1 + MAX_SAVE_OVERHEAD else "missed"
    without, with_checkpoints = median(training[0]), median(training[EVERY_N_STEPS])
    checkpoints = STEPS_PER_EPOCH // EVERY_N_STEPS
    per_checkpoint = (with_checkpoints - without) / checkpoints
    step_s = without / STEPS_PER_EPOCH
    train_rows = [
        ["`checkpoint.every_n_steps=0`", f"{without:.2f}", spread(training[0]), "-", "-"],
        [
            f"`checkpoint.every_n_steps={EVERY_N_STEPS}` ({checkpoints} per epoch)",
            f"{with_checkpoints:.2f}",
            spread(training[EVERY_N_STEPS]),
            f"{100 * (with_checkpoints / without - 1):+.0f}%",
            f"{1000 * per_checkpoint:,.0f}",
        ],
    ]
    train_headers = ["epoch of the recipe", "train s", "spread", "overhead", "ms per checkpoint"]
    train_table = markdown_table(train_headers, train_rows)
    return (
        f"{file_table}\n\nA {megabytes:.0f} MB `last.pt` (model, momentum buffers, RNG streams, config) on "
        f"{filesystem}, "
        f"median of {len(files['bare `torch.save`'])} rounds after a warm-up round. ddp-trainer writes a temporary "
        "file, fsyncs it and the folder, renames it over `last.pt` and links it as `step-<step>.pt`, so a crash never "
        "leaves a partial checkpoint; bare `torch.save` only reaches the page cache. Target: save within 10% of bare "
        f"`torch.save`: {save_ratio:.2f}, {verdict}.\n\n"
        f"{train_table}\n\n"
        f"{STEPS_PER_EPOCH} steps of batch {BATCH_SIZE} ({1000 * step_s:.0f} ms each) per epoch, 1 process, median of "
        f"{len(training[0])} run(s). At this step time a checkpoint every 1,000 steps would cost "
        f"{100 * per_checkpoint / (1000 * step_s):.2f}% of training time.\n"
    )


def main() -> None:
    """Parse the flags, measure, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    args = parser.parse_args()
    print(run(repeats_for(args.quick, args.repeats)).markdown())


if __name__ == "__main__":
    main()
