"""GPU throughput: resnet18/50 images/s with bf16 + channels_last (+ torch.compile), against a hand-written loop.

Run: python benchmarks/gpu_throughput.py [--quick] [--repeats 3] [--budget-s S]     (on a machine with a CUDA GPU)
Without CUDA it prints why it skipped and exits 0; `--device cpu --batch-size 8 --steps 3` runs the same
comparison on the CPU, slowly, to check the script. ddp-trainer runs the CIFAR-10 resnet18 recipe through its CLI
(synthetic 32x32 images, `trainer.precision`, `model.channels_last`, `trainer.compile`); the hand-written loop
is the AMP recipe's loop on the same model, data, batch, DataLoader settings and fused SGD. Both run in one process
per model and mode, an epoch of each in turn, so the machine's drift between processes and over minutes cancels out
of each epoch's ratio; epoch 1 is warm-up (and compilation).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    BENCHMARKS_DIR,
    Report,
    add_common_arguments,
    at_least,
    launch,
    markdown_table,
    median,
    read_json,
    repeats_for,
    spread,
    write_json,
)
from torch.utils.data import DataLoader
from variants import ddp_trainer_epochs

from ddp_trainer import models
from ddp_trainer.cli import train as cli_train
from ddp_trainer.config import ModelConfig, SyntheticConfig
from ddp_trainer.data.datasets import synthetic
from ddp_trainer.trainer import Trainer

MODELS = ("resnet18", "resnet50")
IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
LOADER_WORKERS = 4  # the recipe's data.num_workers
Epoch = Callable[[], None]  # trains one epoch and waits for the GPU


@dataclass(frozen=True)
class Settings:
    """Where and how much to train: the device, the batch, the steps per epoch and the timed epochs."""

    device: str = "cuda"
    batch_size: int = 256
    steps: int = 50
    # After one warm-up (and compilation) epoch. An even number: each loop goes first in half of them, and the
    # epoch after the trainer's evaluation and checkpoint ran up to 8% faster than the next one on an H200.
    timed_epochs: int = 4


@dataclass(frozen=True)
class Mode:
    """One combination of the speed options."""

    precision: str
    channels_last: bool
    compile: bool

    def overrides(self) -> list[str]:
        """The ddp-trainer config keys that turn these options on."""
        return [
            f"trainer.precision={self.precision}",
            f"model.channels_last={str(self.channels_last).lower()}",
            f"trainer.compile={str(self.compile).lower()}",
        ]


@dataclass(frozen=True)
class Pair:
    """Images/s of each timed epoch of both loops on one model and mode, measured side by side in one process.

    Timed epoch k (from 0) ran ddp-trainer's epoch first when k is even, the hand-written one first when k is odd
    (`SideBySide.alternate`): each pair of timed epochs is a crossover, one of each order.
    """

    hand_epochs: list[float]
    ours_epochs: list[float]

    @property
    def hand(self) -> float:
        """The hand-written loop's images/s: the median over its timed epochs."""
        return median(self.hand_epochs)

    @property
    def ours(self) -> float:
        """ddp-trainer's images/s: the median over its timed epochs."""
        return median(self.ours_epochs)

    @property
    def epoch_ratios(self) -> list[float]:
        """ddp-trainer's rate over the hand-written loop's, epoch by epoch."""
        return [ours / hand for hand, ours in zip(self.hand_epochs, self.ours_epochs, strict=True)]

    @property
    def ratio(self) -> float:
        """The median over crossovers of the geometric mean of their two epoch ratios; with one timed epoch, its ratio.

        Whichever loop went first in a pair of epochs ran up to 8% faster on an H200: a factor that multiplies one
        epoch's ratio divides the other's, so their geometric mean is free of it.
        """
        ratios = self.epoch_ratios
        crossovers = [(first * second) ** 0.5 for first, second in zip(ratios[0::2], ratios[1::2], strict=False)]
        return median(crossovers or ratios)

    def by_order(self) -> tuple[float, float]:
        """The median epoch ratio when ddp-trainer went first, and when the hand-written loop did (NaN: never)."""
        ratios = self.epoch_ratios
        ours_first, hand_first = ratios[0::2], ratios[1::2]
        return median(ours_first), median(hand_first) if hand_first else float("nan")

    def first_gains(self) -> tuple[float, float]:
        """Each loop's median rate going first over going second (NaN: one timed epoch). The crossovers cancel a gain
        both loops share; unequal ones leave sqrt(ours / hand-written) in the ratio."""
        if len(self.ours_epochs) < 2:
            return float("nan"), float("nan")
        ours = median(self.ours_epochs[0::2]) / median(self.ours_epochs[1::2])
        return ours, median(self.hand_epochs[1::2]) / median(self.hand_epochs[0::2])

    def __str__(self) -> str:
        # The epochs' spread says whether the noise is within a process or between processes.
        ours_first, hand_first = self.by_order()
        gains = "ddp-trainer x{:.3f}, hand-written x{:.3f}".format(*self.first_gains())
        return (
            f"hand-written {self.hand:,.0f} img/s (epochs {spread(self.hand_epochs)}), ddp-trainer {self.ours:,.0f} "
            f"img/s (epochs {spread(self.ours_epochs)}), crossovers {self.ratio:.3f}x (epochs with ddp-trainer first "
            f"{ours_first:.3f}x, hand-written first {hand_first:.3f}x; going first: {gains})"
        )


