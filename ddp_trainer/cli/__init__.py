"""The command-line tools: ddp-train and its commands, ddp-launch, the doctor, the shard writer and the batch relay."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import NoReturn

from ddp_trainer.slurm import note_early_warnings

# Importing this package starts a command: from here on a rank or agent that SLURM warns (USR2) while torch still
# imports notes it for the run, instead of dying of USR2's default action.
note_early_warnings()


def exit_after(main: Callable[[], int]) -> NoReturn:
    """Run a command's `main` as the program and exit with its code, skipping the final garbage collection."""
    code = main()
    # The interpreter's last collection walks every object torch's imports made, 1-2 s per process (torchrun waits
    # for its slowest rank), only to free memory the ending process returns anyway. Frozen objects are never
    # collected again: this is for a process that is about to end, never for main() called from Python.
    gc.freeze()
    sys.exit(code)


def run_as(command: str) -> NoReturn:
    """`python -m ddp_trainer.cli.COMMAND ARGS` as the program: the same as `ddp-train COMMAND ARGS`."""
    from ddp_trainer.cli import train  # lazy: it imports the commands' modules

    exit_after(lambda: train.main([command, *sys.argv[1:]]))
