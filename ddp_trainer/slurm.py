"""What SLURM's variables mean for a rendezvous: the node list expanded, a port that differs per job."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping

from ddp_trainer.errors import UsageError

PORT_BASE = 20000
PORT_SPAN = 10000  # ports 20000-29999: above the usual services, below Linux's ephemeral range


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


def job_port(job_id: str) -> int:
    """A rendezvous port from the job id, so two jobs sharing a node do not collide."""
    if not job_id.isdigit():
        raise UsageError(f"SLURM_JOB_ID={job_id!r} is not a number")
    return PORT_BASE + int(job_id) % PORT_SPAN


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
