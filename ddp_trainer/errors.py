"""Exceptions the CLI turns into one line and an exit code of its own, and how that line is written."""

import contextlib
import re
import sys
from collections.abc import Iterator
from typing import TextIO


class CliError(Exception):
    """An error `ddp-train` reports in one line on the rank that meets it, exiting with `exit_code`."""

    exit_code = 1
    # Met before this rank met the others (a node without the config file, or its GPUs): once it has said so, the CLI
    # meets them to tell them, or they would wait for it until trainer.startup_timeout_s.
    before_meeting = False

    def __init__(self, message: str = "") -> None:
        # Raised in a DataLoader worker, it comes back with the worker's traceback as its message ("Caught ... in
        # DataLoader worker process 0. Original Traceback ..."): its last line holds the original message.
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


class UsageError(CliError):
    """Bad config, missing file or unreadable checkpoint: reported in one line, exit code 2."""

    exit_code = 2


class TrainingDiverged(CliError):
    """The loss became NaN or infinite and trainer.nonfinite_loss=stop: reported in one line, exit code 3."""

    exit_code = 3


class RankLost(CliError):
    """A collective failed because another rank died or stalled: reported in one line naming it, exit code 4."""

    exit_code = 4


class CheckpointWriteFailed(CliError):
    """A checkpoint file could not be written (no permission, disk full): one line naming the file, exit code 1."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type's name): what fits in a one-line error."""
    lines = [line.strip() for line in str(error).strip().splitlines()] or [type(error).__name__]
    # "Error(s) in loading state_dict for Net:" says what failed; its next line says why.
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def say(line: str, stream: TextIO | None = None) -> None:
    """Write `line` and its newline in one write, so the lines of ranks sharing a pipe never interleave."""
    stream = sys.stdout if stream is None else stream
    # One write: print() writes the newline separately, and unbuffered, another rank's line can land in between.
    stream.write(line + "\n")
    stream.flush()


@contextlib.contextmanager
def sized_by(keys: str) -> Iterator[None]:
    """Turn an allocation that the sizes `keys` name made too large for this machine into a UsageError naming them."""
    try:
        yield
    except (RuntimeError, MemoryError) as error:  # torch's CPU and CUDA allocators, or a size past what a tensor holds
        text = first_line(error)
        asked = re.search(r"allocate (\d+) bytes", text)
        if asked is not None:
            size = f"{int(asked.group(1)) / 2**30:,.1f} GiB"
            raise UsageError(f"{keys}: too large: a tensor of {size}, more memory than this machine gives") from None
        if isinstance(error, MemoryError) or "out of memory" in text or "overflowed" in text:
            raise UsageError(f"{keys}: too large for this machine ({text})") from None
        raise
