"""Where ddp-trainer's per-step overhead goes: the torch ops and Python calls it adds to the hand-written loop.

Run: python benchmarks/profile_step.py [--workload mlp] [--repeats 3]
1. Both loops in this process (1 process, 1 thread), alternating, without profilers: µs per step.
2. Each loop once under torch.profiler: the aten ops whose calls per step differ, with their self CPU time.
3. ddp-trainer once under cProfile: its own functions that run every step, by cumulative time.
4. 2 ranks under torchrun: the hand-written loop against ddp-trainer with its per-step agreement all_reduce
   (`trainer.stop_check_every_n_steps=1`, the default) and with it every 100 steps.
Profilers inflate small calls: read 2 and 3 for where the time goes, 1 and 4 for how much there is.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from common import Report, add_common_arguments, markdown_table, median, repeats_for, spread
from frameworks import train_torch
from torch.profiler import ProfilerActivity, profile
from variants import ddp_trainer_args, ddp_trainer_epochs, run_once, timed_rate
from workloads import WORKLOADS, Workload

from ddp_trainer.cli import train

EPOCHS = 3  # one warm-up epoch, two timed ones
TOP_ROWS = 12
CHECK_EVERY = 100  # the agreement interval that takes the collective out of almost every step


def hand_written_steps(workload: Workload) -> tuple[list[float], list[int]]:
    """Epoch seconds and steps of the hand-written loop, run in this process."""
    seconds, steps = train_torch(workload, workload.train_size, EPOCHS, first_step_file=None)
    return seconds, [steps] * len(seconds)


def ddp_trainer_steps(workload: Workload) -> tuple[list[float], list[int]]:
    """Epoch seconds and steps of ddp-trainer's CLI entry point, run in this process."""
    with tempfile.TemporaryDirectory(prefix="ddp-bench-profile-") as output_dir:
        args = ddp_trainer_args(workload, workload.train_size, EPOCHS, Path(output_dir))
        # One validation sample: the hand-written loop does not evaluate, and the op counts should not either.
        args.append("data.synthetic.val_size=1")
        with contextlib.redirect_stdout(io.StringIO()):  # its epoch lines would interleave with the tables
            train.main(args)
        return ddp_trainer_epochs(Path(output_dir))


LOOPS: dict[str, Callable[[Workload], tuple[list[float], list[int]]]] = {
    "(a) hand-written PyTorch": hand_written_steps,
    "(b) ddp-trainer": ddp_trainer_steps,
}


def step_times(workload: Workload, repeats: int) -> str:
    """Part 1: µs per step of both loops, alternating, no profiler."""
    microseconds: dict[str, list[float]] = {name: [] for name in LOOPS}
    for _ in range(repeats):
        for name, loop in LOOPS.items():
            microseconds[name].append(1e6 / timed_rate(*loop(workload)))
    baseline = median(microseconds["(a) hand-written PyTorch"])
    rows = [
        [name, f"{median(values):,.0f}", spread(values), f"{median(values) - baseline:+,.0f}"]
        for name, values in microseconds.items()
    ]
    return markdown_table(["loop, 1 process", "µs per step", "spread", "extra µs"], rows)


def op_counts(workload: Workload) -> str:
    """Part 2: aten ops per step of each loop under torch.profiler, where the two differ."""
    per_step: dict[str, dict[str, tuple[float, float]]] = {}
    for name, loop in LOOPS.items():
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            _, steps = loop(workload)
        total = sum(steps)
        per_step[name] = {
            event.key: (event.count / total, event.self_cpu_time_total / total) for event in profiler.key_averages()
        }
    ours, theirs = per_step["(b) ddp-trainer"], per_step["(a) hand-written PyTorch"]
    extra = {op: ours[op][1] - theirs.get(op, (0.0, 0.0))[1] for op in ours}
    changed = [op for op in sorted(extra, key=lambda op: -extra[op]) if ours[op][0] != theirs.get(op, (0.0,))[0]]
    rows = []
    for op in changed[:TOP_ROWS]:
        (calls_b, us_b), (calls_a, us_a) = ours[op], theirs.get(op, (0.0, 0.0))
        rows.append([f"`{op}`", f"{calls_a:.2f}", f"{calls_b:.2f}", f"{us_a:.1f}", f"{us_b:.1f}"])
    total_a, total_b = (sum(us for _, us in table.values()) for table in (theirs, ours))
    rows.append(["all ops", "", "", f"{total_a:.1f}", f"{total_b:.1f}"])
    headers = ["op (profiled)", "calls/step (a)", "calls/step (b)", "self CPU µs/step (a)", "(b)"]
    return markdown_table(headers, rows)


def python_calls(workload: Workload) -> str:
    """Part 3: ddp-trainer's functions that run at least once per step, by cumulative time per step (cProfile)."""
    profiler = cProfile.Profile()
    profiler.enable()
    _, steps = ddp_trainer_steps(workload)
    profiler.disable()
    total = sum(steps)
    rows = []
    for (filename, line, function), (_, calls, _, cumulative, _) in pstats.Stats(profiler).stats.items():
        if "/ddp_trainer/" in filename and calls >= total:
            where = f"`{filename.split('/ddp_trainer/')[1]}:{line} {function}`"
            rows.append((cumulative / total, [where, f"{calls / total:.2f}", f"{1e6 * cumulative / total:.0f}"]))
    rows.sort(key=lambda row: -row[0])
    return markdown_table(["ddp_trainer function", "calls/step", "cumulative µs/step"], [r for _, r in rows[:TOP_ROWS]])


def agreement_collective(workload: Workload, repeats: int) -> str:
    """Part 4: 2 ranks, the hand-written loop against ddp-trainer with the agreement every step and every 100."""
    cases = {
        "(a) hand-written PyTorch": ("torch", []),
        "(b) ddp-trainer, agreement every step": ("ddp-trainer", []),
        f"(b) ddp-trainer, every {CHECK_EVERY} steps": (
            "ddp-trainer",
            [f"trainer.stop_check_every_n_steps={CHECK_EVERY}"],
        ),
    }
    rates: dict[str, list[float]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory(prefix="ddp-bench-profile-") as temporary:
        for repeat in range(repeats):
            for number, (case, (variant, extra)) in enumerate(cases.items()):
                folder = Path(temporary) / f"{number}-{repeat}"
                result = run_once(variant, workload, 2, workload.train_size, EPOCHS, folder, extra)
                rates[case].append(result.steps_per_s)
    baseline = 1e6 / median(rates["(a) hand-written PyTorch"])
    rows = []
    for case, values in rates.items():
        step_us = 1e6 / median(values)
        rows.append([case, f"{step_us:,.0f}", spread(values), f"{step_us - baseline:+,.0f}"])
    return markdown_table(["loop, 2 ranks", "µs per step", "spread", "extra µs"], rows)


def run(workload: Workload, repeats: int) -> Report:
    """All four parts for one workload."""
    torch.set_num_threads(1)  # as the launched runs (OMP_NUM_THREADS=1)
    parts = [
        step_times(workload, repeats),
        op_counts(workload),
        python_calls(workload),
        agreement_collective(workload, repeats),
    ]
    body = "\n\n".join(parts) + f"\n\n{workload.title}, {workload.train_size:,} samples per epoch.\n"
    return Report(f"Per-step overhead of ddp-trainer, profiled ({workload.key})", body)


def main() -> None:
    """Parse the flags, profile, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="mlp")
    args = parser.parse_args()
    print(run(WORKLOADS[args.workload], repeats_for(args.quick, args.repeats)).markdown())


if __name__ == "__main__":
    main()
