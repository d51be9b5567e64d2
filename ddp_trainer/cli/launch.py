"""`ddp-launch`: torchrun with its flags passed through, and inside a SLURM allocation the rendezvous filled in."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence

import torch
from torch.distributed.run import get_args_parser

from ddp_trainer import slurm
from ddp_trainer.errors import UsageError

OWN_FLAGS = ("--dry-run", "--doctor")


def _given(flags: Sequence[str], option_strings: Sequence[str]) -> bool:
    return any(token == option or token.startswith(option + "=") for token in flags for option in option_strings)


def default_nproc_per_node(environ: Mapping[str, str]) -> int:
    """One process per GPU; without GPUs, one per CPU core this job may use, not per core of the machine."""
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    usable = len(os.sched_getaffinity(0))  # a cpuset, cgroup or taskset narrows it
    # SLURM pins tasks to their cores only with an affinity task plugin; its count holds either way.
    given = environ.get("SLURM_CPUS_PER_TASK") if "SLURM_JOB_ID" in environ else None
    return min(usable, int(given)) if given and given.isdigit() else usable


def slurm_flags(environ: Mapping[str, str]) -> dict[str, str]:
    """torchrun flags that a SLURM allocation determines: nodes, this node's rank, the c10d rendezvous."""
    if "SLURM_JOB_ID" not in environ:
        return {}
    nodes = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or "localhost"
    job_id = environ["SLURM_JOB_ID"]
    return {
        "--nnodes": environ.get("SLURM_NNODES") or environ.get("SLURM_JOB_NUM_NODES") or "1",
        "--node-rank": environ.get("SLURM_NODEID", "0"),
        "--rdzv-backend": "c10d",
        "--rdzv-endpoint": f"{slurm.expand_nodelist(nodes)[0]}:{slurm.job_port(job_id)}",
        "--rdzv-id": job_id,
    }


def torchrun_command(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The torchrun command for `argv` (torchrun's own syntax), with what the user left out filled in."""
    parser = get_args_parser()
    args = parser.parse_args(list(argv))
    flags = list(argv)[: len(argv) - len(args.training_script_args) - 1]
    options = {action.dest: action.option_strings for action in parser._actions if action.option_strings}
    added = []
    if not _given(flags, options["nproc_per_node"]):
        added.append(f"--nproc-per-node={default_nproc_per_node(environ)}")
    if not args.standalone:
        for flag, value in slurm_flags(environ).items():
            if not _given(flags, options[flag.lstrip("-").replace("-", "_")]):
                added.append(f"{flag}={value}")
    return [sys.executable, "-m", "torch.distributed.run", *added, *argv]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ddp-launch`: run (or with --dry-run, print) the torchrun command; --doctor checks the job."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    dry_run, doctor = (flag in arguments for flag in OWN_FLAGS)
    arguments = [token for token in arguments if token not in OWN_FLAGS]
    if doctor:
        arguments += ["-m", "ddp_trainer.cli.doctor"]
    try:
        command = torchrun_command(arguments, os.environ)
    except UsageError as error:
        print(f"ddp-launch: error: {error}", file=sys.stderr)
        return 2
    if dry_run:
        print(shlex.join(command))
        return 0
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
