"""Atomic files: written beside their final name, fsynced and renamed in, so a reader sees the old or the new one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

# Read once, at import: os.umask can only be read by setting it, which is not safe while a writer thread runs.
UMASK = os.umask(0o022)
os.umask(UMASK)


def save_atomic(state: dict[str, Any], path: Path, exclusive: bool = False) -> None:
    """`torch.save` through `write_atomic`: readers see the old checkpoint or the new one, never part of one."""

    def save(file: IO[bytes]) -> None:
        sink = _WriteErrorKept(file)
        try:
            torch.save(state, sink)
        except RuntimeError as error:
            # torch's zip writer swallows a failed write (a full disk) and fails later on its own position check
            # ("enforce fail at inline_container.cc"): the write's own error is the one that says what happened.
            if sink.error is None:
                raise
            raise sink.error from error

    write_atomic(path, save, exclusive)


class _WriteErrorKept:
    """A binary file that remembers the first OSError its writes raised."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        """Write to the file, keeping a failure's OSError before torch sees it."""
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        """Flush the file."""
        self.file.flush()


def write_atomic(path: Path, write: Callable[[IO[bytes]], None], exclusive: bool = False) -> None:
    """`write` into a temporary file in the same folder, fsync, rename: readers see the old file or the new one.

    `exclusive`: linked in instead, so a file that took the name meanwhile stays (FileExistsError).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        chmod_as_open(temporary)
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        (os.link if exclusive else os.replace)(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)  # renamed: gone already
    fsync_directory(path.parent)


def chmod_as_open(path: str | Path) -> None:
    """Give a file that mkstemp made (owner-only) the mode open() would have given it: 0o666 less the umask."""
    os.chmod(path, 0o666 & ~UMASK)


def fsync_directory(directory: Path) -> None:
    """Make the renames in `directory` themselves survive a power cut."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def link_atomic(source: Path, path: Path) -> None:
    """Give `source`'s file the name `path` too (a hard link), replacing any old `path` in one atomic rename."""
    # Atomic like save_atomic, without serialising twice: a second write could fail half-way (a full disk).
    _swap_in(path, lambda link: os.link(source, link))


def symlink_atomic(directory: Path, name: str, target: Path) -> None:
    """Make `directory/name` a relative symlink to `target`, replacing any old one in one atomic rename."""
    _swap_in(directory / name, lambda link: link.symlink_to(target.name))


def _swap_in(path: Path, make: Callable[[Path], None]) -> None:
    link = path.parent / f".{path.name}.{os.getpid()}.link"  # checkpoint.UNFINISHED knows this name
    link.unlink(missing_ok=True)
    make(link)
    os.replace(link, path)
