"""Host work per training step: the torch ops ddp-trainer dispatches beside the GPU benchmark's hand-written loop.

Run: python benchmarks/step_ops.py [--device cpu|cuda] [--model mlp] [--mode "bf16 + channels_last"] [--steps 50]
     [--timed-epochs 20] [--workers 0]
Where the host sets the pace (bf16 eager on a GPU: the kernels take less time than launching them), every op the
step adds costs throughput. Timing that on a noisy CPU says little; counting does not: both loops of
`gpu_throughput.py` (the same model, data, loader and fused SGD) train an epoch each under torch.profiler, and the
table gives the ops per step each dispatches, those called from Python (each a trip through the dispatcher) and all
of them (with the ones they call), plus CUDA kernels and their time on a GPU; a second table gives the host's own µs
per step in each op: the same op slower in one loop points beside the ops (the allocator, the launch queue, another
thread), while differences of either sign across the table are the profiled epoch's noise. Then both loops train
timed epochs in turn, and the fastest epoch of each gives µs per step: where it exceeds the kernels' µs, the host sets
the pace. The timed epochs also give the host's µs per step in each phase of both loops (`Stopwatch`), which says
where the extra time goes. The counts hardly depend on the model, so the default is a small MLP that runs in seconds
on a CPU; with `--workers 0` the main process loads the batches in both loops.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from common import Report, at_least, markdown_table, median
from gpu_throughput import MODES, Mode, Settings, SideBySide, hand_written_epoch
from gpu_throughput import ddp_trainer_recipe as recipe
from torch.profiler import ProfilerActivity, profile
from torch.utils.data.dataloader import _BaseDataLoaderIter

from ddp_trainer.config import ModelConfig
from ddp_trainer.errors import UsageError

PROFILED_EPOCH = 1  # the second: epoch 0 warms up both loops (allocator, autocast, the loader's workers)
TOP_ROWS = 12
MLP_HIDDEN = [64]  # a small MLP, whose step is mostly the host's work
LR = 0.01  # both loops: the recipe's 0.1 makes the MLP diverge within 20 epochs, and ops and time do not depend on it
LOOPS = {"hand": "hand-written", "ours": "ddp-trainer"}
# Functions both loops call once a step, in this order: (owner, name, the phase up to the call, the call's phase).
BOUNDARIES = (
    (_BaseDataLoaderIter, "__next__", "back to the loader", "loader"),
    (torch.nn.functional, "cross_entropy", "to device, forward", "loss"),
    (torch.Tensor, "backward", "after the loss", "backward"),
    (torch, "_fused_sgd_", "before the optimizer kernels", "optimizer kernels"),
    (torch.optim.Optimizer, "zero_grad", "after the optimizer kernels", "zero_grad"),
)
# An epoch's edges apart from its steps: with persistent loader workers the first batch took 20 ms on this CPU (4
# workers), a third of a millisecond per step over a 60-step epoch, and its noise would hide in the loader's phase.
EPOCH_START = "the epoch's start, to its first batch"
EPOCH_END = "the epoch's end (waits for the GPU)"
PHASES = [EPOCH_START] + [phase for *_, before, call in BOUNDARIES for phase in (before, call)] + [EPOCH_END]


class Stopwatch:
    """Host seconds of each phase of the step, split at the functions both loops call (`BOUNDARIES`).

    Where the host sets the pace, a step's wall time is the host's: the phase where ddp-trainer's step is longer is
    where its extra host work is. Each boundary costs both loops the same two clock reads.
    """

    def __init__(self) -> None:
        self.loop: str | None = None
        self.fed = False  # whether the running epoch's first batch has arrived
        self.last = 0.0
        self.epochs: dict[str, list[Counter]] = {loop: [] for loop in LOOPS}

    def lap(self, phase: str) -> None:
        """The time since the last lap belongs to `phase` (while a timed epoch runs)."""
        now = time.perf_counter()
        if self.loop is not None:
            if not self.fed:  # up to the first batch's arrival, the time is the epoch's start
                self.fed, phase = phase == "loader", EPOCH_START
            self.epochs[self.loop][-1][phase] += now - self.last
        self.last = now

    def timing(self, loop: str, run: Callable[[], Any]) -> Callable[[], Any]:
        """`run` (an epoch of `loop`), with its phases kept as a new epoch of that loop."""

        def timed() -> Any:
            self.loop, self.fed, self.last = loop, False, time.perf_counter()
            self.epochs[loop].append(Counter())
            try:
                return run()
            finally:
                self.lap(EPOCH_END)
                self.loop = None

        return timed

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Every boundary function laps on entry and on exit while this lasts."""
        originals = [(owner, name, getattr(owner, name)) for owner, name, *_ in BOUNDARIES]
        for (owner, name, original), (*_, before, call) in zip(originals, BOUNDARIES, strict=True):
            setattr(owner, name, self._lapping(original, before, call))
        try:
            yield
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)

    def _lapping(self, function: Callable[..., Any], before: str, call: str) -> Callable[..., Any]:
        @functools.wraps(function)
        def lapping(*args: Any, **kwargs: Any) -> Any:
            self.lap(before)
            try:
                return function(*args, **kwargs)
            finally:
                self.lap(call)

        return lapping

    def per_step(self, loop: str, steps: int) -> dict[str, float]:
        """µs per step of each phase, and of the whole step: medians over the loop's timed epochs."""
        epochs = self.epochs[loop]
        phases = {phase: median([1e6 * epoch[phase] / steps for epoch in epochs]) for phase in PHASES}
        return {**phases, "whole step": median([1e6 * sum(epoch.values()) / steps for epoch in epochs])}