Cell = tuple[str, str]  # (model, options)

MODES = {
    "fp32": Mode("32", channels_last=False, compile=False),
    "bf16 + channels_last": Mode("bf16", channels_last=True, compile=False),
    "bf16 + channels_last + compile": Mode("bf16", channels_last=True, compile=True),
}


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so an epoch's time includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_written_epoch(
    model_cfg: ModelConfig,
    mode: Mode,
    batch_size: int,
    steps: int,
    device: torch.device,
    workers: int = LOADER_WORKERS,
    lr: float = 0.1,
) -> Epoch:
    """The PyTorch AMP recipe's epoch (autocast forward, backward, step), with channels_last and compile as asked;
    SGD at the CIFAR recipe's settings, `lr` included unless told otherwise."""
    torch.manual_seed(0)
    model = models.build(model_cfg, IMAGE_SHAPE, NUM_CLASSES)
    memory_format = torch.channels_last if mode.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    # Fused, like ddp-trainer's: the comparison measures the loop around the optimizer, not the optimizer.
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, fused=True)
    train_model = torch.compile(model) if mode.compile else model
    train_set, _ = synthetic(SyntheticConfig(batch_size * steps, 64, list(IMAGE_SHAPE), NUM_CLASSES))
    pin = device.type == "cuda"
    loader = DataLoader(
        train_set, batch_size, shuffle=True, num_workers=workers, pin_memory=pin, persistent_workers=workers > 0
    )

    def run_epoch() -> None:
        for inputs, targets in loader:
            inputs = inputs.to(device, non_blocking=True, memory_format=memory_format)
            targets = targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode.precision == "bf16"):
                loss = F.cross_entropy(train_model(inputs), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)

    return run_epoch


def ddp_trainer_recipe(model_name: str, mode: Mode, settings: Settings, output_dir: Path) -> list[str]:
    """`ddp-train` arguments: the CIFAR-10 resnet recipe on synthetic images with this mode's config keys."""
    recipe = ["--config", "configs/cifar10_resnet18.yaml", "data.name=synthetic", f"model.name={model_name}"]
    recipe.append(f"model.cifar_stem={str(model_name.startswith('resnet')).lower()}")  # the recipe's, for its resnet
    recipe += [f"data.synthetic.train_size={settings.batch_size * settings.steps}", "data.synthetic.val_size=64"]
    recipe += [f"data.batch_size={settings.batch_size}", "optim.scheduler=none", "optim.warmup_steps=0"]
    recipe += [
        f"trainer.epochs={settings.timed_epochs + 1}",
        f"trainer.device={settings.device}",
        "trainer.resume=none",
    ]
    recipe += ["trainer.progress_bar=false", "trainer.log_every_n_steps=100", f"output_dir={output_dir}"]
    return [*recipe, *mode.overrides()]


class SideBySide:
    """ddp-trainer's CLI trains in this process, and beside each of its epochs the hand-written loop trains one."""

    def __init__(self, hand_epoch: Epoch) -> None:
        self.hand_epoch = hand_epoch
        self.seconds: dict[str, list[float]] = {"hand": [], "ours": []}

    def timed(self, name: str, run: Callable[[], Any]) -> Any:
        """Run one epoch and keep its seconds under `name` ("hand" or "ours")."""
        started = time.perf_counter()
        result = run()  # both end waiting for the GPU: ddp-trainer's epoch with its sums' host sync
        self.seconds[name].append(time.perf_counter() - started)
        return result

    def alternate(self, ours: Callable[[], Any], epoch: int) -> Any:
        """Time an epoch of each loop; the hand-written one first in even epochs, so drift favours neither loop."""
        if epoch % 2 == 0:
            self.timed("hand", self.hand_epoch)
        result = self.timed("ours", ours)
        if epoch % 2 == 1:
            self.timed("hand", self.hand_epoch)
        return result

    def train(self, args: list[str], each_epoch: Callable[[Callable[[], Any], int], Any]) -> None:
        """ddp-trainer's CLI with `args`; `each_epoch(ours, epoch)` runs its epochs (`ours()` trains one)."""
        # fit() trains every epoch through this one method, and its time/train_s times the same call.
        train_epoch = Trainer._train_epoch
        Trainer._train_epoch = lambda trainer, epoch: each_epoch(lambda: train_epoch(trainer, epoch), epoch)
        try:
            exit_code = cli_train.main(args)
        finally:
            Trainer._train_epoch = train_epoch
        if exit_code != 0:
            raise RuntimeError(f"ddp-trainer's run ({' '.join(args)}) ended with exit code {exit_code}")


