"""Shared test helpers: launch the CLI in one process or under torchrun, read run outputs."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent


def cli_env() -> dict[str, str]:
    """Environment for child processes: tests/ importable for `_target_` factories, one thread per rank."""
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO_DIR), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def cli_command(args: list[str], nproc: int, module: str = "ddp_trainer.train") -> list[str]:
    """`python -m MODULE ARGS`, under torchrun --standalone when nproc > 1."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return (launcher if nproc > 1 else [sys.executable]) + ["-m", module, *args]


def run_script(script: Path, args: list[str], nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS`, under torchrun --standalone when nproc > 1, to the end, output captured."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [*(launcher if nproc > 1 else [sys.executable]), str(script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=REPO_DIR)


def run_cli(args: list[str], nproc: int = 1, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the CLI to the end and capture its output."""
    command = cli_command(args, nproc)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=REPO_DIR)


def launch_cli(args: list[str], nproc: int = 1, module: str = "ddp_trainer.train") -> subprocess.Popen:
    """Start the CLI (or `module`) in its own process group, so a test can kill every rank at once; no output."""
    command = cli_command(args, nproc, module)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    return subprocess.Popen(command, env=cli_env(), cwd=REPO_DIR, start_new_session=True, **quiet)


def kill_job(process: subprocess.Popen) -> None:
    """SIGKILL a `launch_cli` job at once, no chance to clean up: torchrun, each rank and each rank's loader workers.

    torchrun starts every rank in a session of its own: killing torchrun's process group alone leaves the ranks
    training on as orphans.
    """
    tasks = Path(f"/proc/{process.pid}/task").iterdir()
    ranks = [int(pid) for task in tasks for pid in (task / "children").read_text().split()]
    for group in [process.pid, *ranks]:
        os.killpg(group, signal.SIGKILL)
    process.wait()
    while not all(map(dead, ranks)):  # not our children, so no wait(): none may write once this returns
        time.sleep(0.01)


def dead(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie that nobody reaps has ended too)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


class FullDisk(io.FileIO):
    """A file on a disk with `room` bytes free: writing past them fails with ENOSPC, as a full disk's writes do."""

    def __init__(self, file, mode: str, room: int) -> None:
        super().__init__(file, mode)
        self.room = room

    def write(self, data) -> int:
        if not self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = super().write(bytes(data[: self.room]))
        self.room -= written
        return written


@pytest.fixture
def full_mount(tmp_path):
    """A 1 MiB tmpfs at tmp_path/"disk" (root alone may mount, else it skips); call it to fill it; unmounted after."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount here: {mounted.stderr.strip()}")

    def fill() -> None:
        with (disk / "filler").open("wb", buffering=0) as filler:
            with contextlib.suppress(OSError):  # ENOSPC: full
                while True:
                    filler.write(bytes(4096))

    yield fill
    subprocess.run(["umount", "--lazy", str(disk)], check=True)  # lazy: a file a failed test left open


def read_metrics(output_dir: Path) -> list[dict]:
    """The epoch lines of a run's metrics.jsonl."""
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    """A test that fails half-way must not leave a process group for the next one."""
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
