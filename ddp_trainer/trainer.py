"""The training loop: epochs of DDP or FSDP steps, exact evaluation, global metrics and checkpoints."""

from __future__ import annotations

import contextlib
import functools
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ddp_trainer import peers, rng
from ddp_trainer.assembly import Parts
from ddp_trainer.claim import refused_on_every_rank
from ddp_trainer.config import Config, to_yaml
from ddp_trainer.data import DataBundle, to_device
from ddp_trainer.distributed import DistEnv, LaggedAgreement, PhaseTimeouts, barrier, gather_objects, requeue_slurm_job
from ddp_trainer.errors import TrainingDiverged
from ddp_trainer.evaluation import evaluate_model
from ddp_trainer.feeds import AgreedFeed, MicroBatch, buffers_kept, counted_windows
from ddp_trainer.loggers import RunLogger
from ddp_trainer.metrics import MetricSums, StepLedger
from ddp_trainer.preemption import Stopped, StopSignals, stop_origin
from ddp_trainer.saving import build_saver, build_state
from ddp_trainer.sharding import gradient_sync
from ddp_trainer.tasks import CLIP_SUMS, STEP_SUMS, Task, training_measure

# STEP_SUMS and CLIP_SUMS (beside the task's sums) are the same on every rank: rank 0 alone adds them, once a step.
# What ranks agree on between steps: a stop signal, and whether rank 0's clock says a checkpoint is due.
SIGNAL, SAVE_DUE = 0, 1


