"""Checkpoint files: atomic writes, weights_only reads, and state dicts free of wrapper prefixes."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from ddp_trainer.errors import UsageError

WRAPPER_PREFIXES = re.compile(r"^(?:module\.|_orig_mod\.)+")  # nested wrappers stack prefixes in either order


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP and/or torch.compile wrappers."""
    while isinstance(model, DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, DistributedDataParallel) else model._orig_mod
    return model


def clean_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Strip DDP's `module.` and torch.compile's `_orig_mod.` prefixes so files load into a bare model."""
    return {WRAPPER_PREFIXES.sub("", key): value for key, value in state_dict.items()}


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, 0o644)  # mkstemp makes owner-only files; a checkpoint is as shareable as its folder
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # makes the rename itself survive a power cut
    finally:
        os.close(directory)


class UnreadableCheckpoint(UsageError):
    """A checkpoint file that is empty, truncated or not ours: an older one may be used instead."""


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True (never runs code from the file); UsageError names the file."""
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        blocked = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line]
        if blocked:
            raise UsageError(
                f"checkpoint {path} refused: it holds objects that could run code and weights_only loading "
                f"blocks them ({blocked[0]})"
            ) from error
        raise UnreadableCheckpoint(f"checkpoint {path} is unreadable (not a torch checkpoint file)") from error
    except Exception as error:  # truncated zip, empty file, not a torch file: all unreadable
        reason = (str(error).splitlines() or [""])[0]
        raise UnreadableCheckpoint(f"checkpoint {path} is unreadable ({type(error).__name__}: {reason})") from error
    if not isinstance(state, dict):
        raise UnreadableCheckpoint(
            f"checkpoint {path} is not a ddp-trainer checkpoint (holds a {type(state).__name__})"
        )
    missing = [key for key in ("model", "optimizer", "epoch", "step", "config") if key not in state]
    if missing:
        raise UnreadableCheckpoint(f"checkpoint {path} is not a ddp-trainer checkpoint (missing {', '.join(missing)})")
    return state


def save_last(state: dict[str, Any], directory: Path, keep_last: int) -> None:
    """Write last.pt; with keep_last > 0 it is also step-<step>.pt (one file, two names), newest keep_last kept."""
    last = directory / "last.pt"
    if keep_last == 0:
        save_atomic(state, last)
        return
    step_file = directory / f"step-{state['step']:08d}.pt"
    save_atomic(state, step_file)
    link = directory / f".last.pt.{os.getpid()}.link"
    link.unlink(missing_ok=True)
    os.link(step_file, link)
    os.replace(link, last)  # atomic, like save_atomic, without serialising twice
    for old in sorted(directory.glob("step-*.pt"))[:-keep_last]:
        old.unlink()


def remove_unfinished_writes(directory: Path) -> list[Path]:
    """Delete temporary files of saves that a crash interrupted (never a finished checkpoint); returns them."""
    unfinished = sorted([*directory.glob(".*.pt.*.tmp"), *directory.glob(".last.pt.*.link")])
    for path in unfinished:
        path.unlink(missing_ok=True)
    return unfinished


def load_for_resume(resume: str, output_dir: Path, report: Callable[[str], None]) -> tuple[dict[str, Any], Path] | None:
    """(state, path) for trainer.resume=auto|none|PATH, or None to start fresh; auto skips unreadable files."""
    directory = output_dir / "checkpoints"
    last = directory / "last.pt"
    saved = ([last] if last.exists() else []) + sorted(directory.glob("step-*.pt"), reverse=True)
    if resume == "none":
        if saved:
            raise UsageError(
                f"trainer.resume=none but {saved[0]} exists; use trainer.resume=auto to continue "
                "or a new output_dir, so the saved run is not overwritten"
            )
        return None
    if resume != "auto":
        return load(Path(resume)), Path(resume)
    problems = []
    for path in saved:
        try:
            return load(path), path
        except UnreadableCheckpoint as error:
            problems.append(str(error))
            report(f"{error}; trying an older checkpoint")
    if problems:  # saved files, none readable: stopping beats silently starting over
        raise UsageError(f"no readable checkpoint in {directory} ({len(problems)} tried): {problems[0]}")
    return None
