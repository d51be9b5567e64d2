"""Checkpoints: files and sharded folders, weights_only reads, resume's choice, state dicts free of wrapper prefixes."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.nn.parallel import DistributedDataParallel

from ddp_trainer import atomic, fields
from ddp_trainer.errors import UsageError, first_line
from ddp_trainer.loggers import recorded_steps

WRAPPER_PREFIXES = re.compile(r"^(?:module\.|_orig_mod\.)+")  # nested wrappers stack prefixes in either order


def clean_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Strip DDP's `module.` and torch.compile's `_orig_mod.` prefixes so files load into a bare model."""
    return {WRAPPER_PREFIXES.sub("", key): value for key, value in state_dict.items()}


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside DDP's and torch.compile's wrappers, whose state-dict keys are the user's own names."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # never imported: nothing was compiled
    compiled = (eval_frame.OptimizedModule,) if eval_frame else ()
    while isinstance(model, (DistributedDataParallel, *compiled)):
        model = model.module if isinstance(model, DistributedDataParallel) else model._orig_mod
    return model


def fitted(state_dict: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """`state_dict` for `unwrapped(model)`: as saved, or with the wrappers' prefixes a file from elsewhere carries cut.

    Cut only where the keys do not fit as they are: a submodule the user named `module` keeps its name.
    """
    return state_dict if set(state_dict) == set(unwrapped(model).state_dict()) else clean_state_dict(state_dict)


class UnreadableCheckpoint(UsageError):
    """A checkpoint that is empty, truncated or not ours: an older one may be used instead."""


# A sharded checkpoint is a folder: each rank's shard of the model and optimizer (torch.distributed.checkpoint, DCP),
# its `.metadata`, and rank 0's state file holding the rest (progress, RNG streams, config).
SHARDED_STATE, SHARDED_METADATA = "state.pt", ".metadata"
SHARDED_KEYS = {"epoch": int, "step": int, "config": dict}  # what every checkpoint holds, and of which type
FILE_KEYS = {"model": dict, "optimizer": dict, **SHARDED_KEYS}
NUMBER, TEXT, LIST, MAP = (int, float, type(None)), (str, type(None)), (list, type(None)), (dict, type(None))
SIGNED = (int,)  # an int that may be below 0: a bare int is a count, 0 or more (fields.of_kind)
# Keys a checkpoint may hold, of these types: a crafted value is named here, not met in a traceback far from here.
OPTIONAL_KEYS = {"batch_in_epoch": int, "schedule_offset": SIGNED, "world_size": int, "epochs_without_improvement": int}
OPTIONAL_KEYS |= dict.fromkeys(("best_metric", "early_stopping_reference", "part_epoch_best", "last_lr"), NUMBER)
OPTIONAL_KEYS |= {"rng": LIST, "data_position": LIST, "data_sizes": LIST, "partial_epoch_totals": MAP}
OPTIONAL_KEYS |= {"epoch_train_s": NUMBER, "wandb_run_id": TEXT, "scheduler": dict, "grad_scaler": MAP}
SECTIONS = ("model", "data", "trainer")  # of the config, each a mapping
# What DCP pickles into `.metadata` (torch 2.11-2.14): its dataclasses, sizes, dtypes, layouts and the folder's path.
METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata")
        + ("BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
    ),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` with only its own classes allowed: plain pickle would run any code in the file."""

    def find_class(self, module: str, name: str) -> Any:
        """The allowed global, else UnpicklingError in torch's weights_only wording (`GLOBAL module.name`)."""
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or (module, name) in METADATA_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported GLOBAL {module}.{name} in checkpoint metadata")


def _read_metadata(path: Path) -> Any:
    """A DCP `.metadata` file unpickled with the allowlist: UsageError if it holds code, UnreadableCheckpoint if bad."""
    return _read(path, lambda file: _MetadataUnpickler(file).load())


def _check_shard_files(folder: Path, metadata: Any) -> None:
    """UnreadableCheckpoint if a shard file is missing or shorter than `.metadata` says: an older one is taken."""
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise UnreadableCheckpoint(f"checkpoint {folder} is unreadable ({SHARDED_METADATA} lists no shard files)")
    needed: dict[str, int] = {}
    for stored in storage.values():  # each item's file, offset and length (DCP's _StorageInfo)
        needed[stored.relative_path] = max(needed.get(stored.relative_path, 0), stored.offset + stored.length)
    for name, size in sorted(needed.items()):
        held = (folder / name).stat().st_size if (folder / name).is_file() else None
        if held is None or held < size:
            problem = "is missing" if held is None else f"holds {held} of its {size} bytes"
            raise UnreadableCheckpoint(f"checkpoint {folder} is unreadable ({name} {problem})")


class SafeReader(FileSystemReader):
    """DCP's folder reader, `.metadata` checked against METADATA_GLOBALS first: reading never runs code from it."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        """DCP's metadata, unpickled once, with the allowlist: a second, plain read could meet another file."""
        metadata = _read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:  # as DCP's own reader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyBytes:
    """A DCP load planner whose non-tensor items (the optimizer's hyperparameters) must load with weights_only."""

    def load_bytes(self, read_item: Any, value: IO[bytes]) -> None:
        """Refuse an item that could run code; then DCP's own load puts the item in place."""
        torch.load(value, weights_only=True)
        value.seek(0)
        super().load_bytes(read_item, value)  # type: ignore[misc]


class SafeLoadPlanner(_WeightsOnlyBytes, DefaultLoadPlanner):
    """DCP's default planner (into an existing state dict), reading non-tensor items with weights_only."""


class _WholeLoadPlanner(_WeightsOnlyBytes, _EmptyStateDictLoadPlanner):
    """DCP's planner that rebuilds the whole saved state dict in one process, with weights_only items."""


def _read(path: Path, read: Callable[[IO[bytes]], Any]) -> Any:
    """`read` applied to the open file; UsageError if it holds code, UnreadableCheckpoint if it is not readable."""
    try:
        with path.open("rb") as file:
            return read(file)
    except Exception as error:  # missing, truncated zip, empty file, not a torch file: all unreadable
        raise named_load_error(path, error) from error


def named_load_error(path: Path, error: BaseException) -> UsageError:
    """A load's error, named: refused (no fallback) when weights_only blocked code, else unreadable."""
    blocked = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line]
    if isinstance(error, pickle.UnpicklingError) and blocked:
        return UsageError(
            f"checkpoint {path} refused: it holds objects that could run code and weights_only loading "
            f"blocks them ({blocked[0]})"
        )
    if isinstance(error, pickle.UnpicklingError):
        return UnreadableCheckpoint(f"checkpoint {path} is unreadable (not a torch checkpoint file)")
    if path.is_file() and path.stat().st_size == 0:  # torch's EOFError has no message: "EOFError: EOFError"
        return UnreadableCheckpoint(f"checkpoint {path} is unreadable (an empty file)")
    return UnreadableCheckpoint(f"checkpoint {path} is unreadable ({type(error).__name__}: {first_line(error)})")


def dcp_cause(error: BaseException) -> BaseException:
    """The first failed rank's own error inside DCP's CheckpointException, whose text names only the ranks."""
    if isinstance(error, CheckpointException) and error.failures:
        return next(iter(error.failures.values()))[0]  # (exception, traceback) per rank
    return error


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint file, or a sharded checkpoint's state without its shards (`.metadata` checked), weights_only."""
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist")
    if path.is_dir():
        _refuse_a_folder_of_checkpoints(path)
        _check_shard_files(path, _read_metadata(path / SHARDED_METADATA))
    file, required = (path / SHARDED_STATE, SHARDED_KEYS) if path.is_dir() else (path, FILE_KEYS)
    state = _read(file, lambda opened: torch.load(opened, map_location="cpu", weights_only=True))
    if not isinstance(state, dict):
        raise UnreadableCheckpoint(f"checkpoint {file} is not a ddp-trainer checkpoint (a {type(state).__name__})")
    missing = [key for key in required if key not in state]
    if missing:
        raise UnreadableCheckpoint(f"checkpoint {file} is not a ddp-trainer checkpoint (missing {', '.join(missing)})")
    config = state["config"] if isinstance(state["config"], dict) else {}
    values = {**state, **{f"config.{key}": config[key] for key in SECTIONS if key in config}}
    kinds = {**OPTIONAL_KEYS, **required, **dict.fromkeys(map("config.{}".format, SECTIONS), dict)}
    wrong = next((key for key, kind in kinds.items() if key in values and not fields.of_kind(values[key], kind)), None)
    if wrong is not None:  # a file made by hand: its config read as keys would fail far from here
        raise UnreadableCheckpoint(
            f"checkpoint {file} is not a ddp-trainer checkpoint ({wrong} is {values[wrong]!r:.40})"
        )
    return state


def _refuse_a_folder_of_checkpoints(folder: Path) -> None:
    """A run's output_dir or its checkpoints/ named where one checkpoint belongs: say which one to name instead."""
    inside = [folder / sub / name for sub in ("checkpoints", "") for name in ("last.pt", "last")]
    named = next((path for path in inside if path.exists()), None)
    if named is not None and not (folder / SHARDED_METADATA).exists():
        raise UsageError(f"checkpoint {folder} is a folder of checkpoints, not one; name one of them, e.g. {named}")


def pinned(path: Path) -> Path:
    """The folder a sharded `last` or `best` link names now: read through the link, each file may be another save's."""
    return path.resolve() if path.is_symlink() else path


def load(path: Path) -> dict[str, Any]:
    """A whole checkpoint, read with weights_only=True (never runs code); a sharded one gathered into this process."""
    path = pinned(path)
    state = read_state(path)
    if path.is_dir():
        tensors: dict[str, Any] = {}
        try:
            _load_state_dict(tensors, storage_reader=SafeReader(path), planner=_WholeLoadPlanner(), no_dist=True)
        except (Exception, CheckpointException) as error:  # DCP's own error is a BaseException
            raise named_load_error(path, dcp_cause(error)) from error
        state.update(tensors)
    return state


def save_last(state: dict[str, Any], directory: Path, keep_last: int, written: Path | None = None) -> None:
    """Write last.pt (a link to `written`, where `state` is saved already); keep_last > 0: as step-<step>.pt too."""
    first = directory / (f"step-{state['step']:08d}.pt" if keep_last else "last.pt")  # one file, two names
    if written is None:
        atomic.save_atomic(state, first)
    else:
        atomic.link_atomic(written, first)
    if keep_last:  # the newest keep_last step files are kept
        atomic.link_atomic(first, directory / "last.pt")
        for old in [path for path in _step_checkpoints(directory) if path.suffix == ".pt"][:-keep_last]:
            old.unlink()


_STEP = r"step-(\d{8,})"  # what save_last and ShardedSaver name a step's checkpoint: 9 digits from step 100,000,000
_STEP_NAME = re.compile(rf"{_STEP}(?:\.pt)?")


def _step_checkpoints(directory: Path) -> list[Path]:
    """The step files and folders saves wrote into `directory`, oldest first: never a copy the user put beside them."""
    named = [(int(match[1]), path) for path in directory.glob("step-*") if (match := _STEP_NAME.fullmatch(path.name))]
    return [path for _, path in sorted(named)]  # by step: as text, step-100000000 would sort before step-99999999


REPLACED = ".replaced.tmp"  # a folder saved again at its step is set aside under its name and this suffix
# What saves write before renaming (atomic.write_atomic, link_atomic, symlink_atomic, a sharded step's folder): only
# these are removed after a crash, never another `.*.tmp` a user keeps beside the checkpoints.
UNFINISHED = re.compile(rf"\.(?:(?:last|best|{_STEP})(?:\.pt)?\.[^/]+\.(?:tmp|link)|{_STEP}\.tmp)")


def publish_folder(written: Path, final: Path, names: Sequence[str], keep_last: int) -> None:
    """Rename a finished sharded checkpoint to `final`, point each of `names` at it, keep the newest keep_last (>= 1).

    Until the rename the folder has a temporary name that resume ignores, so a crash mid-save leaves the last
    complete checkpoint in use. The folder `best` points to is kept however old.
    """
    directory = final.parent
    if final.exists():  # saved again at the same step (a stop right after a step's save): the newer state wins
        replaced = directory / f".{final.name}{REPLACED}"
        os.replace(final, replaced)
        os.replace(written, final)
        shutil.rmtree(replaced)
    else:
        os.replace(written, final)
    for name in sorted(names, key="last".__eq__):  # last is named last: see saving.Saver._write
        atomic.symlink_atomic(directory, name, final)
    atomic.fsync_directory(directory)
    kept = {(directory / name).resolve() for name in ("last", "best") if (directory / name).exists()}
    folders = [path for path in _step_checkpoints(directory) if path.is_dir()]
    for old in folders[: -max(keep_last, 1)]:
        if old.resolve() not in kept:
            shutil.rmtree(old)


def remove_unfinished_writes(directory: Path) -> list[Path]:
    """Delete what saves that a crash interrupted left (temporary files, folders, links; never a checkpoint)."""
    for aside in directory.glob(f".*{REPLACED}"):
        final = directory / aside.name[1 : -len(REPLACED)]
        if not final.exists():  # a crash between setting it aside and renaming its successor in: it is the checkpoint
            os.replace(aside, final)
    unfinished = sorted(path for path in directory.glob(".*") if UNFINISHED.fullmatch(path.name))
    for path in unfinished:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return unfinished


def load_for_resume(
    resume: str, output_dir: Path, report: Callable[[str], None], unreadable: Mapping[Path, str] | None = None
) -> tuple[dict[str, Any], Path] | None:
    """(state, path) for trainer.resume=auto|none|PATH, or None to start fresh; never trains over another run's saves.

    auto continues output_dir's newest readable checkpoint (best.pt alone, as a kill between the first save's names
    leaves it, unless later steps were recorded). PATH starts from that file into an output_dir without checkpoints;
    once this run has saved there, it continues from its own save, as a restart or a requeue of the same command must.
    The state is `read_state`'s (a sharded checkpoint's shards are left for every rank to read); `unreadable`
    (resolved path: why) holds those whose shards proved damaged, which auto passes over."""
    directory = output_dir / "checkpoints"
    latest = [path for path in (directory / "last.pt", directory / "last") if path.exists()]
    saved = latest + _step_checkpoints(directory)[::-1]  # step files and sharded folders alike
    held = saved + [path for path in (directory / "best.pt", directory / "best") if path.exists()]
    if not held:
        _refuse_orphaned_metrics(output_dir / "metrics.jsonl")
    if resume == "none":
        if held:
            raise UsageError(
                f"trainer.resume=none but {held[0]} exists; use trainer.resume=auto to continue "
                "or a new output_dir, so the saved run is not overwritten"
            )
        return None
    if not held:
        named = None if resume == "auto" else pinned(Path(resume))  # resolved once: state and shards from one folder
        return None if named is None else (read_state(named), named)
    state, path = _newest_readable(saved or held, directory, report, unreadable or {})
    if not saved and max(recorded_steps(output_dir / "metrics.jsonl"), default=0) > state["step"]:
        raise UsageError(
            f"{directory} holds {held[0].name} but no last or step checkpoint, and metrics.jsonl records later steps, "
            f"which going on from it would drop; to train on from it, use a new output_dir and trainer.resume={held[0]}"
        )
    started_from = state["config"].get("trainer", {}).get("resume")
    if resume not in ("auto", started_from) and Path(resume).resolve() != path.resolve():
        raise UsageError(
            f"trainer.resume={resume}, but {directory} holds checkpoints that training from it would overwrite (the "
            f"newest, {path.name}, is of a run not started from it); use a new output_dir, or trainer.resume=auto "
            "to continue that run"
        )
    return state, path


def _refuse_orphaned_metrics(metrics: Path) -> None:
    # A crash before the first checkpoint leaves one epoch's line at most, which the new run replaces; more lines
    # are a run whose checkpoints were removed, and starting over would erase its record.
    lines = metrics.read_text().count('"epoch":') if metrics.is_file() else 0
    if lines > 1:
        raise UsageError(
            f"{metrics} holds {lines} epoch lines of a run whose checkpoints are gone; starting over would erase "
            "them: use a new output_dir, or move the file away"
        )


def _newest_readable(
    saved: list[Path], directory: Path, report: Callable[[str], None], unreadable: Mapping[Path, str]
) -> tuple[dict[str, Any], Path]:
    problems, tried = [], set()
    for path in saved:
        if path.resolve() in tried:  # a sharded `last` names a step folder that is also in the list
            continue
        tried.add(path.resolve())
        if path.resolve() in unreadable:  # read before, and reported then
            problems.append(unreadable[path.resolve()])
            continue
        try:
            folder = pinned(path)  # resolved once: its state and shards come from the same save
            return read_state(folder), folder
        except UnreadableCheckpoint as error:
            problems.append(str(error))
            report(f"{error}; trying an older checkpoint")
    # Saved checkpoints, none readable: stopping beats silently starting over.
    raise UsageError(f"no readable checkpoint in {directory} ({len(problems)} tried): {problems[0]}")