class Trainer:
    """Owns the model, optimizer and schedule of one run; `fit()` trains, evaluates and checkpoints."""

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        parts: Parts,
        data: DataBundle,
        task: Task,
        logger: RunLogger,
        stop: StopSignals,
        clock: Callable[[], float],
    ) -> None:
        self.cfg, self.env, self.data, self.task, self.logger = cfg, env, data, task, logger
        self.stop, self.clock, self.parts = stop, clock, parts
        self.model, self.train_model, self.ddp_model = parts.model, parts.train_model, parts.ddp_model
        self.optimizer, self.scheduler, self.precision = parts.optimizer, parts.scheduler, parts.precision
        self.monitor, self.progress, self.steps_per_epoch = parts.monitor, parts.progress, parts.steps_per_epoch
        self.history_here = parts.history_here
        self.checkpoint_dir = Path(cfg.output_dir) / "checkpoints"
        self.saver = build_saver(cfg, self.checkpoint_dir)
        self.parameters, self.accumulate = list(self.model.parameters()), cfg.trainer.accumulate_grad_batches
        self.reported_skips = self.first_skipped = 0
        self.trained_before = self.epoch_started = 0.0  # see _trained_s; set as each epoch starts
        if self.progress.last_lr is None:  # a new run (or an older checkpoint): the rate its first step will take
            self.progress.last_lr = self.optimizer.param_groups[0]["lr"]
        self.measure, rows_of = training_measure(task, self.accumulate)
        # A sync comes every log interval and at an epoch's end: the ledger holds the fewer steps. Only `skip` needs a
        # verdict before the step; `stop` saves nothing unjudged (each save follows a sync): the sync judges them all.
        clip, now, alone = cfg.trainer.grad_clip_norm > 0, cfg.trainer.nonfinite_loss == "skip", not env.distributed
        interval = min(cfg.trainer.log_every_n_steps, self.steps_per_epoch or cfg.trainer.log_every_n_steps)
        scaled = env if parts.precision.scaler is not None else None  # fp16: ranks share verdicts (_optimizer_step)
        self.ledger = StepLedger(rows_of, len(task.sum_names), interval, clip, env.device, now, scaled, alone)
        self.shared_weight, self.last_save_time = (1.0 if env.is_main else 0.0), clock()  # the weight: see STEP_SUMS
        self.agreement = LaggedAgreement(env, size=2)
        self.stream_feed = None  # a stream of unknown length agrees each step whether any rank still holds a batch
        if data.batches_per_epoch is None:
            self.stream_feed = AgreedFeed(data.train_loader, data.train_order, env, self.accumulate)
        groups = [self.agreement.group, self.stream_feed and self.stream_feed.agreement.group]
        self.timeouts = PhaseTimeouts(env, cfg.trainer.startup_timeout_s, cfg.trainer.dist_timeout_s, groups)

    def fit(self) -> tuple[int, bool]:
        """Train until `trainer.epochs` (or `trainer.max_steps`): (exit code, whether it ran to its end)."""
        kept = self.progress.epoch + self._reached_max_steps()  # a run already at max_steps keeps its part epoch's line
        kept, step = (kept, self.progress.step) if self.history_here else (0, 0)
        start = functools.partial(self.logger.start, to_yaml(self.cfg), kept, self.progress.wandb_run_id, step)
        refused_on_every_rank(self.env, start)  # rank 0 alone opens the loggers: W&B may refuse its settings
        self.progress.wandb_run_id = self.logger.wandb_run_id  # in checkpoints: a requeued job continues the same run
        self.logger.info(self._describe())
        try:
            return self._fit()
        finally:
            self.saver.close()  # on every path a write still running ends whole on disk; its error is raised here

    def _fit(self) -> tuple[int, bool]:
        try:
            self._run_epochs()
            self.agreement.receive()  # the last exchange, still in flight on every rank: finish it before teardown
            self.saver.close()  # the last checkpoint is on disk before the run says it is done
        except RuntimeError as error:
            if self.env.distributed and peers.is_peer_failure(error):
                # Steps done, not a step running: a peer may be lost while evaluating, or after the last step.
                step, epoch = self.progress.step, min(self.progress.epoch + 1, self.cfg.trainer.epochs)
                where = f"after step {step} (epoch {epoch})" if step else "before the first step ended"
                raise peers.rank_lost(error, self.env, self.timeouts.in_force(), where) from error
            raise
        except Stopped as stop:
            self.saver.close()  # the stop's checkpoint is on disk before the job exits or is requeued
            warned, requeue = stop.signum == signal.SIGUSR2, self.cfg.trainer.requeue  # only SLURM's warning requeues
            why = f"trainer.requeue={requeue}" if warned else f"{stop} is not SLURM's USR2 warning"
            skipped = (False, f"not requeued by this run ({why})")  # a user's `scontrol requeue` sends SIGTERM too
            requeued, outcome = requeue_slurm_job(self.env) if warned and requeue else skipped
            # Requeued by SLURM, the job goes on later: a success. Otherwise the shell's 128 + signal convention.
            exit_code = 0 if requeued else 128 + stop.signum
            saved, step = self.checkpoint_dir / self.saver.LAST, self.progress.step
            stopped_by = f"{stop}{stop_origin(self.stop, self.env)}"  # a gather, on every rank
            self.logger.info(f"stopped by {stopped_by} at step {step}: {saved} saved; {outcome}; exit code {exit_code}")
            return exit_code, False
        self.logger.info(f"done at step {self.progress.step}: {self.monitor.describe()}; {self.checkpoint_dir}")
        return 0, True

    def _run_epochs(self) -> None:
        for epoch in range(self.progress.epoch, self.cfg.trainer.epochs):
            if self._reached_max_steps() or self._should_stop_early():
                break
            train_totals, finished = self._train_epoch(epoch)
            train_s = self._trained_s()
            record = {
                "epoch": epoch + 1,
                "step": self.progress.step,
                "world_size": self.env.world_size,
                "lr": self.progress.last_lr,
                **self._train_summary(train_totals),
                "train/skipped_steps": int(train_totals["skipped_steps"]),
                **self.evaluate(),
                "time/train_s": train_s,
            }
            record["time/epoch_s"] = self._trained_s()  # and validated
            self._end_epoch(record, finished, train_totals)

    def _start_epoch(self, epoch: int) -> MetricSums:
        progress, order = self.progress, self.data.train_order
        order.set_epoch(epoch)  # a new, seed-reproducible order every epoch, the same on every rank
        clip_sums = CLIP_SUMS if self.cfg.trainer.grad_clip_norm > 0 else ()
        sums = MetricSums((*self.task.sum_names, *STEP_SUMS, *clip_sums), self.env.device)
        positions, progress.data_position = progress.data_position, None
        self.segment_batches = self.reported_skips = self.first_skipped = 0
        # One position per rank; a run on other ranks starts from rank 0's, which tells whether it fits.
        if positions and not order.resume(positions[self.env.rank if len(positions) == self.env.world_size else 0]):
            self.logger.info(f"the stored position inside epoch {epoch + 1} does not fit this run: it restarts")
            progress.batch_in_epoch, progress.partial_epoch_totals, progress.epoch_train_s = 0, None, 0.0
        if progress.partial_epoch_totals is not None:
            sums.add_global(progress.partial_epoch_totals, self.env)
            self.reported_skips = int(progress.partial_epoch_totals.get("skipped_steps", 0))  # reported before the stop
            self.first_skipped = int(progress.partial_epoch_totals.get("first_skipped_step", 0))
            progress.partial_epoch_totals = None
        self.trained_before, self.epoch_started = progress.epoch_train_s, time.perf_counter()
        return sums

    def _trained_s(self) -> float:
        """Seconds the current epoch has run, over every run that trained part of it."""
        return self.trained_before + time.perf_counter() - self.epoch_started

    def _feed(self) -> Iterator[MicroBatch]:
        if self.stream_feed is not None:
            return iter(self.stream_feed)
        start = self.progress.batch_in_epoch  # the loader holds the rest (replanned, for a stream on new ranks)
        return counted_windows(self.data.train_loader, start + len(self.data.train_loader), self.accumulate, start)

    def _train_epoch(self, epoch: int) -> tuple[dict[str, float], bool]:
        """One epoch (or its rest, when resumed): global training sums, and whether the epoch ran to its end."""
        sums = self._start_epoch(epoch)
        self.train_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        title, done = f"epoch {epoch + 1}/{self.cfg.trainer.epochs}", self.progress.batch_in_epoch
        total = self.data.batches_per_epoch and done + len(self.data.train_loader)  # the loader holds the epoch's rest
        # The (loss, outputs) of a window's trained micro-batches; accumulated ones give sums, which add up.
        window = None
        with contextlib.closing(self._feed()) as feed:  # closing a stream's feed ends its pending agreement
            for micro in self.logger.progress(feed, total, title, self.cfg.data.batch_size * self.env.world_size, done):
                if self._reached_max_steps():
                    return self._reduce(sums), False
                # From here on only the device copies: the loader's CPU tensors must not reach a device computation.
                batch = to_device(micro.batch, self.env.device, self.cfg.model.channels_last)
                with buffers_kept(self.model, keep=not micro.trained):
                    measured = self._forward_backward(batch, micro.weight, sync=micro.closes_window)
                if micro.trained:
                    window = measured if window is None else (window[0] + measured[0], window[1] + measured[1])
                    self.progress.batch_in_epoch += 1
                    self.segment_batches += 1  # by this process: the data order counts from its start
                if micro.closes_window:
                    self._optimizer_step(sums, window, micro.grad_scale)
                    self.optimizer.zero_grad(set_to_none=True)
                    window = None
        return self._reduce(sums), True

    def _forward_backward(self, batch: Any, weight: float, sync: bool) -> tuple[torch.Tensor, Any]:
        """Forward and backward of one micro-batch; returns its detached mean loss and what the task measured."""
        # Inside a window, gradients stay local: DDP all-reduces (FSDP reduce-scatters) once, on its last micro-batch.
        with gradient_sync(self.ddp_model or self.model, sync):
            with self.precision.autocast():
                loss, measured = self.measure(self.train_model, batch)
            self.precision.backward(loss * weight if weight != 1 else loss)
        return loss.detach(), measured

    def _optimizer_step(self, sums: MetricSums, window: tuple[torch.Tensor, Any] | None, grad_scale: float) -> None:
        clip = self.cfg.trainer.grad_clip_norm
        if grad_scale != 1:
            torch._foreach_mul_([p.grad for p in self.parameters if p.grad is not None], grad_scale)
        # The gradients' norm judges the step: a finite loss can still give NaN gradients (sqrt at 0), and DDP's
        # all-reduce gave every rank the same gradients, so each rank reaches the same verdict without a collective.
        # Under fp16 the GradScaler judges the gradients itself.
        by_norm = self.precision.scaler is None
        norm = self.precision.unscale_and_clip(self.optimizer, self.parameters, clip, measure=by_norm)
        # The verdict stays on the device: under `skip` a poisoned step is skipped there; the next host sync reports
        # it (under `stop` finds it, before any save). Under fp16 the GradScaler skips overflows, routine as it finds
        # its scale: each rank judges its own loss, which it skips too, and the sync shares the ranks' verdicts.
        step = self.progress.step = self.progress.step + 1
        loss, measured = window or (None, None)  # None: no micro-batch of this step trained on this rank
        skip = self.ledger.record(step, loss, measured, norm, by_norm)
        self.precision.step(self.optimizer, skip)
        self.progress.last_lr = self.optimizer.param_groups[0]["lr"]  # before the schedule moves on to the next step's
        self.scheduler.step()
        self.timeouts.steps_running()
        if step % self.cfg.trainer.log_every_n_steps == 0:
            running = self._train_summary(self._reduce(sums))  # the interval's one host sync
            del running["train/samples"]  # a count, not a curve worth drawing per step
            self.logger.show_running({**running, "lr": self.progress.last_lr}, step)
        # Ranks act on what they agreed at the previous check, and send their flags for the next one.
        check = step % self.cfg.trainer.stop_check_every_n_steps == 0
        agreed = self.agreement.receive() if check else [0, 0]
        every, ending = self.cfg.checkpoint.every_n_steps, self._reached_max_steps()
        # At max_steps the part epoch's end follows at once (its evaluation, line and save): saved here instead, a run
        # resumed at max_steps would have neither line nor best.pt. A signal now finds the run ending anyway.
        if not ending and (agreed[SIGNAL] or agreed[SAVE_DUE] or (every and step % every == 0)):
            self.progress.epoch_train_s = self._trained_s()
            self._save(("last",), partial_totals=self._reduce(sums))
        if agreed[SIGNAL] and not ending:
            raise Stopped(agreed[SIGNAL])
        if check:
            self.agreement.send(self._local_flags())

    def _reduce(self, sums: MetricSums) -> dict[str, float]:
        """Global totals, and where a skipped step pending on the device comes to light: before any save."""
        steps = self.ledger.fold(self.shared_weight)
        if steps is not None:
            sums.add_steps(steps)
        totals = sums.reduce(self.env)
        skipped = int(totals["skipped_steps"])
        find = skipped > self.reported_skips and not self.first_skipped  # only an epoch's first skip is looked for
        self.first_skipped = self.ledger.settle(find) or self.first_skipped
        totals["first_skipped_step"] = self.first_skipped  # kept in a mid-epoch checkpoint's totals
        if skipped > self.reported_skips:
            where = f"at step {self.first_skipped} (epoch {self.progress.epoch + 1})"
            if self.cfg.trainer.nonfinite_loss == "stop":
                # Nothing is saved: every save comes after this check, so the last checkpoint stays good.
                raise TrainingDiverged(
                    f"the loss or its gradients were not finite on at least one rank {where}; stopped at step "
                    f"{self.progress.step} without saving: {self.checkpoint_dir} holds only good checkpoints, if any "
                    "(trainer.nonfinite_loss=skip skips such steps)"
                )
            self.logger.info(
                f"skipped {skipped - self.reported_skips} optimizer step(s) by step {self.progress.step}, the epoch's "
                f"first {where}: the loss or its gradients were not finite on some rank"
            )
            self.reported_skips = skipped
        return totals

    def _local_flags(self) -> list[int]:
        minutes = self.cfg.checkpoint.every_n_minutes
        # Rank 0's clock decides for everyone: clocks of different hosts need not agree.
        save_due = self.env.is_main and minutes > 0 and self.clock() - self.last_save_time >= 60 * minutes
        return [self.stop.received, int(save_due)]

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

    def _reached_max_steps(self) -> bool:
        return 0 < self.cfg.trainer.max_steps <= self.progress.step

    def _should_stop_early(self) -> bool:
        if self.monitor.should_stop():
            self.logger.info(f"early stopping after epoch {self.progress.epoch}: {self.monitor.why_stop()}")
        return self.monitor.should_stop()

    def _end_epoch(self, record: dict[str, Any], finished: bool, totals: dict[str, float]) -> None:
        self.timeouts.waiting_on_rank_zero()  # its log lines and checkpoint may take long on a slow disk
        self.logger.log_epoch(record, self.cfg.trainer.epochs)
        if finished:
            self.progress.finish_epoch()
        else:
            self.progress.epoch_train_s = record["time/train_s"]
        improved = self.monitor.update(record, whole_epoch=finished)
        # Stopped by max_steps mid-epoch: the partial epoch's global sums let a resumed run finish it exactly.
        self._save(("last", "best") if improved else ("last",), partial_totals=None if finished else totals)

    def _save(self, names: tuple[str, ...], partial_totals: dict[str, float] | None) -> None:
        self.timeouts.waiting_on_rank_zero()  # until the next step: the barrier below waits for rank 0's write
        self.last_save_time = self.clock()
        position = self.data.train_order.position(self.segment_batches) if partial_totals else None
        # Every rank takes part: its RNG streams and data position (a stream's ranks differ), and under FSDP its shard.
        gathered = gather_objects((rng.capture(), position), self.env)
        state = None
        if self.env.is_main:
            state = build_state(self.parts, self.cfg, self.env.world_size, partial_totals, gathered)
        self.saver.save_run(self.model, self.optimizer, state, names, self.progress.step)
        # Ranks agree the save was issued. With checkpoint.async_save, the file is on disk once the next save, a stop
        # or the end of the run has waited for it; a kill before that leaves the previous checkpoint whole.
        barrier(self.env)

    def _describe(self) -> str:
        env, parameters = self.env, sum(parameter.numel() for parameter in self.parameters)
        train, val = ("streamed" if size is None else size for size in (self.data.train_size, self.data.val_size))
        steps = f"{self.steps_per_epoch} optimizer steps" if self.steps_per_epoch else "as many steps as streamed"
        return (
            f"training {type(self.model).__name__} ({parameters:,} parameters): world size {env.world_size} "
            f"({env.backend or 'single process'}, {env.device}), {train} train / {val} val samples, "
            f"batch {self.cfg.data.batch_size} per rank x {self.accumulate} accumulated, "
            f"{steps} per epoch, precision {self.cfg.trainer.precision}"
        )
