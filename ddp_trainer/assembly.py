"""A run assembled in reading order: model (FSDP-sharded), optimizer, schedule, precision, checkpoint, compile, DDP."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddp_trainer import changes, checkpoint, claim, rng
from ddp_trainer.config import Config
from ddp_trainer.data import DataBundle
from ddp_trainer.data import unused_keys as data_keys_unused
from ddp_trainer.distributed import DistEnv, barrier
from ddp_trainer.errors import UsageError, first_line
from ddp_trainer.loggers import RunLogger
from ddp_trainer.models import prepare_model, unused_mlp_keys
from ddp_trainer.monitor import Monitor, build_monitor, choice
from ddp_trainer.optim import build_optimizer, build_scheduler, relay_schedule, schedule_length
from ddp_trainer.peers import is_peer_failure
from ddp_trainer.precision import MixedPrecision
from ddp_trainer.progress import Progress
from ddp_trainer.sharding import load_full_state_dicts, load_shards, shard_model
from ddp_trainer.tasks import Task


@dataclass
class Parts:
    """What the Trainer drives: built from the config and, when resuming, restored from a checkpoint."""

    model: nn.Module  # the bare module (FSDP-sharded in place under fsdp): what checkpoints hold and evaluation runs
    train_model: nn.Module  # what a training step calls: `model`, compiled and/or inside DDP
    ddp_model: DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: MixedPrecision
    monitor: Monitor
    progress: Progress
    steps_per_epoch: int | None  # None: a stream of unknown length
    data_sizes: list[int | None]  # train and validation samples (None: a stream's), checked on resume
    # False once resumed from another folder's checkpoint: this folder's metrics lines and events are not its history.
    history_here: bool = True
    finished: bool = False  # resumed in its folder with nothing left to train: no logger opens, nothing is written


def assemble(cfg: Config, env: DistEnv, model: nn.Module, data: DataBundle, task: Task, logger: RunLogger) -> Parts:
    """Build every part of the run for this rank, resuming from `trainer.resume` when it names a checkpoint."""
    fsdp = cfg.trainer.strategy == "fsdp"
    sharded = fsdp and env.distributed  # one process has nothing to shard: it trains the whole model, as under ddp
    for note in filter(None, (unused_mlp_keys(cfg.model), data_keys_unused(cfg.data))):  # a recipe's: not refused
        logger.info(note)
    # Sharded, fully_shard moves the model to the GPU a unit at a time: moved whole, all of it must fit on each GPU.
    model = prepare_model(model, cfg.model, env, move=not sharded)
    if fsdp:  # before the optimizer is built: it must hold the sharded (DTensor) parameters
        blocks = shard_model(model, cfg.trainer, env.device if sharded else None)
        found = ", ".join(blocks) or "nothing: no trainer.fsdp_wrap class is in the model"
        logger.info(f"fsdp: one unit per {found}, and the root" if sharded else "fsdp in one process: nothing sharded")
    optimizer = build_optimizer(cfg.optim, model)
    steps_per_epoch, total_steps = schedule_length(cfg, data.batches_per_epoch)
    scheduler = build_scheduler(cfg.optim, optimizer, steps_per_epoch, total_steps)
    # Under FSDP its MixedPrecisionPolicy casts the parameters: no autocast on top.
    precision = MixedPrecision("32" if sharded else cfg.trainer.precision, env.device)
    monitor = build_monitor(cfg, task, validates=data.val_loader is not None)
    sizes = [data.train_size, data.val_size]
    parts = Parts(model, model, None, optimizer, scheduler, precision, monitor, Progress(), steps_per_epoch, sizes)
    checkpoint_dir = Path(cfg.output_dir) / "checkpoints"
    if env.is_main:
        for unfinished in checkpoint.remove_unfinished_writes(checkpoint_dir):
            logger.info(f"removed {unfinished}: a checkpoint write that a crash interrupted")
    # The others list the folder only once rank 0 has put back a checkpoint that a crash left set aside: before,
    # they would see `last` point at nothing and resume from an older step than rank 0.
    barrier(env)
    # Loaded before DDP wraps the model: a bad file then fails on every rank before any collective.
    resume(parts, cfg, env, logger, functools.partial(choice, task, data.val_loader is not None))
    # Compiled inside DDP: dynamo compiles the module's frame while DDP runs it, so its DDPOptimizer splits graphs at
    # the gradient buckets. Compiling the DDP wrapper instead breaks the graph at DDP's forward, and the module's frame
    # is then skipped when its class is torch's own (an nn.Sequential): it would train eagerly.
    parts.train_model = torch.compile(model) if cfg.trainer.compile else model
    if env.distributed and not fsdp:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        unused = cfg.trainer.find_unused_parameters  # parameters some steps leave out of the graph (DDP needs told)
        parts.ddp_model = parts.train_model = DistributedDataParallel(
            parts.train_model, device_ids, find_unused_parameters=unused
        )
    return parts


def resume(parts: Parts, cfg: Config, env: DistEnv, logger: RunLogger, choose: changes.Choose) -> None:
    """Restore the newest checkpoint that reads whole: one whose shards prove damaged gives way to the one before.

    `choose` resolves a config's unset monitor and mode, so the checkpoint's are compared as they were chosen."""
    unreadable: dict[Path, str] = {}
    while True:
        resumed = checkpoint.load_for_resume(cfg.trainer.resume, Path(cfg.output_dir), logger.info, unreadable)
        # Every rank, one that found nothing too: a rank on its own would train from another step, or start over.
        claim.same_on_every_rank(resumed and resumed[0], resumed[1] if resumed else Path(cfg.output_dir), env)
        if resumed is None:
            return
        state, path = resumed
        if path.resolve() in unreadable:  # named by trainer.resume=PATH: nothing older to take instead
            raise checkpoint.UnreadableCheckpoint(unreadable[path.resolve()])
        facts = {"world_size": env.world_size, "data_sizes": parts.data_sizes}
        accepted = changes.check(state, cfg, facts, path, logger.info, choose)
        try:
            restore(parts, state, path, cfg, env, logger, accepted)
            return
        except checkpoint.UnreadableCheckpoint as error:  # DCP hands every rank the same failure: all fall back alike
            unreadable[path.resolve()] = str(error)
            logger.info(f"{error}; trying an older checkpoint")


def restore(
    parts: Parts,
    state: dict[str, Any],
    path: Path,
    cfg: Config,
    env: DistEnv,
    logger: RunLogger,
    accepted: list[str],
) -> None:
    """Load a checkpoint into the parts, weights to RNG streams, with the `accepted` config changes in its schedule."""
    try:
        if path.is_dir():
            load_shards(parts.model, parts.optimizer, path)
        else:
            load_full_state_dicts(
                parts.model, parts.optimizer, state["model"], state["optimizer"], cfg.trainer.strategy
            )
        parts.scheduler.load_state_dict(state["scheduler"])
        parts.precision.load_state_dict(state.get("grad_scaler"))
        changes.apply(accepted, cfg, parts.optimizer, parts.scheduler)
    except (RuntimeError, ValueError, KeyError) as error:
        if env.distributed and isinstance(error, RuntimeError) and is_peer_failure(error):  # one died as they read
            raise  # named as a rank lost during start-up: the checkpoint is not at fault
        reason = first_line(error)
        raise UsageError(f"checkpoint {path} does not fit this run's model or optimizer: {reason}") from error
    parts.progress.load_state_dict(state)
    if state.get("world_size", env.world_size) != env.world_size and parts.steps_per_epoch:
        # The epochs done took other step counts; those left count whole (a map-style epoch restarts at another size).
        parts.progress.schedule_offset = state["step"] - state["epoch"] * parts.steps_per_epoch
    if parts.progress.schedule_offset:
        relay_schedule(parts.scheduler, cfg, parts.steps_per_epoch, parts.progress.schedule_offset)
    if path.resolve().parent == (Path(cfg.output_dir) / "checkpoints").resolve():
        parts.monitor.load_state_dict(state)
    else:  # a run branched off another's checkpoint: a W&B run, and a best.pt, of its own, as Lightning's are
        parts.progress.wandb_run_id = None
        parts.history_here = False
    fresh_seed = rng.mixed_seed(rng.RESEEDED_RANK, cfg.seed, env.rank, parts.progress.step)
    _restore_streams(state.get("rng") or [], path, fresh_seed, env, logger)
    logger.info(f"resumed from {path}: step {parts.progress.step}, epochs done: {parts.progress.epoch}")
    _mark_if_finished(parts, path, cfg, logger)


def _mark_if_finished(parts: Parts, path: Path, cfg: Config, logger: RunLogger) -> None:
    """Mark and say that a run resumed in its folder has nothing left to train; refuse a finished run's elsewhere."""
    progress, stopped_early = parts.progress, parts.monitor.should_stop()
    if progress.epoch < cfg.trainer.epochs and not 0 < cfg.trainer.max_steps <= progress.step and not stopped_early:
        return
    early = ", stopped early" if stopped_early else ""
    epochs, steps = cfg.trainer.epochs, cfg.trainer.max_steps  # lowered on resume, they may be below those done
    of = f"of {epochs} epochs" if progress.epoch <= epochs else f"epochs, past trainer.epochs={epochs}"
    where = "at" if progress.step == steps else "past"
    at = f", {where} trainer.max_steps={steps}" if 0 < steps <= progress.step else ""
    done = f"({progress.epoch} {of}, step {progress.step}{at}{early})"
    if not parts.history_here:  # here nothing was trained, nor will be: no record to report
        raise UsageError(
            f"trainer.resume={path} is a finished run {done}: nothing to train from it; to train on, raise "
            "trainer.epochs (or trainer.max_steps) and list it in trainer.allow_changes"
        )
    logger.info(f"this run is finished {done}: nothing to train; to train again, use another output_dir")
    parts.finished = True


def _restore_streams(rng_states: list[Any], path: Path, fresh_seed: int, env: DistEnv, logger: RunLogger) -> None:
    """This rank's RNG streams from the checkpoint; saved at another world size, fresh ones from `fresh_seed`."""
    if len(rng_states) != env.world_size:
        # Fresh streams, the step mixed in: the start's seeds alone would replay the run's first dropout masks.
        rng.seed_everything(fresh_seed)
        logger.info(f"{path} holds RNG streams of {len(rng_states)} ranks, not {env.world_size}: reseeded")
        return
    try:
        rng.restore(rng_states[env.rank], fresh_seed)  # dropout and augmentation continue as if never stopped
    except (TypeError, ValueError, KeyError, IndexError) as error:  # a file made by hand, not by a save
        raise UsageError(f"checkpoint {path} holds RNG states no run could restore ({first_line(error)})") from None