def counted(run: Callable[[], Any], device: torch.device) -> tuple[Any, dict[str, Counter]]:
    """Run an epoch under torch.profiler: its result, counts of top-level ops, all ops and CUDA kernels, the
    kernels' µs (how long the GPU was busy), and the host's own µs in each op and runtime call."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        result = run()
    counts: dict[str, Counter] = {kind: Counter() for kind in ("top", "all", "kernels", "kernel_us", "host_us")}
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            counts["kernels"][event.name] += 1
            counts["kernel_us"][event.name] += event.device_time_total
            continue
        counts["host_us"][event.name] += event.self_cpu_time_total
        if event.name.startswith("aten::"):  # the profiler's own and the Python annotations are not ops
            counts["all"][event.name] += 1
            if event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::"):
                counts["top"][event.name] += 1
    return result, counts


def measure_both(
    model: str, mode: Mode, settings: Settings, timed_epochs: int, workers: int
) -> tuple[dict[str, dict[str, Counter]], dict[str, list[float]], Stopwatch]:
    """Both loops side by side in this process: op counts over one epoch each, after a warm-up epoch; then the
    seconds of `timed_epochs` epochs of each, alternating which goes first, and their phases."""
    device = torch.device(settings.device)
    model_cfg = ModelConfig(name=model, hidden_sizes=MLP_HIDDEN, cifar_stem=model.startswith("resnet"))
    hand_epoch = hand_written_epoch(model_cfg, mode, settings.batch_size, settings.steps, device, workers, LR)
    stopwatch = Stopwatch()
    pairs = SideBySide(stopwatch.timing("hand", hand_epoch))
    counts: dict[str, dict[str, Counter]] = {}

    def each_epoch(ours: Callable[[], Any], epoch: int) -> Any:
        if epoch < PROFILED_EPOCH:
            hand_epoch()
            return ours()
        if epoch != PROFILED_EPOCH:
            return pairs.alternate(stopwatch.timing("ours", ours), epoch)
        counts["hand"] = counted(hand_epoch, device)[1]
        result, counts["ours"] = counted(ours, device)
        return result

    with tempfile.TemporaryDirectory(prefix="ddp-bench-ops-") as output_dir:
        args = [*recipe(model, mode, settings, Path(output_dir)), f"data.num_workers={workers}", f"optim.lr={LR}"]
        args.append(f"model.hidden_sizes=[{','.join(map(str, MLP_HIDDEN))}]")
        with stopwatch.installed():  # plain Python around the boundaries: the op counts stay the same
            pairs.train([*args, f"trainer.epochs={PROFILED_EPOCH + 1 + timed_epochs}"], each_epoch)
    return counts, pairs.seconds, stopwatch


def host_table(counts: dict[str, dict[str, Counter]], steps: int) -> str:
    """The ops and runtime calls whose own host µs per step differ most between the loops: the same op slower in
    one loop says its cost is not in the ops it dispatches (allocator, launch queue, a lock, another thread)."""
    ours, theirs = counts["ours"]["host_us"], counts["hand"]["host_us"]
    extra = {name: (ours[name] - theirs[name]) / steps for name in ours | theirs}
    names = sorted(extra, key=lambda name: -abs(extra[name]))[:TOP_ROWS]
    rows = [
        [f"`{name}`", f"{theirs[name] / steps:,.1f}", f"{ours[name] / steps:,.1f}", f"{extra[name]:+,.1f}"]
        for name in names
    ]
    return markdown_table(["op or call (host µs per step, profiled)", *LOOPS.values(), "extra"], rows)


def phase_table(stopwatch: Stopwatch, steps: int) -> str:
    """Host µs per step in each phase, both loops and ddp-trainer's extra."""
    hand, ours = (stopwatch.per_step(loop, steps) for loop in LOOPS)
    rows = [
        [phase, f"{hand[phase]:,.1f}", f"{ours[phase]:,.1f}", f"{ours[phase] - hand[phase]:+,.1f}"] for phase in hand
    ]
    return markdown_table(["phase of the step", *LOOPS.values(), "extra"], rows)


