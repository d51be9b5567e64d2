"""Helpers every benchmark shares: launching processes, medians, markdown tables and the machine description."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent


@dataclass
class Report:
    """One benchmark's result as markdown: a heading, the table(s) and what to read into them."""

    title: str
    body: str
    failed: bool = False  # a measurement failed: the table holds the others

    def markdown(self) -> str:
        """The section as it goes into RESULTS.md and onto the console."""
        return f"## {self.title}\n\n{self.body.strip()}\n"


def median(values: Sequence[float]) -> float:
    """Median of repeated measurements."""
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """Half the range of repeated measurements, relative to their median: '±3%'; '-' for a single run."""
    if len(values) < 2:
        return "-"
    return f"±{50 * (max(values) - min(values)) / median(values):.0f}%"


def _is_number(cell: str) -> bool:
    return bool(cell) and all(char in "0123456789.,+-±%x " for char in cell)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table; columns holding only numbers are right-aligned."""
    numeric = [all(_is_number(row[column]) for row in rows) for column in range(len(headers))]
    rule = "|" + "|".join("---:" if right else "---" for right in numeric) + "|"
    lines = ["| " + " | ".join(headers) + " |", rule]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def bench_env() -> dict[str, str]:
    """Environment of every launched run: one thread per process; `benchmarks/` and this tree's ddp_trainer first."""
    env = dict(os.environ)
    # Every variant gets the same single intra-op thread per rank, so ranks do not fight over the cores.
    env["OMP_NUM_THREADS"] = "1"
    # Start-up is measured as users see it, with bytecode caches (this sandbox's shell turns them off).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCHMARKS_DIR), str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def launch(args: Sequence[str], processes: int, timeout_s: float = 300) -> float:
    """Run `python ARGS` (1 process) or `torchrun --standalone --nproc-per-node=N ARGS`; return its wall start time.

    A run that fails raises RuntimeError with the end of its output, so a broken variant is never reported as fast.
    """
    launcher = (
        [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    )
    command = [sys.executable, *launcher, *args]
    started = time.time()  # wall clock, comparable with the first-step stamps the runs write
    result = subprocess.run(command, cwd=REPO_ROOT, env=bench_env(), capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-40:])
        raise RuntimeError(f"benchmark run failed (exit {result.returncode}): {' '.join(command)}\n{tail}")
    return started


def time_epochs(epochs: int, run_epoch: Callable[[int], None], before_epoch: Callable[[], None]) -> list[float]:
    """Wall seconds of each call `run_epoch(epoch)`; `before_epoch` (a barrier) runs outside the timing."""
    seconds = []
    for epoch in range(epochs):
        before_epoch()
        started = time.perf_counter()
        run_epoch(epoch)
        seconds.append(time.perf_counter() - started)
    return seconds


def write_json(path: str | Path, value: dict) -> None:
    """Write a run's result for the launcher to read."""
    Path(path).write_text(json.dumps(value))


def read_json(path: str | Path) -> dict:
    """Read what `write_json` wrote."""
    return json.loads(Path(path).read_text())


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or what `platform` knows elsewhere."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def filesystem_of(path: Path) -> str:
    """Type of the filesystem holding `path` (ext4, tmpfs, overlay...): it decides what fsync costs."""
    mounts = Path("/proc/mounts")
    if not mounts.exists():
        return "unknown"
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    for line in mounts.read_text().splitlines():
        _, mount_point, fs_type, *_ = line.split()
        inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best):
            best, kind = mount_point, fs_type
    return kind


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None; reads metadata only, imports nothing."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_description() -> str:
    """One line naming the CPU, cores, Python and the versions of torch and the compared frameworks."""
    versions = [
        f"{name} {package_version(name)}" for name in ("torch", "lightning", "accelerate") if package_version(name)
    ]
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, {', '.join(versions)}"
    )


def at_least(minimum: int, kind: Callable[[str], Any] = int) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` no smaller than `minimum`; argparse names the flag if it is not."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is less than {minimum}")
        return value

    return parse


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--quick and --repeats, the same in every script."""
    parser.add_argument("--quick", action="store_true", help="one repeat and shorter runs")
    parser.add_argument("--repeats", type=at_least(1), default=None, help="runs per measurement (default 3, --quick 1)")


def repeats_for(quick: bool, requested: int | None, default: int = 3) -> int:
    """How many times to repeat each measurement."""
    if requested is not None:
        return requested
    return 1 if quick else default
