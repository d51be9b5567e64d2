"""Launch every variant on every workload and world size, interleaved, and read back steps/s and start-up time.

ddp-trainer runs through its real CLI (`python -m ddp_trainer.train`, under torchrun for 2 ranks) and is timed by
its own `time/train_s` (an epoch's training, without evaluation or checkpoints) in metrics.jsonl; the other
variants run benchmarks/frameworks.py, launched the same way and timed the same way. Epoch 1 is warm-up for all.
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from common import BENCHMARKS_DIR, launch, median, read_json
from workloads import Workload

LABELS = {
    "torch": "(a) hand-written PyTorch",
    "ddp-trainer": "(b) ddp-trainer",
    "lightning": "(c) Lightning Trainer",
    "accelerate": "(d) Accelerate",
}
OPTIONAL = {"lightning": "lightning", "accelerate": "accelerate"}  # variant -> module of the `[bench]` extra


def run_length(quick: bool) -> tuple[int, float]:
    """(epochs per run, warm-up included; fraction of each workload's samples per epoch), full or --quick."""
    return (2, 0.5) if quick else (3, 1.0)


@dataclass(frozen=True)
class RunResult:
    """One launch: steps per second of one rank (median over its timed epochs) and seconds to the first step."""

    variant: str
    workload: str
    world_size: int
    steps_per_s: float
    first_step_s: float


def available_variants() -> tuple[list[str], list[str]]:
    """(variants that can run here, notes on those left out because their framework is not installed)."""
    present, notes = [], []
    for variant in LABELS:
        module = OPTIONAL.get(variant)
        if module is None or find_spec(module) is not None:
            present.append(variant)
        else:
            notes.append(f"{LABELS[variant]} skipped: `{module}` is not installed (pip install -e '.[bench]').")
    return present, notes


def ddp_trainer_epochs(output_dir: Path) -> tuple[list[float], list[int]]:
    """Training seconds and optimizer steps of each epoch, from ddp-trainer's metrics.jsonl."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [record for record in records if "time/train_s" in record]  # epoch records, not running ones
    steps = [record["step"] for record in epochs]
    per_epoch = [now - before for before, now in zip([0, *steps[:-1]], steps, strict=True)]
    return [record["time/train_s"] for record in epochs], per_epoch


def worker_epochs(result: Path) -> tuple[list[float], list[int]]:
    """Seconds and optimizer steps of each epoch, from a worker's result file (as ddp_trainer_epochs gives them)."""
    written = read_json(result)
    seconds = written["epoch_seconds"]
    return seconds, [written["steps_per_epoch"]] * len(seconds)


def timed_rate(seconds: list[float], steps: list[int]) -> float:
    """Median steps/s over the epochs after the first, which is warm-up for every variant."""
    return median([count / second for count, second in zip(steps[1:], seconds[1:], strict=True)])


def ddp_trainer_args(
    workload: Workload, train_size: int, epochs: int, output_dir: Path, first_step_file: Path | None = None
) -> list[str]:
    """Command-line arguments of `ddp-train` for this workload, with its outputs in `output_dir`."""
    return [
        *workload.trainer_overrides(train_size, first_step_file),
        f"trainer.epochs={epochs}",
        "trainer.device=cpu",
        "trainer.resume=none",
        "trainer.progress_bar=false",
        "trainer.log_every_n_steps=100",  # running metrics synced as often as the tutorial prints its loss
        "checkpoint.keep_last=0",
        f"output_dir={output_dir}",
    ]


def run_once(
    variant: str,
    workload: Workload,
    world_size: int,
    train_size: int,
    epochs: int,
    folder: Path,
    extra_overrides: Sequence[str] = (),
) -> RunResult:
    """Launch one variant (ddp-trainer with `extra_overrides`), wait for it, and turn what it wrote into a RunResult."""
    folder.mkdir(parents=True)
    stamp = folder / "first_step"
    if variant == "ddp-trainer":
        output_dir = folder / "run"
        args = ddp_trainer_args(workload, train_size, epochs, output_dir, stamp)
        started = launch(["-m", "ddp_trainer.train", *args, *extra_overrides], world_size)
        seconds, steps = ddp_trainer_epochs(output_dir)
    else:
        result = folder / "result.json"
        script = str(BENCHMARKS_DIR / "frameworks.py")
        options = ["--framework", variant, "--workload", workload.key, "--train-size", str(train_size)]
        options += ["--epochs", str(epochs), "--result", str(result), "--first-step-file", str(stamp)]
        started = launch([script, *options], world_size)
        seconds, steps = worker_epochs(result)
    # The first step is when the last rank started it: DDP's constructor already made the ranks meet.
    first_step = max(float(line) for line in stamp.read_text().split()) - started
    return RunResult(variant, workload.key, world_size, timed_rate(seconds, steps), first_step)


def measure(
    workloads: list[Workload],
    variants: list[str],
    world_sizes: tuple[int, ...],
    repeats: int,
    epochs: int,
    size_factor: float = 1.0,
) -> list[RunResult]:
    """Every (workload, world size, variant) `repeats` times; variants interleaved so drifting load hits all alike."""
    plan = list(itertools.product(range(repeats), workloads, world_sizes, variants))
    results = []
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as temporary:
        for repeat, workload, world_size, variant in plan:
            folder = Path(temporary) / f"{workload.key}-{world_size}-{variant}-{repeat}"
            train_size = int(workload.train_size * size_factor)
            result = run_once(variant, workload, world_size, train_size, epochs, folder)
            results.append(result)
            print(
                f"  [{len(results)}/{len(plan)}] {workload.key}, {world_size} process(es), {variant}: "
                f"{result.steps_per_s:,.0f} steps/s, first step after {result.first_step_s:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    return results


def select(results: list[RunResult], variant: str, workload: str, world_size: int) -> list[RunResult]:
    """The repeats of one (variant, workload, world size)."""
    return [r for r in results if (r.variant, r.workload, r.world_size) == (variant, workload, world_size)]


def median_rate(results: list[RunResult], variant: str, workload: str, world_size: int) -> float:
    """Median steps/s of one rank over the repeats of one (variant, workload, world size)."""
    return median([r.steps_per_s for r in select(results, variant, workload, world_size)])