def epoch_table(seconds: dict[str, list[float]], steps: int) -> str:
    """Each timed epoch's µs per step in both loops, in the order they ran: a gap that only some epochs have shows."""
    rows = []
    for index, (hand, ours) in enumerate(zip(seconds["hand"], seconds["ours"], strict=True)):
        first = LOOPS["hand"] if (PROFILED_EPOCH + 1 + index) % 2 == 0 else LOOPS["ours"]  # as SideBySide.alternate
        rows.append(
            [str(index + 1), first, f"{1e6 * hand / steps:,.1f}", f"{1e6 * ours / steps:,.1f}", f"{hand / ours:.3f}"]
        )
    headers = ["timed epoch", "first", "hand-written µs per step", "ddp-trainer µs per step", "rate ratio"]
    return markdown_table(headers, rows)


def run(model: str, mode_name: str, settings: Settings, timed_epochs: int, workers: int) -> Report:
    """The table of ops (and µs) per step, and the ops ddp-trainer adds; or the reason this was skipped."""
    title = f"Torch ops per training step ({model}, {mode_name})"
    if settings.device == "cuda" and not torch.cuda.is_available():
        return Report(title, "Skipped: no CUDA device here (`torch.cuda.is_available()` is False).\n")
    counts, seconds, stopwatch = measure_both(model, MODES[mode_name], settings, timed_epochs, workers)
    kinds = ["top", "all"] + (["kernels", "kernel_us"] if settings.device == "cuda" else [])
    per_step = {loop: [sum(counts[loop][kind].values()) / settings.steps for kind in kinds] for loop in LOOPS}
    if timed_epochs:
        for loop in LOOPS:  # the fastest epoch: the least disturbed by whatever else the machine runs
            per_step[loop].append(1e6 * min(seconds[loop]) / settings.steps)
    rows = [[LOOPS[loop], *(f"{value:,.1f}" for value in values)] for loop, values in per_step.items()]
    differences = [ours - theirs for theirs, ours in zip(*per_step.values(), strict=True)]
    rows.append(["extra", *(f"{difference:+,.1f}" for difference in differences)])
    headers = ["loop", "ops called per step", "ops dispatched per step"]
    headers += ["CUDA kernels per step", "CUDA kernel µs per step"] if settings.device == "cuda" else []
    headers += [f"µs per step (fastest of {timed_epochs} epochs)"] if timed_epochs else []
    ours, theirs = counts["ours"]["top"], counts["hand"]["top"]
    extra = Counter({op: ours[op] - theirs[op] for op in ours | theirs if ours[op] != theirs[op]})
    extra_rows = [[f"`{op}`", f"{calls / settings.steps:+.2f}"] for op, calls in extra.most_common(TOP_ROWS)]
    body = f"{markdown_table(headers, rows)}\n\n{markdown_table(['op called', 'extra per step'], extra_rows)}\n\n"
    body += f"{host_table(counts, settings.steps)}\n\n"
    if timed_epochs:
        body += f"{phase_table(stopwatch, settings.steps)}\n\n{epoch_table(seconds, settings.steps)}\n\n"
    body += (
        f"{model}, {mode_name}, batch {settings.batch_size}, {settings.steps} steps per epoch, on {settings.device}, "
        f"{workers} loader workers: both loops in one process, an epoch of each under torch.profiler after a warm-up "
        "epoch, then timed epochs of each in turn. 'Called' counts the ops a Python line dispatches, 'dispatched' "
        "also the ops they call in turn. The phases split each timed epoch's host time where both loops call the same "
        "functions (the loader, the loss, backward, the fused optimizer kernels, zero_grad): µs per step, medians over "
        "the timed epochs; the epoch's start (up to its first batch) and end, spread over its steps, are phases of "
        "their own. The last table gives every timed epoch, and its rate ratio (ddp-trainer's steps/s over the "
        "hand-written loop's).\n"
    )
    return Report(title, body)


def main() -> None:
    """Parse the flags, count, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="mlp", help="a model.name: mlp (64 hidden units), resnet18, ...")
    parser.add_argument("--mode", choices=sorted(MODES), default="bf16 + channels_last")
    parser.add_argument("--batch-size", type=at_least(1), default=16)
    parser.add_argument("--steps", type=at_least(1), default=50, help="steps per epoch")
    parser.add_argument(
        "--timed-epochs", type=at_least(0), default=20, help="epochs of each loop timed after the counts (0: none)"
    )
    parser.add_argument("--workers", type=at_least(0), default=0, help="DataLoader workers of both loops")
    args = parser.parse_args()
    settings = Settings(args.device, args.batch_size, args.steps)
    try:
        report = run(args.model, args.mode, settings, args.timed_epochs, args.workers)
    except UsageError as error:  # a --model that is no model.name, say: the config's one line, not a traceback
        parser.error(str(error))
    print(report.markdown())


if __name__ == "__main__":
    main()
