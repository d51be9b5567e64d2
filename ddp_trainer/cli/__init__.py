"""The command-line tools: ddp-train and its commands, ddp-launch, the doctor, the shard writer and the batch relay."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeVar

from ddp_trainer.errors import CliError, say
from ddp_trainer.slurm import note_early_warnings

Loaded = TypeVar("Loaded")
TELL_TIMEOUT_S = 300.0  # how long a rank that cannot start waits for the others to meet it: it read no timeout

# Importing this package starts a command: from here on a rank or agent that SLURM warns (USR2) while torch still
# imports notes it for the run, instead of dying of USR2's default action.
note_early_warnings()


def exit_after(main: Callable[[], int]) -> NoReturn:
    """Run a command's `main` as the program and exit with its code, skipping the final garbage collection."""
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C: what it stopped cleaned up on the way out; a traceback would add nothing
        sys.stdout.flush()
        sys.stderr.flush()
        # Ended by SIGINT itself, as Python ends: a shell script that ran this stops too, as after any Ctrl-C.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        raise
    # The interpreter's last collection walks every object torch's imports made, 1-2 s per process (torchrun waits
    # for its slowest rank), only to free memory the ending process returns anyway. Frozen objects are never
    # collected again: this is for a process that is about to end, never for main() called from Python.
    gc.freeze()
    rendezvous = sys.modules.get("ddp_trainer.rendezvous")  # imported by commands that meet other ranks alone
    if rendezvous is not None and rendezvous.stranded():
        # Its thread waits inside C++: woken as the interpreter finalises, it would abort the process (exit 134).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def with_one_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """`parser`'s arguments, where `--config` (added here) names one recipe at most: argparse would keep the last."""
    parser.add_argument("--config", action="append", help="YAML recipe; without it, the built-in defaults")
    args = parser.parse_intermixed_args(argv)  # overrides may stand before and after --config
    if args.config and len(args.config) > 1:
        given = ", ".join(args.config)
        parser.error(f"--config given {len(args.config)} times ({given}): give one recipe, changes as key=value")
    args.config = args.config[0] if args.config else None
    return args


def run_as(command: str) -> NoReturn:
    """`python -m ddp_trainer.cli.COMMAND ARGS` as the program: the same as `ddp-train COMMAND ARGS`."""
    from ddp_trainer.cli import train  # lazy: it imports the commands' modules

    exit_after(lambda: train.main([command, *sys.argv[1:]]))


def loaded_before_meeting(load: Callable[[], Loaded]) -> Loaded:
    """`load()`'s result; a CliError it raises (a node without the file) is marked as met before the ranks met."""
    try:
        return load()
    except CliError as error:
        error.before_meeting = True
        raise


def tell_the_others(error: CliError, line: str) -> None:
    """Say `line` (`error`'s, met before the ranks met), then meet the other ranks to tell them: they stop with it."""
    # Ctrl-C ends the wait at once, which the store's C++ calls would hold up. From before the line: one that came as
    # the line was written, or during the imports, would print a KeyboardInterrupt's traceback under it.
    interrupt = (
        signal.signal(signal.SIGINT, signal.SIG_DFL) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        say(line, sys.stderr)
        from ddp_trainer import distributed, rendezvous  # lazy: the launcher imports this package without torch

        with contextlib.suppress(CliError):  # launch variables it cannot read: there is nobody to tell
            rendezvous.tell_others(distributed.detect_launcher(), str(error), TELL_TIMEOUT_S)
    finally:
        if interrupt is not None:
            signal.signal(signal.SIGINT, interrupt)