def alternate_epochs(model_name: str, mode: Mode, settings: Settings, output_dir: Path) -> dict[str, list[float]]:
    """Both loops in this process, an epoch of each in turn: the seconds of every epoch of both."""
    model_cfg, device = ModelConfig(name=model_name, cifar_stem=True), torch.device(settings.device)
    pairs = SideBySide(hand_written_epoch(model_cfg, mode, settings.batch_size, settings.steps, device))
    pairs.train(ddp_trainer_recipe(model_name, mode, settings, output_dir), pairs.alternate)
    return pairs.seconds


def measure(model_name: str, mode_name: str, settings: Settings, folder: Path) -> Pair:
    """Both loops on one model and mode, epoch by epoch in one process of their own."""
    result = folder / "epochs.json"
    options = ["--worker", "--model", model_name, "--mode", mode_name, "--result", str(result)]
    options += ["--device", settings.device, "--batch-size", str(settings.batch_size), "--steps", str(settings.steps)]
    options += ["--timed-epochs", str(settings.timed_epochs)]
    launch([str(BENCHMARKS_DIR / "gpu_throughput.py"), *options], processes=1, timeout_s=1200)
    seconds = read_json(result)
    _, ours_steps = ddp_trainer_epochs(folder / "ddp-trainer")
    if set(ours_steps) != {settings.steps}:
        raise RuntimeError(f"ddp-trainer took {ours_steps} steps per epoch, not {settings.steps}")
    images = settings.batch_size * settings.steps
    # Epoch 0 is warm-up (and compilation) for both.
    return Pair(*([images / second for second in seconds[name][1:]] for name in ("hand", "ours")))


class Stopped(Exception):
    """SIGTERM (a lease's `timeout`) arrived: the table of what was measured is printed before the process ends."""


def _stop(signum: int, frame: Any) -> None:
    raise Stopped


def measure_all(
    settings: Settings, repeats: int, budget_s: float | None, cells: list[Cell]
) -> tuple[dict[Cell, list[Pair]], list[str], list[str]]:
    """A pair for every cell (model and mode) and repeat, until done or stopped, skipping a process that `budget_s`
    would not hold. Returns the pairs, each planned process left out (its cell and why), and a line per failure."""
    pairs: dict[Cell, list[Pair]] = {cell: [] for cell in cells}
    took: dict[Cell, float] = {}  # each cell's last process: resnet50's take longer than resnet18's
    started, failures, left_out = time.monotonic(), [], []
    plan = list(itertools.product(range(repeats), range(len(cells))))
    with tempfile.TemporaryDirectory(prefix="ddp-bench-gpu-") as temporary:
        for number, (repeat, index) in enumerate(plan):
            cell = cells[index]
            estimate = took.get(cell, max(took.values(), default=0.0))  # a cell not yet run: the longest so far
            if budget_s is not None and time.monotonic() - started + estimate > budget_s:
                left_out.append(f"{cell[0]}, {cell[1]} (past --budget-s)")  # a shorter cell after it may still fit
                continue
            folder = Path(temporary) / f"{cell[0]}-{index}-{repeat}"
            folder.mkdir()
            pair_started = time.monotonic()
            try:
                pair = measure(*cell, settings, folder)
            except Stopped:  # a table of what was measured beats none from a killed run
                return pairs, left_out + [f"{cells[i][0]}, {cells[i][1]} (stopped)" for _, i in plan[number:]], failures
            except (RuntimeError, subprocess.TimeoutExpired) as error:  # compile failing in one cell, say
                failures.append(f"{cell[0]}, {cell[1]}, repeat {repeat + 1}: {str(error).strip().splitlines()[-1]}")
                print(failures[-1], file=sys.stderr, flush=True)
                continue
            took[cell] = time.monotonic() - pair_started
            pairs[cell].append(pair)
            # A line per pair as it lands, so a run cut short by a time limit still reports what it measured.
            print(f"{cell[0]}, {cell[1]}: {pair}", file=sys.stderr, flush=True)
    return pairs, left_out, failures


