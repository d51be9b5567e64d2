"""The Python API: `fit(model, train_data, val_data)` trains from a script exactly as `ddp-train` does from a config.

The same script runs under `python script.py` (one process), `torchrun ... script.py` and `srun python script.py`:
every rank calls `fit` with the same arguments, and `fit` reads who launched it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.distributed._composable.contract import _get_registry
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from ddp_trainer import changes, data, distributed, peers, rng, task_checks, tasks
from ddp_trainer.assembly import Parts, assemble
from ddp_trainer.claim import FolderClaim, refusal_of, refuse_unshared, refused_on_every_rank
from ddp_trainer.config import Config, load_for_objects, to_container
from ddp_trainer.distributed import DistEnv
from ddp_trainer.errors import UsageError
from ddp_trainer.loggers import RunLogger, last_record, require_packages
from ddp_trainer.preemption import StopSignals, stop_when_orphaned
from ddp_trainer.rng import RANK_STREAMS, mixed_seed, seed_everything
from ddp_trainer.tasks import Task
from ddp_trainer.trainer import Trainer
from ddp_trainer.workers import stop_loader_workers

# What a run trains, made on each rank once it has joined the others: (model, train data, val data or None).
Build = Callable[[DistEnv], tuple[nn.Module, Dataset, Dataset | None]]


def fit(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset | None = None,
    *,
    task: str | Task = "classification",
    config: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Train `model` on `train_data` (validating on `val_data` each epoch); returns the last epoch's record.

    `task` is "classification", "regression", "language_model" or an object following `ddp_trainer.tasks.Task`.
    `config` is a YAML path, a dict of config keys, or None for the defaults; `overrides` are `key=value` strings.
    The outputs (config.yaml, metrics.jsonl, checkpoints) and resume are those of `ddp-train`; its errors are raised
    as `CliError`s carrying the CLI's `exit_code`, and a run stopped by a signal raises SystemExit with the CLI's exit
    code after its checkpoint.
    """
    _check_arguments(model, train_data, val_data, config, overrides)
    cfg, task_name = load_for_objects(config, overrides), task if isinstance(task, str) else type(task).__name__
    if cfg.task not in (Config.task, task_name):  # the default, or a key that agrees with the argument
        wanted = repr(cfg.task) if cfg.task in tasks.BUILT_IN else f"{cfg.task}()"  # a task object of that class
        raise UsageError(
            f"config key 'task' is {cfg.task!r}, fit's task {task_name!r} (its default unless given): fit's argument "
            f"decides; pass task={wanted} to train that task"
        )
    cfg = dataclasses.replace(cfg, task=task_name)
    exit_code, record = run(cfg, lambda env: (model, train_data, val_data), task_checks.resolve(task))
    if exit_code != 0 or not record:
        raise SystemExit(exit_code)
    return record


def run(cfg: Config, build: Build, task: Task, clock: Callable[[], float] = time.monotonic) -> tuple[int, dict]:
    """Train on this rank: (exit code, the last epoch's record, the same on every rank). Tears down on every path.

    `clock` (seconds) times `checkpoint.every_n_minutes`; tests pass their own to leave the wall clock out.
    """
    array_task = distributed.slurm_array_task()
    cfg = for_array_task(cfg, array_task)
    # Every rank checks, and all refuse once they meet: one on another node refusing alone would leave the rest waiting.
    refusal = refusal_of(lambda: (require_packages(cfg.logging), _check_output_dir(Path(cfg.output_dir))))
    exit_code = 1  # until _train returns: an exception marks the wandb run as failed
    # Each clean-up is registered once what it undoes exists, and runs even when one before it fails (a second
    # Ctrl-C while W&B finishes): the folder's claim, the signal handlers and the caller's streams are always back.
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(_only_run_in_process())
        cleanup.callback(rng.restore_process, rng.capture_process())  # fit() seeds its own: the caller's go on
        stop = StopSignals((signal.SIGUSR2,))  # SLURM's warning, from the start: acted on at the first step
        cleanup.callback(stop.restore)
        if distributed.detect_launcher().launcher == "torchrun":
            stop_when_orphaned()
        cleanup.callback(distributed.teardown)
        cleanup.push(_release_failed_frames)  # before teardown: its callbacks run last in, first out
        # Start-up (rendezvous, a download, the first step's compile) may take long; training steps may not.
        env = changes.join_run(cfg, refusal)
        cleanup.push(lambda kind, error, trace: peers.leave_word(env, error))  # before teardown: the store is up
        # Not before: a rank waiting in the rendezvous for a peer that failed must end on torchrun's SIGTERM.
        stop.watch(signal.SIGTERM)
        claim = refused_on_every_rank(env, lambda: _claim(Path(cfg.output_dir), env), FolderClaim.release)
        if claim is not None:
            cleanup.callback(claim.release)
        if cfg.trainer.strategy == "fsdp" and env.distributed:
            refuse_unshared(Path(cfg.output_dir), env)
        logger = RunLogger(Path(cfg.output_dir), env.is_main, cfg.trainer.progress_bar, cfg.logging, to_container(cfg))
        cleanup.callback(lambda: logger.finish(exit_code))  # the exit code as it stands then
        cleanup.callback(stop_loader_workers)  # a traceback that holds the loaders must not keep their workers alive
        _announce(logger, array_task, cfg.output_dir, stop.active)
        exit_code, finished = _train(cfg, env, build, task, logger, stop, clock)
        # Rank 0 may still be writing its last checkpoint: the long timeout the trainer set for that is in force.
        with peers.naming_lost_ranks(env, cfg.trainer.startup_timeout_s, "as the run ended"):
            record = distributed.broadcast_object(last_record(logger.metrics_path) if env.is_main else None, env)
    return exit_code, record if finished else {}


