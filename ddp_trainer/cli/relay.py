"""`python -m ddp_trainer.cli.relay COMMAND...`: the batch script's part of a preemptible SLURM job.

`#SBATCH --signal=B:USR2@120` warns the batch script's process alone, and a shell waiting for srun cannot act on
it. The script execs this module, which runs COMMAND (the job's srun step), passes the warning on to every process
of the job's steps (the ranks checkpoint, rank 0 requeues) and exits with COMMAND's code. Like launch.py, a
launcher: it reads SLURM's variables.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

from ddp_trainer.errors import say
from ddp_trainer.slurm import this_job


def main(argv: Sequence[str] | None = None) -> int:
    """Run COMMAND, relaying SLURM's USR2 warning to the job's steps; returns COMMAND's exit code."""
    command = list(sys.argv[1:] if argv is None else argv)
    job_id = this_job(os.environ)
    if not command or job_id is None:
        missing = "no COMMAND given" if not command else "SLURM_JOB_ID is not set: this is not a SLURM job"
        say(f"relay: error: {missing} (usage: python -m ddp_trainer.cli.relay srun ... in a batch script)", sys.stderr)
        return 2
    name = os.environ.get("SLURM_JOB_NAME", "relay")
    run = int(os.environ.get("SLURM_RESTART_COUNT", "0")) + 1
    say(f"{name}: job {job_id} run {run} on {os.environ.get('SLURM_JOB_NODELIST', 'this node')}")

    def relay(signum: int, frame: FrameType | None) -> None:
        say(f"{name}: warning signal, passing USR2 to the ranks")
        # Without --batch scancel signals the steps only, never this process: no echo comes back.
        subprocess.run(["scancel", "--signal=USR2", job_id], check=False)

    signal.signal(signal.SIGUSR2, relay)  # before srun starts: a warning must never find the default, which kills
    try:
        exit_code = subprocess.call(command)
    except OSError as error:  # a mistyped command: one line in the job's log, the shell's code for it
        say(f"relay: error: {command[0]} cannot run ({error.strerror})", sys.stderr)
        return 126 if isinstance(error, PermissionError) else 127
    return exit_code if exit_code >= 0 else 128 - exit_code  # srun killed by a signal: the shell's 128 + signal


if __name__ == "__main__":
    sys.exit(main())