def run(settings: Settings, repeats: int, budget_s: float | None = None, cells: list[Cell] | None = None) -> Report:
    """Both loops for every model and mode (or `cells`), repeated; or the reason this was skipped."""
    title = "GPU throughput (images/s, 1 GPU)" if settings.device == "cuda" else "Throughput on the CPU (script check)"
    if settings.device == "cuda" and not torch.cuda.is_available():
        return Report(title, "Skipped: no CUDA device here (`torch.cuda.is_available()` is False). Run on a GPU.\n")
    everything = [(model_name, mode_name) for model_name in MODELS for mode_name in MODES]
    pairs, left_out, failures = measure_all(settings, repeats, budget_s, cells or everything)
    rows = []
    for (model_name, mode_name), measured in pairs.items():
        if not measured:
            continue
        hand, ours = [pair.hand for pair in measured], [pair.ours for pair in measured]
        ratios = [pair.ratio for pair in measured]
        ours_first, hand_first = (median([pair.by_order()[order] for pair in measured]) for order in (0, 1))
        rows.append(
            [model_name, mode_name, f"{median(hand):,.0f}", spread(hand), f"{median(ours):,.0f}"]
            + [f"{median(ratios):.3f}", f"{min(ratios):.3f}-{max(ratios):.3f}" if len(ratios) > 1 else "-"]
            + [f"{ours_first:.3f} / {hand_first:.3f}"]
        )
    headers = ["model", "options", "hand-written img/s", "spread", "ddp-trainer img/s", "vs hand-written", "range"]
    headers.append("ddp-trainer first / hand-written first")
    device_name = torch.cuda.get_device_name() if settings.device == "cuda" else "CPU"
    body = (
        f"{markdown_table(headers, rows)}\n\n{device_name}, batch {settings.batch_size}, {settings.steps} steps per "
        f"epoch, 32x32 synthetic images, CIFAR stem, SGD. Both loops ran in one process per model, options and "
        f"repeat, an epoch of each in turn: img/s are medians over {settings.timed_epochs} timed epochs. Each pair "
        "of timed epochs is a crossover (ddp-trainer's epoch first, then the hand-written one first). 'vs "
        f"hand-written' is the median over up to {repeats} process(es) of the median over crossovers of the geometric "
        "mean of their two ratios of ddp-trainer's rate to the hand-written loop's, which cancels an advantage of "
        "going first; 'range' its lowest and highest; the last column the median ratio of the epochs of each order.\n"
    )
    if left_out:
        counted = "; ".join(f"{what} x{count}" for what, count in collections.Counter(left_out).items())
        body += f"\n{len(left_out)} planned process(es) left out: {counted}.\n"
    body += "".join(f"\nFailed: {failure}\n" for failure in failures)
    return Report(title, body, failed=bool(failures))


def main() -> None:
    """Parse the flags; measure (or, with --worker, be the process that runs both loops)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--batch-size", type=at_least(1), default=256)
    parser.add_argument("--steps", type=at_least(1), default=50, help="steps per epoch")
    parser.add_argument(
        "--timed-epochs", type=at_least(1), default=4, help="epochs of each loop timed after a warm-up one"
    )
    parser.add_argument(
        "--budget-s",
        type=at_least(0, float),
        default=None,
        help="skip a process that its cell's last (or the longest so far) says would end later",
    )
    # A GPU lease is short: a run can spend it on the cells still in question.
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS, help="the models to measure")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="the options to measure")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.timed_epochs > 1 and args.timed_epochs % 2:  # the last epoch would pair with none: out of the ratio
        parser.error(f"argument --timed-epochs: {args.timed_epochs} is odd: give 1 or an even count (crossovers)")
    settings = Settings(args.device, args.batch_size, args.steps, args.timed_epochs)
    if args.worker:
        output_dir = args.result.parent / "ddp-trainer"
        write_json(args.result, alternate_epochs(args.model, MODES[args.mode], settings, output_dir))
        return
    cells = [(model_name, mode_name) for model_name in args.models for mode_name in args.modes]
    signal.signal(signal.SIGTERM, _stop)  # `timeout` ends a lease with SIGTERM: print the table first
    report = run(settings, repeats_for(args.quick, args.repeats), args.budget_s, cells)
    print(report.markdown())
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
