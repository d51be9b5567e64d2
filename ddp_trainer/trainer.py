"""The training loop: epochs of DDP steps, exact evaluation, global metrics and checkpoints."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddp_trainer import checkpoint, rng
from ddp_trainer.config import Config, to_container, to_yaml
from ddp_trainer.data import DataBundle, to_device
from ddp_trainer.distributed import (
    DistEnv,
    LaggedAgreement,
    barrier,
    gather_objects,
    is_peer_failure,
    rank_lost,
    requeue_slurm_job,
)
from ddp_trainer.errors import TrainingDiverged, UsageError, first_line
from ddp_trainer.evaluation import evaluate_model
from ddp_trainer.loggers import RunLogger
from ddp_trainer.metrics import MetricSums
from ddp_trainer.models import prepare_model
from ddp_trainer.monitor import Monitor
from ddp_trainer.optim import build_optimizer, build_scheduler
from ddp_trainer.precision import MixedPrecision
from ddp_trainer.preemption import StopSignals
from ddp_trainer.tasks import Task, metric_names, monitor_mode

# Beside the task's sums: the epoch's skipped (non-finite) steps and the first of them, and with clipping the
# (already all-reduced) gradient norms and how many steps they cover. Every rank holds the same values of these;
# rank 0 alone adds them, so the global sums count each step once.
STEP_SUMS = ("skipped_steps", "first_skipped_step")
CLIP_SUMS = ("grad_norm_sum", "grad_norm_steps")
# What ranks agree on between steps: a stop signal, and whether rank 0's clock says a checkpoint is due.
SIGNAL, SAVE_DUE = 0, 1


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
        task: Task,
        logger: RunLogger,
        stop: StopSignals | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg, self.env, self.data, self.task, self.logger = cfg, env, data, task, logger
        self.stop, self.clock = stop, clock
        self.checkpoint_dir = Path(cfg.output_dir) / "checkpoints"
        self.model = prepare_model(model, cfg.model, env)
        self.parameters = list(self.model.parameters())
        self.optimizer = build_optimizer(cfg.optim, self.model)
        self.precision = MixedPrecision(cfg.trainer.precision, env.device)
        self.accumulate = cfg.trainer.accumulate_grad_batches
        self.batches_per_epoch = len(data.train_loader)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.accumulate)
        total_steps = cfg.trainer.epochs * self.steps_per_epoch
        if cfg.trainer.max_steps > 0:
            total_steps = min(total_steps, cfg.trainer.max_steps)
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, self.steps_per_epoch, total_steps)
        self.completed_epochs, self.step, self.batch_in_epoch, self.segment_batches = 0, 0, 0, 0
        self.partial_epoch_totals: dict[str, float] | None = None
        self.reported_skips = 0
        self.shared_weight = 1.0 if env.is_main else 0.0  # see STEP_SUMS
        self.resume_position: dict[str, Any] | None = None
        self.monitor = self._build_monitor()
        self.wandb_run_id: str | None = None
        self.last_save_time = clock()
        if env.is_main:
            for unfinished in checkpoint.remove_unfinished_writes(self.checkpoint_dir):
                self.logger.info(f"removed {unfinished}: a checkpoint write that a crash interrupted")
        # Loaded before DDP wraps the model: a bad file then fails on every rank before any collective.
        resumed = checkpoint.load_for_resume(cfg.trainer.resume, Path(cfg.output_dir), self.logger.info)
        if resumed is not None:
            self._restore(*resumed)
        self.ddp_model: DistributedDataParallel | None = None
        self.train_model: nn.Module = self.model
        if env.distributed:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            self.ddp_model = self.train_model = DistributedDataParallel(self.model, device_ids=device_ids)
        self.agreement = LaggedAgreement(env, size=2)
        if cfg.trainer.compile:
            # Compiling the DDP wrapper lets dynamo split graphs at DDP's gradient buckets (its DDPOptimizer).
            self.train_model = torch.compile(self.train_model)

    def fit(self) -> int:
        """Train until `trainer.epochs` (or `trainer.max_steps`); returns 0, or the signal that stopped the run."""
        self.logger.start(to_yaml(self.cfg), self.completed_epochs, self.wandb_run_id, resumed_step=self.step)
        self.wandb_run_id = self.logger.wandb_run_id  # kept in checkpoints: a requeued job continues the same run
        self.logger.info(self._describe())
        try:
            self._run_epochs()
            self.agreement.receive()  # the last exchange, still in flight on every rank: finish it before teardown
        except RuntimeError as error:
            if self.env.distributed and is_peer_failure(error):
                where = f"at step {self.step + 1} (epoch {self.completed_epochs + 1})"
                raise rank_lost(error, self.env, self.cfg.trainer.dist_timeout_s, where) from error
            raise
        except Stopped as stop:
            requeue = stop.signum == signal.SIGUSR2 and self.cfg.trainer.requeue and self.env.is_main
            outcome = requeue_slurm_job() if requeue else "not requeued"
            saved = self.checkpoint_dir / "last.pt"
            self.logger.info(f"stopped by {stop} at step {self.step}: {saved} saved; {outcome}")
            return stop.signum
        self.logger.info(f"done at step {self.step}: {self.monitor.describe()}; {self.checkpoint_dir}")
        return 0

    def _run_epochs(self) -> None:
        for epoch in range(self.completed_epochs, self.cfg.trainer.epochs):
            if self._reached_max_steps() or self._should_stop_early():
                break
            started = time.perf_counter()
            train_totals, finished = self._train_epoch(epoch)
            train_s = time.perf_counter() - started
            record = {
                "epoch": epoch + 1,
                "step": self.step,
                "world_size": self.env.world_size,
                "lr": self.optimizer.param_groups[0]["lr"],
                **self._train_summary(train_totals),
                "train/skipped_steps": int(train_totals["skipped_steps"]),
                **self.evaluate(),
            }
            record["time/train_s"] = train_s
            record["time/epoch_s"] = time.perf_counter() - started
            self.logger.log_epoch(record, self.cfg.trainer.epochs)
            if finished:
                self.completed_epochs, self.batch_in_epoch, self.segment_batches = epoch + 1, 0, 0
            # Stopped by max_steps mid-epoch: the partial epoch's global sums let a resumed run finish it exactly.
            self._save_epoch_checkpoints(record, None if finished else train_totals)

    def _start_epoch(self, epoch: int) -> MetricSums:
        order = self.data.train_order
        order.set_epoch(epoch)  # a new, seed-reproducible order every epoch, the same on every rank
        clip_sums = CLIP_SUMS if self.cfg.trainer.grad_clip_norm > 0 else ()
        names = (*self.task.sum_names, *STEP_SUMS, *clip_sums)
        sums = MetricSums(names, self.env.device)
        position, self.resume_position, self.segment_batches, self.reported_skips = self.resume_position, None, 0, 0
        if position is not None and not order.resume(position):
            self.logger.info(f"the stored position inside epoch {epoch + 1} does not fit this world size: it restarts")
            self.batch_in_epoch, self.partial_epoch_totals = 0, None
        if self.partial_epoch_totals is not None:
            sums.add_global(self.partial_epoch_totals, self.env)
            self.reported_skips = int(self.partial_epoch_totals.get("skipped_steps", 0))  # reported before the stop
            self.partial_epoch_totals = None
        return sums

    def _train_epoch(self, epoch: int) -> tuple[dict[str, float], bool]:
        """One epoch (or its rest, when resumed): global training sums, and whether the epoch ran to its end."""
        sums = self._start_epoch(epoch)
        self.train_model.train()
        description = f"epoch {epoch + 1}/{self.cfg.trainer.epochs}"
        global_batch = self.cfg.data.batch_size * self.env.world_size
        batches = self.logger.progress(self.data.train_loader, self.batches_per_epoch, description, global_batch)
        window_sums = None
        for batch in batches:
            if self._reached_max_steps():
                return self._reduce(sums), False
            # A window of `accumulate` micro-batches makes one optimizer step; the epoch's last may be shorter.
            window_start = self.batch_in_epoch - self.batch_in_epoch % self.accumulate
            window_batches = min(self.accumulate, self.batches_per_epoch - window_start)
            if self.batch_in_epoch == window_start:
                self.optimizer.zero_grad(set_to_none=True)
                window_sums = None
            closes_window = self.batch_in_epoch + 1 == window_start + window_batches
            # From here on only the device copies: the loader's CPU tensors must not reach a device computation.
            batch = to_device(batch, self.env.device, self.cfg.model.channels_last)
            micro_sums = self._forward_backward(batch, window_batches, sync=closes_window)
            window_sums = micro_sums if window_sums is None else window_sums + micro_sums
            self.batch_in_epoch += 1
            self.segment_batches += 1
            if closes_window:
                self._optimizer_step(sums, window_sums)
        return self._reduce(sums), True

    def _forward_backward(self, batch: Any, window_batches: int, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the task's sums for it."""
        # Inside a window, gradients stay local: DDP all-reduces once, on the window's last micro-batch.
        no_sync = self.ddp_model.no_sync() if self.ddp_model is not None and not sync else contextlib.nullcontext()
        with no_sync:
            with self.precision.autocast():
                loss, sums = self.task.forward(self.train_model, batch)
            # The mean of k batch means is the mean over the window's kB samples.
            self.precision.backward(loss / window_batches if window_batches > 1 else loss)
        return sums

    def _optimizer_step(self, sums: MetricSums, window_sums: torch.Tensor) -> None:
        clip = self.cfg.trainer.grad_clip_norm
        # DDP's all-reduce gave every rank the same gradients, so one rank's NaN is every rank's: their norm lets
        # each rank reach the same verdict without a collective. Alone, a rank need only look at its loss.
        norm = self.precision.unscale_and_clip(self.optimizer, self.parameters, clip, measure=self.env.distributed)
        # The verdict stays on the device: a poisoned step is skipped there and reported at the next host sync.
        finite = torch.isfinite(window_sums[0] if norm is None else norm)
        self.precision.step(self.optimizer, finite)
        self.scheduler.step()
        self.step += 1
        sums.add(self._step_sums(sums, window_sums, norm, finite))
        if self.step % self.cfg.trainer.log_every_n_steps == 0:
            running = self._train_summary(self._reduce(sums))  # the interval's one host sync
            del running["train/samples"]  # a count, not a curve worth drawing per step
            self.logger.show_running({**running, "lr": self.optimizer.param_groups[0]["lr"]}, self.step)
        # Ranks act on what they agreed at the previous check, and send their flags for the next one.
        check = self.step % self.cfg.trainer.stop_check_every_n_steps == 0
        agreed = self.agreement.receive() if check else [0, 0]
        every = self.cfg.checkpoint.every_n_steps
        if agreed[SIGNAL] or agreed[SAVE_DUE] or (every and self.step % every == 0):
            self._save("last", partial_totals=self._reduce(sums))
        if agreed[SIGNAL]:
            raise Stopped(agreed[SIGNAL])
        if check:
            self.agreement.send(self._local_flags())

    def _step_sums(
        self, sums: MetricSums, window_sums: torch.Tensor, norm: torch.Tensor | None, finite: torch.Tensor
    ) -> torch.Tensor:
        """This step's values in the order of `sums.names`: a skipped step's samples count nowhere."""
        verdict = finite if self.precision.scaler is None else torch.ones_like(finite)  # fp16: the scaler judged
        skipped = (~verdict).double() * self.shared_weight
        first = torch.where(sums.value("skipped_steps") == 0, skipped * self.step, 0.0)
        shared = [skipped, first]
        if self.cfg.trainer.grad_clip_norm > 0:
            counted = finite.double() * self.shared_weight  # fp16's overflowed norms stay out of the mean
            shared += [torch.where(finite, norm.double(), 0.0) * self.shared_weight, counted]
        return torch.cat([torch.where(verdict, window_sums, 0.0), torch.stack(shared)])

    def _reduce(self, sums: MetricSums) -> dict[str, float]:
        """Global totals, and where a skipped step pending on the device comes to light: before any save."""
        totals = sums.reduce(self.env)
        skipped = int(totals["skipped_steps"])
        if skipped > self.reported_skips:
            where = f"at step {int(totals['first_skipped_step'])} (epoch {self.completed_epochs + 1})"
            if self.cfg.trainer.nonfinite_loss == "stop":
                # Nothing is saved: the skipped update never reached the weights, and the last checkpoint on disk
                # stays the last good one.
                raise TrainingDiverged(
                    f"the loss or its gradients were not finite on at least one rank {where}; stopped at step "
                    f"{self.step} without saving: {self.checkpoint_dir} keeps the last good checkpoint "
                    "(trainer.nonfinite_loss=skip skips such steps)"
                )
            self.logger.info(
                f"skipped {skipped - self.reported_skips} optimizer step(s) by step {self.step}, the epoch's first "
                f"{where}: the loss or its gradients were not finite on some rank"
            )
            self.reported_skips = skipped
        return totals

    def _local_flags(self) -> list[int]:
        minutes = self.cfg.checkpoint.every_n_minutes
        # Rank 0's clock decides for everyone: clocks of different hosts need not agree.
        save_due = self.env.is_main and minutes > 0 and self.clock() - self.last_save_time >= 60 * minutes
        return [self.stop.received if self.stop is not None else 0, int(save_due)]

    def _train_summary(self, totals: dict[str, float]) -> dict[str, float | int]:
        summary = self.task.summarize(totals, "train")
        if "grad_norm_sum" in totals and totals["grad_norm_steps"]:  # clipping on (a resume may have turned it off)
            summary["train/grad_norm"] = totals["grad_norm_sum"] / totals["grad_norm_steps"]
        return summary

    def evaluate(self) -> dict[str, float | int]:
        """The task's global validation metrics, each sample counted exactly once; none without validation data."""
        if self.data.val_loader is None:
            return {}
        loader, channels_last = self.data.val_loader, self.cfg.model.channels_last
        return evaluate_model(self.model, loader, self.env, self.precision, self.task, channels_last)

    def _build_monitor(self) -> Monitor:
        """`checkpoint.monitor` (by default the task's, or train/loss without validation), checked against the run."""
        name = self.cfg.checkpoint.monitor
        if name is None:
            name = self.task.default_monitor if self.data.val_loader is not None else "train/loss"
        available = metric_names(self.task, "train")
        if self.data.val_loader is not None:
            available += metric_names(self.task, "val")
        if name not in available:
            raise UsageError(f"checkpoint.monitor={name} is not a metric of this run: one of {', '.join(available)}")
        mode = self.cfg.checkpoint.mode or monitor_mode(self.task, name)
        trainer = self.cfg.trainer
        return Monitor(name, mode, trainer.early_stopping_min_delta, trainer.early_stopping_patience)

    def _reached_max_steps(self) -> bool:
        return 0 < self.cfg.trainer.max_steps <= self.step

    def _should_stop_early(self) -> bool:
        if not self.monitor.should_stop():
            return False
        self.logger.info(
            f"early stopping after epoch {self.completed_epochs}: {self.monitor.name} has not improved by more than "
            f"{self.monitor.min_delta} for {self.monitor.stale_epochs} epochs ({self.monitor.describe()})"
        )
        return True

    def _save_epoch_checkpoints(self, record: dict[str, Any], totals: dict[str, float] | None) -> None:
        improved = self.monitor.update(record, whole_epoch=totals is None)
        self._save("last", partial_totals=totals)
        if improved:
            self._save("best", partial_totals=totals)

    def _save(self, which: str, partial_totals: dict[str, float] | None) -> None:
        self.last_save_time = self.clock()
        rng_states = gather_objects(rng.capture(), self.env)  # every rank's streams, not only rank 0's
        if self.env.is_main:
            state = {
                "model": checkpoint.clean_state_dict(self.model.state_dict()),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "grad_scaler": self.precision.state_dict(),
                "epoch": self.completed_epochs,
                "step": self.step,
                "batch_in_epoch": self.batch_in_epoch,
                "data_position": self.data.train_order.position(self.segment_batches) if partial_totals else None,
                "partial_epoch_totals": partial_totals,
                **self.monitor.state_dict(),
                "wandb_run_id": self.wandb_run_id,
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
            self.precision.load_state_dict(state.get("grad_scaler"))
        except (RuntimeError, ValueError, KeyError) as error:
            reason = first_line(error)
            raise UsageError(f"checkpoint {path} does not fit this run's model or optimizer: {reason}") from error
        self.completed_epochs, self.step = state["epoch"], state["step"]
        self.monitor.load_state_dict(state)
        self.wandb_run_id = state.get("wandb_run_id")
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
        env, parameters = self.env, sum(parameter.numel() for parameter in self.parameters)
        return (
            f"training {type(self.model).__name__} ({parameters:,} parameters): world size {env.world_size} "
            f"({env.backend or 'single process'}, {env.device}), {self.data.train_size} train / {self.data.val_size} "
            f"val samples, batch {self.cfg.data.batch_size} per rank x {self.accumulate} accumulated, "
            f"{self.steps_per_epoch} optimizer steps per epoch, precision {self.cfg.trainer.precision}"
        )
