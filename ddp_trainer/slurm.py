"""SLURM for the ranks: its node list expanded, a rendezvous port per job and step, and a job's requeue."""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
import threading
from collections.abc import Mapping
from types import FrameType

from ddp_trainer.errors import UsageError

PORT_BASE = 20000
PORT_SPAN = 10000  # ports 20000-29999: above the usual services, below Linux's ephemeral range
STEP_STRIDE = 1009  # a job's steps lie 1009 ports apart: off the ports of the jobs numbered just after it


def _expand_range(text: str, nodelist: str) -> list[str]:
    names = []
    for item in text.split(","):
        low, _, high = item.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise UsageError(f"SLURM node list {nodelist!r}: cannot read the range {item!r}")
        width = len(low)  # node[01-10] keeps its zero padding
        names += [str(number).zfill(width) for number in range(int(low), int(high or low) + 1)]
    return names


def expand_nodelist(nodelist: str) -> list[str]:
    """`node[01-03,07],gpu5` -> ['node01', 'node02', 'node03', 'node07', 'gpu5'], as `scontrol show hostnames`."""
    hosts = []
    parts = re.split(r",(?![^\[]*\])", nodelist.strip())  # split at the commas outside brackets
    for part in filter(None, parts):
        pieces = re.split(r"\[([^\]]*)\]", part)  # text, range, text, range, ..., text
        choices = [[piece] if index % 2 == 0 else _expand_range(piece, nodelist) for index, piece in enumerate(pieces)]
        hosts += ["".join(combination) for combination in itertools.product(*choices)]
    if not hosts:
        raise UsageError(f"SLURM node list {nodelist!r} names no host")
    return hosts


def step_port(environ: Mapping[str, str]) -> int:
    """A rendezvous port from the job and step ids: two jobs, or two steps of a job (`srun ... &`), on a node differ."""
    job_id, step_id = environ["SLURM_JOB_ID"], environ.get("SLURM_STEP_ID", "0")  # a batch script has no step
    if not job_id.isdigit():
        raise UsageError(f"SLURM_JOB_ID={job_id!r} is not a number")
    step = int(step_id) if step_id.isdigit() else 0
    return PORT_BASE + (int(job_id) + STEP_STRIDE * step) % PORT_SPAN


def step_name(environ: Mapping[str, str]) -> str:
    """`SLURM job 42, step 1`: what every task of one srun step shares, and no other step does."""
    return f"SLURM job {environ['SLURM_JOB_ID']}, step {environ.get('SLURM_STEP_ID', '?')}"


def in_srun_step(environ: Mapping[str, str]) -> bool:
    """Whether `environ` is an srun task's: a batch script also has SLURM_PROCID=0 and SLURM_NTASKS, but no step."""
    return "SLURM_STEP_NUM_TASKS" in environ and "SLURM_PROCID" in environ


def expand_tasks_per_node(spec: str) -> list[int]:
    """`2(x3),1` (SLURM_STEP_TASKS_PER_NODE) -> [2, 2, 2, 1]: the task count of each node of the step."""
    counts = []
    for item in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if match is None:
            raise UsageError(f"SLURM tasks per node {spec!r}: cannot read {item!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def this_job(environ: Mapping[str, str]) -> str | None:
    """This job as scancel and scontrol name it (None: not a SLURM job). An array's task is `<array id>_<task id>`:
    the task that holds the array's own id would, by it, signal or requeue every task of the array."""
    if "SLURM_ARRAY_JOB_ID" in environ and "SLURM_ARRAY_TASK_ID" in environ:
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


def requeue(environ: Mapping[str, str]) -> tuple[bool, str]:
    """`scontrol requeue` this job: whether SLURM took it, and the outcome in words."""
    job_id = this_job(environ)
    if job_id is None:
        return False, "not a SLURM job: nothing to requeue"
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    except OSError as error:  # a container image without SLURM's tools: the stop's checkpoint is saved all the same
        return False, f"scontrol requeue {job_id} could not run ({error.strerror}): requeue the job yourself"
    if result.returncode != 0:
        return False, f"scontrol requeue {job_id} failed: {result.stderr.strip() or result.returncode}"
    return True, f"SLURM job {job_id} requeued"


class EarlyWarning:
    """A USR2 handler for a command's first seconds (its imports): SLURM's warning is noted there, never fatal."""

    def __init__(self) -> None:
        self.received = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def take(self) -> int:
        """The warning noted so far (0: none), forgotten here: the run that takes it acts on it once."""
        received, self.received = self.received, 0
        return received


def note_early_warnings() -> None:
    """Note SLURM's USR2 from now on; a StopSignals installed later takes a warning noted before it."""
    # A warning may come while torch is still importing (SLURM sends it up to a minute early), where USR2's default
    # action would kill the rank: a FAILED job, never requeued. Only the main thread may install handlers.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL:
        signal.signal(signal.SIGUSR2, EarlyWarning())
