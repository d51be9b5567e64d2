"""Rank 0's hold on a run's output_dir: a second run into the same folder is refused, not mixed in with the first.

Also: what rank 0 alone does in that folder (the claim, the loggers it opens) refused on every rank alike.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

from ddp_trainer.distributed import DistEnv, broadcast_object, gather_objects
from ddp_trainer.errors import UsageError, say

Result = TypeVar("Result")

LOCK_NAME = ".lock"
WAIT_S = 30.0  # long enough for a run that was told to stop (a killed launcher's ranks) to save and end
_HELD: set[Path] = set()  # POSIX locks belong to a process: a second run in this one would be granted it again


class FolderClaim:
    """An exclusive POSIX lock on `output_dir/.lock`, held from start-up until `release()`.

    A lockf lock, not flock: a DataLoader worker forked from rank 0 does not inherit it, so a rank that died is never
    outlived by its lock. The kernel drops it with the process, whatever way it ends.
    """

    def __init__(self, output_dir: Path) -> None:
        self.folder, self.key, self.held = output_dir, output_dir.resolve(), False
        if self.key in _HELD:
            raise UsageError(f"output_dir {output_dir} is in use by another run in this process: give each its own")
        self.created, self.path = not output_dir.exists(), output_dir / LOCK_NAME
        try:
            self._claim()
        except OSError as error:  # a folder the up-front check cannot judge: /proc, a full disk
            self.release()  # once locked: a lone .lock goes, and the folder if this run made it
            if self.handle is not None:
                with contextlib.suppress(OSError):
                    self.handle.close()
            if self.created:
                with contextlib.suppress(OSError):  # still holding a file (another run's .lock): it stays
                    output_dir.rmdir()
            raise UsageError(f"output_dir={output_dir} cannot be written: {error.strerror or error}") from None

    def _claim(self) -> None:
        output_dir, self.handle = self.folder, None
        output_dir.mkdir(parents=True, exist_ok=True)
        if (output_dir / "metrics.jsonl").is_symlink():  # appended to, a link would have the run write to its target
            raise UsageError(f"{output_dir / 'metrics.jsonl'} is a symbolic link, which a run never writes through")
        self.handle = self._open()
        if not self._acquire(WAIT_S):
            holder = self._holder()
            self.handle.close()
            raise UsageError(
                f"output_dir {output_dir} is in use by another run ({holder}); wait for it to end or use another "
                "output_dir"
            )
        self.held = True
        _HELD.add(self.key)
        self.handle.truncate(0)
        self.handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.handle.flush()

    def _acquire(self, wait_s: float) -> bool:
        deadline, said = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.lockf(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if self.path.exists() and os.path.samestat(os.fstat(self.handle.fileno()), self.path.stat()):
                    return True
                self.handle.close()  # a run that ended unlinked this file: it locks nothing any more
                self.handle = self._open()
                continue
            except OSError:  # held by another process
                if time.monotonic() >= deadline:
                    return False
                if not said:
                    holder = self._holder()
                    say(f"output_dir {self.folder} is in use by {holder}: waiting up to {wait_s:g} s", sys.stderr)
                    said = True
                time.sleep(0.2)

    def _open(self) -> IO[str]:
        # Never through a link: one another user left in a shared folder would have the run truncate its target.
        try:
            return os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o666), "a+")
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise
            raise UsageError(f"{self.path} is a symbolic link, which a run never writes through: remove it") from None

    def _holder(self) -> str:
        self.handle.seek(0)
        return self.handle.read().strip() or "a process that has not named itself yet"

    def release(self) -> None:
        """Let the folder go; a run refused before it wrote anything leaves the folder as it found it."""
        if not self.held:
            return
        self.held = False
        _HELD.discard(self.key)
        if [path.name for path in self.folder.iterdir()] == [LOCK_NAME]:  # still locked: nobody else is in between
            self.path.unlink()
            if self.created:
                self.folder.rmdir()
        with contextlib.suppress(OSError):  # a pid line a full disk never took would fail to flush again
            self.handle.close()


def refused_on_every_rank(
    env: DistEnv, action: Callable[[], Result], undo: Callable[[Result], None] | None = None
) -> Result:
    """Run `action` on this rank; a UsageError it raises on rank 0 is raised on every rank, in rank 0's words.

    Otherwise the other ranks would wait for rank 0 at their next collective and end saying it stopped answering.
    `undo` takes rank 0's result back should the broadcast itself fail (a peer already gone).
    """
    result = refusal = None
    try:
        result = action()
    except UsageError as error:
        if not (env.is_main and env.distributed):
            raise
        refusal = str(error)
    try:
        refusal = broadcast_object(refusal, env)
    except BaseException:
        if undo is not None and result is not None:
            undo(result)
        raise
    if refusal is not None:
        raise UsageError(refusal)
    return result


def refusal_of(check: Callable[[], object]) -> str | None:
    """The message of the UsageError `check` raises (None if it passes), to be told to the other ranks."""
    try:
        check()
    except UsageError as error:
        return str(error)
    return None


def refused_if_any(env: DistEnv, refusal: str | None) -> None:
    """Raise on every rank when any rank refused: in its own words, or naming the first rank that did.

    A rank on another node that refused alone before the ranks met left rank 0's node waiting for it until
    trainer.startup_timeout_s: torchrun ends the ranks of its own node only.
    """
    refusals = gather_objects(refusal, env)
    if refusal is not None:
        raise UsageError(refusal)
    first = next(((rank, said) for rank, said in enumerate(refusals) if said is not None), None)
    if first is not None:
        raise UsageError(f"rank {first[0]} cannot start: {first[1]}")


def refuse_unshared(output_dir: Path, env: DistEnv) -> None:
    """Refuse on every rank alike an output_dir that some rank does not share with rank 0, which claimed it.

    Under FSDP every rank writes its shard there: rank 0 would publish checkpoints that lack the others' shards.
    """
    probe = output_dir / f".shared-{secrets.token_hex(8)}"  # a name no node looked up before: none cached it missing
    refusal = None
    if env.is_main:
        try:
            probe.touch()
        except OSError as error:  # a full disk, a quota: the others must not wait for a probe that never came
            refusal, probe = f"output_dir {output_dir} cannot be written ({error.strerror})", None
    try:
        name, host = broadcast_object((probe and probe.name, socket.gethostname()), env)
        if name is not None and not (output_dir / name).exists():
            refusal = (
                f"output_dir {output_dir.resolve()} on {socket.gethostname()} is not the folder rank 0 writes on "
                f"{host}: trainer.strategy=fsdp writes every rank's shard there, so it must be on a filesystem every "
                "node shares"
            )
        refused_if_any(env, refusal)
    finally:
        if env.is_main and probe is not None:
            probe.unlink(missing_ok=True)


def same_on_every_rank(state: Mapping[str, Any] | None, where: Path, env: DistEnv) -> None:
    """Refuse a checkpoint that the ranks read at different steps (or some found none): it was replaced as they read."""
    read = gather_objects(None if state is None else (state["epoch"], state["step"]), env)
    if len(set(read)) > 1:
        seen = ", ".join(f"rank {rank} {'none' if got is None else f'step {got[1]}'}" for rank, got in enumerate(read))
        if None in read:  # more likely another disk than a first save landing between the ranks' looks
            raise UsageError(
                f"the ranks read different checkpoints at {where} ({seen}): a rank that found none sees another "
                "folder there; output_dir must be on a filesystem every node shares"
            )
        raise UsageError(
            f"the ranks read different checkpoints at {where} ({seen}): one was saved as they read (a run still "
            "saving there?); name a step file or folder (step-*), or read once that run stopped"
        )