_ONE_RUN = threading.Lock()


@contextlib.contextmanager
def _only_run_in_process() -> Iterator[None]:
    """Refuse a second run while one is going in this process: they would share its RNG, folder locks and workers."""
    if not _ONE_RUN.acquire(blocking=False):
        raise UsageError(
            "fit() is already running in this process (in another thread, or fit() called from inside a run): one "
            "run at a time per process; start concurrent runs as processes of their own"
        )
    try:
        yield
    finally:
        _ONE_RUN.release()


def _announce(logger: RunLogger, array_task: int | None, output_dir: str, catching: bool) -> None:
    """Tell what a user may not expect of this run: the array task's folder, and signals that are not caught."""
    if array_task is not None:
        logger.info(f"SLURM array task {array_task}: output_dir {output_dir}")
    if not catching:
        logger.info("not in the main thread: SIGTERM and SLURM's USR2 are not caught, so no checkpoint on them")


def _claim(output_dir: Path, env: DistEnv) -> FolderClaim | None:
    """Rank 0's hold on output_dir, before anything in it is read or written; None on the other ranks."""
    return FolderClaim(output_dir) if env.is_main else None


def _train(
    cfg: Config,
    env: DistEnv,
    build: Build,
    task: Task,
    logger: RunLogger,
    stop: StopSignals,
    clock: Callable[[], float],
) -> tuple[int, bool]:
    """Assemble the run and fit it: (exit code, finished). Its parts go with this frame, the process group still up.

    DDP's reducer shares gloo's group: freed after the group was destroyed, it takes the group down while holding the
    GIL, which gloo's worker thread may need to free the last collective's tensors. The process hung at exit (twice in
    70 runs on torch 2.11).
    """
    bundle, parts = _assemble(cfg, env, build, task, logger)
    if parts.finished:  # opened, TensorBoard and W&B would add an empty event file and an empty part of the run
        return 0, True
    with _naming_unused_parameters():
        return Trainer(cfg, env, parts, bundle, task, logger, stop, clock).fit()


def _release_failed_frames(
    kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
) -> None:
    """On a failure, free what its frames hold (the parts, DDP's reducer) before the process group is destroyed."""
    if not torch.distributed.is_initialized():
        return
    # Every branch: a checkpoint write that failed while stopping has the stop as __context__, its OSError as __cause__.
    pending, seen = [error], set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)  # the running frames stay: a traceback prints as before
        pending += [error.__cause__, error.__context__, *getattr(error, "exceptions", ())]


def _assemble(cfg: Config, env: DistEnv, build: Build, task: Task, logger: RunLogger) -> tuple[data.DataBundle, Parts]:
    """This rank's data and parts; a peer that failed meanwhile (a missing file on its node) is named in one line."""
    with peers.naming_lost_ranks(env, cfg.trainer.startup_timeout_s, "during start-up"):
        model, train_set, val_set = build(env)
        bundle = data.build_loaders(train_set, val_set, cfg.data, env, cfg.seed, getattr(task, "collate", None))
        seed_everything(mixed_seed(RANK_STREAMS, cfg.seed, env.rank))  # streams per rank (dropout, augmentation)
        return bundle, assemble(cfg, env, model, bundle, task, logger)


