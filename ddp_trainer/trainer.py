"""The training loop: epochs of DDP steps, exact evaluation, global metrics and checkpoints."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddp_trainer import checkpoint, rng
from ddp_trainer.config import Config, to_container, to_yaml
from ddp_trainer.data import DataBundle
from ddp_trainer.distributed import (
    DistEnv,
    any_rank_max,
    barrier,
    broadcast_buffers,
    gather_objects,
    requeue_slurm_job,
)
from ddp_trainer.errors import TrainingDiverged, UsageError
from ddp_trainer.loggers import RunLogger
from ddp_trainer.metrics import SUM_NAMES, MetricSums, batch_sums, summarize
from ddp_trainer.optim import build_optimizer, build_scheduler
from ddp_trainer.preemption import StopSignals


class Stopped(Exception):
    """Raised out of the step loop once every rank agreed to stop on a signal; the checkpoint is written."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Trainer:
    """Owns the model, optimizer and schedule of one run; `fit()` trains, evaluates and checkpoints."""

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        model: nn.Module,
        data: DataBundle,
        logger: RunLogger,
        stop: StopSignals | None = None,
    ) -> None:
        self.cfg, self.env, self.data, self.logger, self.stop = cfg, env, data, logger, stop
        self.checkpoint_dir = Path(cfg.output_dir) / "checkpoints"
        self.model = model.to(env.device)
        self.optimizer = build_optimizer(cfg.optim, self.model)
        self.steps_per_epoch = len(data.train_loader)
        total_steps = cfg.trainer.epochs * self.steps_per_epoch
        if cfg.trainer.max_steps > 0:
            total_steps = min(total_steps, cfg.trainer.max_steps)
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, self.steps_per_epoch, total_steps)
        self.completed_epochs, self.step, self.batch_in_epoch, self.segment_batches = 0, 0, 0, 0
        self.partial_epoch_totals: dict[str, float] | None = None
        self.skipped_steps = 0
        self.resume_position: dict[str, Any] | None = None
        self.best_metric: float | None = None
        # Loaded before DDP wraps the model: a bad file then fails on every rank before any collective.
        resumed = checkpoint.load_for_resume(cfg.trainer.resume, Path(cfg.output_dir), self.logger.info)
        if resumed is not None:
            self._restore(*resumed)
        self.train_model = self.model
        if env.distributed:
            device_ids = [env.local_rank] if env.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=device_ids)

    def fit(self) -> int:
        """Train until `trainer.epochs` (or `trainer.max_steps`); returns 0, or the signal that stopped the run."""
        self.logger.start(to_yaml(self.cfg), self.completed_epochs)
        self.logger.info(self._describe())
        try:
            self._run_epochs()
        except Stopped as stop:
            requeue = stop.signum == signal.SIGUSR2 and self.cfg.trainer.requeue and self.env.is_main
            outcome = requeue_slurm_job() if requeue else "not requeued"
            saved = self.checkpoint_dir / "last.pt"
            self.logger.info(f"stopped by {stop} at step {self.step}: {saved} saved; {outcome}")
            return stop.signum
        best = "n/a" if self.best_metric is None else f"{self.best_metric:.4f}"
        self.logger.info(f"done at step {self.step}: best {self.cfg.checkpoint.monitor} {best}; {self.checkpoint_dir}")
        return 0

    def _run_epochs(self) -> None:
        for epoch in range(self.completed_epochs, self.cfg.trainer.epochs):
            if self._reached_max_steps():
                break
            started = time.perf_counter()
            train_totals, finished = self._train_epoch(epoch)
            record = {
                "epoch": epoch + 1,
                "step": self.step,
                "world_size": self.env.world_size,
                "lr": self.optimizer.param_groups[0]["lr"],
                **summarize(train_totals, "train"),
                "train/skipped_steps": self.skipped_steps,
                **self.evaluate(),
            }
            record["time/epoch_s"] = time.perf_counter() - started
            self.logger.log_epoch(record, self.cfg.trainer.epochs)
            if finished:
                self.completed_epochs, self.batch_in_epoch, self.segment_batches = epoch + 1, 0, 0
            # Stopped by max_steps mid-epoch: the partial epoch's global sums let a resumed run finish it exactly.
            self._save_epoch_checkpoints(record, None if finished else train_totals)

    def _start_epoch(self, epoch: int) -> MetricSums:
        order = self.data.train_order
        order.set_epoch(epoch)  # a new, seed-reproducible order every epoch, the same on every rank
        sums = MetricSums(SUM_NAMES, self.env.device)
        position, self.resume_position, self.segment_batches, self.skipped_steps = self.resume_position, None, 0, 0
        if position is not None and not order.resume(position):
            self.logger.info(f"the stored position inside epoch {epoch + 1} does not fit this world size: it restarts")
            self.batch_in_epoch, self.partial_epoch_totals = 0, None
        if self.partial_epoch_totals is not None:
            sums.add_global(self.partial_epoch_totals, self.env)
            self.partial_epoch_totals = None
        return sums

    def _train_epoch(self, epoch: int) -> tuple[dict[str, float], bool]:
        """One epoch (or its rest, when resumed): global training sums, and whether the epoch ran to its end."""
        sums = self._start_epoch(epoch)
        self.train_model.train()
        batches = self.logger.progress(
            self.data.train_loader, len(self.data.train_loader), f"epoch {epoch + 1}/{self.cfg.trainer.epochs}"
        )
        for inputs, targets in batches:
            if self._reached_max_steps():
                return sums.reduce(self.env), False
            inputs = inputs.to(self.env.device, non_blocking=True)
            targets = targets.to(self.env.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            logits = self.train_model(inputs)
            loss = F.cross_entropy(logits, targets)
            loss.backward()  # DDP averages gradients over ranks here: one rank's NaN reaches every rank
            signum, nonfinite = self._agree_on(loss)
            self.batch_in_epoch += 1
            self.segment_batches += 1
            if nonfinite:
                self._skip_nonfinite_step(loss)
            else:
                self.optimizer.step()
                self.scheduler.step()
                sums.add(batch_sums(logits, targets, loss))
                self.step += 1
            if self.step % self.cfg.trainer.log_every_n_steps == 0:
                self.logger.show_running(summarize(sums.reduce(self.env), "train"))  # the interval's one sync
            every = self.cfg.checkpoint.every_n_steps
            if every and self.step % every == 0:
                self._save("last", partial_totals=sums.reduce(self.env))
            if signum:
                self._save("last", partial_totals=sums.reduce(self.env))
                raise Stopped(signum)
        return sums.reduce(self.env), True

    @torch.no_grad()
    def evaluate(self) -> dict[str, float | int]:
        """Global val/loss, val/accuracy and val/samples, each validation sample counted exactly once."""
        # The bare module, not DDP: evaluation must not run a collective per batch (ranks hold uneven counts).
        broadcast_buffers(self.model, self.env)  # e.g. BatchNorm statistics: every rank evaluates rank 0's
        self.model.eval()
        sums = MetricSums(SUM_NAMES, self.env.device)
        for inputs, targets in self.data.val_loader:
            inputs = inputs.to(self.env.device, non_blocking=True)
            targets = targets.to(self.env.device, non_blocking=True)
            logits = self.model(inputs)
            sums.add(batch_sums(logits, targets, F.cross_entropy(logits, targets)))
        self.model.train()
        return summarize(sums.reduce(self.env), "val")

    def _agree_on(self, loss: torch.Tensor) -> tuple[int, int]:
        """(stop signal, non-finite loss) as agreed by all ranks, so they stop or skip at the same step."""
        if self.step % self.cfg.trainer.stop_check_every_n_steps:
            return 0, 0
        received = self.stop.received if self.stop is not None else 0
        flags = torch.stack([loss.new_tensor(received, dtype=torch.int64), (~torch.isfinite(loss.detach())).long()])
        signum, nonfinite = any_rank_max(flags, self.env)
        return signum, nonfinite

    def _skip_nonfinite_step(self, loss: torch.Tensor) -> None:
        where = f"at step {self.step + 1} (epoch {self.completed_epochs + 1}, batch {self.batch_in_epoch})"
        if self.cfg.trainer.nonfinite_loss == "stop":
            # Nothing is saved: the last checkpoint on disk stays the last good one.
            raise TrainingDiverged(
                f"the loss was not finite on at least one rank {where} (here: {loss.item()}); stopped, "
                f"{self.checkpoint_dir} keeps the last good checkpoint (trainer.nonfinite_loss=skip skips such steps)"
            )
        self.optimizer.zero_grad(set_to_none=True)  # the poisoned gradients never reach the weights
        self.skipped_steps += 1
        self.logger.info(f"skipped the optimizer step {where}: the loss was not finite on some rank")

    def _reached_max_steps(self) -> bool:
        return 0 < self.cfg.trainer.max_steps <= self.step

    def _is_better(self, value: float) -> bool:
        if self.best_metric is None:
            return True
        return value > self.best_metric if self.cfg.checkpoint.mode == "max" else value < self.best_metric

    def _save_epoch_checkpoints(self, record: dict[str, Any], totals: dict[str, float] | None) -> None:
        value = record[self.cfg.checkpoint.monitor]
        improved = self._is_better(value)
        if improved:
            self.best_metric = value
        self._save("last", partial_totals=totals)
        if improved:
            self._save("best", partial_totals=totals)

    def _save(self, which: str, partial_totals: dict[str, float] | None) -> None:
        rng_states = gather_objects(rng.capture(), self.env)  # every rank's streams, not only rank 0's
        if self.env.is_main:
            state = {
                "model": checkpoint.clean_state_dict(self.model.state_dict()),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "epoch": self.completed_epochs,
                "step": self.step,
                "batch_in_epoch": self.batch_in_epoch,
                "data_position": self.data.train_order.position(self.segment_batches) if partial_totals else None,
                "partial_epoch_totals": partial_totals,
                "best_metric": self.best_metric,
                "world_size": self.env.world_size,
                "rng": rng_states,
                "config": to_container(self.cfg),
            }
            if which == "last":
                checkpoint.save_last(state, self.checkpoint_dir, self.cfg.checkpoint.keep_last)
            else:
                checkpoint.save_atomic(state, self.checkpoint_dir / "best.pt")
        barrier(self.env)  # no rank runs ahead of a checkpoint that is not on disk yet

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        try:
            self.model.load_state_dict(checkpoint.clean_state_dict(state["model"]))
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UsageError(f"checkpoint {path} does not fit this run's model or optimizer: {reason}") from error
        self.completed_epochs, self.step = state["epoch"], state["step"]
        self.best_metric = state.get("best_metric")
        self.batch_in_epoch = state.get("batch_in_epoch", 0)
        self.partial_epoch_totals = state.get("partial_epoch_totals")
        self.resume_position = state.get("data_position")
        rng_states = state.get("rng") or []
        if len(rng_states) == self.env.world_size:
            rng.restore(rng_states[self.env.rank])  # dropout and augmentation continue as if never stopped
        else:
            ranks = len(rng_states)
            self.logger.info(f"{path} holds RNG streams of {ranks} ranks, not {self.env.world_size}: reseeded")
        self.logger.info(f"resumed from {path}: epoch {self.completed_epochs}, step {self.step}")

    def _describe(self) -> str:
        data, env = self.cfg.data, self.env
        what = data._target_ or data.name
        model = self.cfg.model._target_ or self.cfg.model.name
        return (
            f"training {model} on {what}: world size {env.world_size} ({env.backend or 'single process'}, "
            f"{env.device}), {self.data.train_size} train / {self.data.val_size} val "
            f"samples, batch {data.batch_size} per rank, {self.steps_per_epoch} steps per epoch"
        )