@contextlib.contextmanager
def _naming_unused_parameters() -> Iterator[None]:
    # DDP's own words name a DistributedDataParallel argument, which the user sets through the config instead.
    try:
        yield
    except RuntimeError as error:
        if "find_unused_parameters=True" not in str(error):
            raise
        raise UsageError(
            "some parameters took no part in a step's loss (a head used only at some steps, a frozen branch?): "
            "set trainer.find_unused_parameters=true"
        ) from error


def _check_arguments(model: Any, train_data: Any, val_data: Any, config: Any, overrides: Any) -> None:
    if not isinstance(model, nn.Module):
        raise UsageError(f"fit() trains an nn.Module, not {type(model).__name__}")
    if isinstance(model, DistributedDataParallel):
        raise UsageError("fit() wraps the model in DDP itself: pass the bare module (model.module)")
    if any(_get_registry(module) for module in model.modules()):  # where fully_shard and checkpoint mark a module
        raise UsageError(
            "fit() was given a model that fully_shard or checkpoint changed in place (an earlier fit() with "
            "trainer.strategy=fsdp or trainer.activation_checkpointing?): pass a new one, its weights loaded if wanted"
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # its group would be joined twice
        raise UsageError(
            "fit() joins the process group itself and leaves it when it ends: call it without init_process_group()"
        )
    for name, dataset in (("train_data", train_data), ("val_data", val_data)):
        if dataset is not None or name == "train_data":
            data.check_dataset(dataset, f"fit(): {name}")
    if config is not None and not isinstance(config, str | Path | Mapping):
        raise UsageError(f"fit(): config must be a YAML path, a dict of keys or None, not {type(config).__name__}")
    if isinstance(overrides, str):  # its characters would be taken for overrides, one by one
        raise UsageError(f"fit(): overrides must be a list of key=value strings, not one string: [{overrides!r}]")
    if not isinstance(overrides, list | tuple) or not all(isinstance(item, str) for item in overrides):
        raise UsageError(f"fit(): overrides must be a list of key=value strings, not {overrides!r}")


# What a run writes into output_dir, and whether it is a folder.
OUTPUTS = {"config.yaml": False, "metrics.jsonl": False, "checkpoints": True, "tensorboard": True, "wandb": True}


def _check_output_dir(output_dir: Path) -> None:
    # Checked, not created: a run refused later (a missing dataset, say) leaves no empty folder behind.
    existing = next(path for path in (output_dir, *output_dir.absolute().parents) if _exists(path, output_dir))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        problem = "is not writable" if existing.is_dir() else "is a file"
        raise UsageError(f"output_dir={output_dir} cannot be written: {existing} {problem}")
    for name, folder in OUTPUTS.items():  # else a traceback, or a write failing, the checkpoints' after a whole epoch
        path = output_dir / name
        if path.exists() and path.is_dir() != folder:
            kind = "a file" if folder else "a folder"
            raise UsageError(f"output_dir={output_dir} cannot be written: {path} is {kind}")
        if path.exists() and not os.access(path, os.W_OK):  # a read-only mount, another user's file or folder
            raise UsageError(f"output_dir={output_dir} cannot be written: {path} is not writable")


def _exists(path: Path, output_dir: Path) -> bool:
    # os.stat, not Path.exists: newer Pythons take any error for "missing", and would check a folder further up.
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as error:  # a name too long, a folder on the way this user may not enter
        raise UsageError(f"output_dir={output_dir} cannot be written: {error.strerror or error}") from None
    return True


def for_array_task(config: Config, task_id: int | None) -> Config:
    """The config SLURM array task `task_id` runs (None: not an array job): its own folder inside output_dir."""
    if task_id is None or not config.output_dir_per_array_task:
        return config
    # Saved as it ran: the task's config.yaml, given again as --config in the same array task, runs in that folder.
    folder = Path(config.output_dir) / f"array_task_{task_id}"
    if _holds_files(Path(config.output_dir) / "checkpoints") and not _holds_files(folder / "checkpoints"):
        # A release before the per-task folders saved there: the task would start over beside its checkpoints.
        raise UsageError(
            f"output_dir {config.output_dir} holds checkpoints of a run not split per array task (a release before "
            f"array_task_<index> folders, or a run outside the array): to resume it, set "
            f"output_dir_per_array_task=false; to train array task {task_id} anew, use another output_dir"
        )
    return dataclasses.replace(config, output_dir=str(folder), output_dir_per_array_task=False)


def _holds_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())
