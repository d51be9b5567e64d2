"""The monitored metric: which epoch is best (for best.pt) and when to stop early, with min_delta and patience."""

from __future__ import annotations

import math
from typing import Any

from ddp_trainer.config import Config
from ddp_trainer.errors import UsageError
from ddp_trainer.tasks import Task


class Monitor:
    """Tracks `checkpoint.monitor` over whole epochs: the best value, and the epochs since it last improved by more
    than min_delta (early stopping's threshold, as Lightning's: best.pt takes any better epoch)."""

    def __init__(self, name: str, mode: str, min_delta: float, patience: int) -> None:
        self.name, self.mode, self.min_delta, self.patience = name, mode, min_delta, patience
        self.best: float | None = None
        self.reference: float | None = None  # the last value that improved by more than min_delta
        self.stale_epochs = 0
        # Reported only: a part epoch's value that best.pt holds while no whole epoch has set `best`.
        self.part_epoch_best: float | None = None

    def update(self, record: dict[str, Any], whole_epoch: bool) -> bool:
        """Take an epoch's record; True when best.pt takes it: a whole epoch's new best (by any margin), or a part
        epoch's (stopped at max_steps) while no whole epoch has set one."""
        value = record[self.name]
        if math.isnan(value):  # no better than any value, and nothing would ever compare better than it as the best
            self.stale_epochs += whole_epoch
            return False
        # A part epoch leaves the state alone: resumed, the rest of that epoch is judged with it, as uninterrupted.
        if not whole_epoch:
            if self.best is None:
                self.part_epoch_best = value
            return self.best is None
        if self.reference is None or self._improves_on(self.reference, value, self.min_delta):
            self.reference, self.stale_epochs = value, 0
        else:
            self.stale_epochs += 1
        if self.best is None or self._improves_on(self.best, value, 0.0):
            self.best = value
            return True
        return False

    def _improves_on(self, best: float, value: float, delta: float) -> bool:
        return value > best + delta if self.mode == "max" else value < best - delta

    def should_stop(self) -> bool:
        """Whether `patience` whole epochs passed without an improvement (never, with patience 0)."""
        return 0 < self.patience <= self.stale_epochs

    def why_stop(self) -> str:
        """Why `should_stop`, in words."""
        since = f" on {self.reference:.4f}" if self.reference is not None else ""  # None: every value was NaN
        return (
            f"{self.name} has not improved{since} by more than {self.min_delta} for {self.stale_epochs} epochs "
            f"({self.describe()})"
        )

    def describe(self) -> str:
        """The best value in words, for the run's last line."""
        if self.best is not None:
            return f"best {self.name} {self.best:.4f}"
        if self.part_epoch_best is not None:
            return f"best {self.name} {self.part_epoch_best:.4f} (part epoch)"
        return f"best {self.name} n/a"

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps, so a resumed run judges the next epochs like an uninterrupted one."""
        kept = {"best_metric": self.best, "epochs_without_improvement": self.stale_epochs}
        kept["early_stopping_reference"] = self.reference
        return {**kept, "part_epoch_best": self.part_epoch_best}  # a finished run started again still names it

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint's top-level keys (written by `state_dict`)."""
        self.best = state.get("best_metric")
        self.reference = state.get("early_stopping_reference", self.best)  # older checkpoints: best.pt followed it
        self.stale_epochs = state.get("epochs_without_improvement", 0)
        self.part_epoch_best = state.get("part_epoch_best")


def choice(task: Task, validates: bool, name: str | None, mode: str | None) -> tuple[str, str]:
    """The metric and mode `checkpoint.monitor` and `checkpoint.mode` choose: unset, the task's (train/loss without
    validation) and the metric's direction."""
    if name is None:
        name = task.default_monitor if validates else "train/loss"
    return name, mode or monitor_mode(task, name)


def build_monitor(cfg: Config, task: Task, validates: bool) -> Monitor:
    """The metric `checkpoint.monitor` chooses (`choice`), checked against the run."""
    name, mode = choice(task, validates, cfg.checkpoint.monitor, cfg.checkpoint.mode)
    available = metric_names(task, "train") + (metric_names(task, "val") if validates else [])
    if name not in available:
        raise UsageError(f"checkpoint.monitor={name} is not a metric of this run: one of {', '.join(available)}")
    return Monitor(name, mode, cfg.trainer.early_stopping_min_delta, cfg.trainer.early_stopping_patience)


def monitor_mode(task: Task, metric: str) -> str:
    """ "max" for a metric the task says improves upwards (`higher_is_better`), else "min"."""
    return "max" if metric.split("/", 1)[-1] in getattr(task, "higher_is_better", ()) else "min"


def metric_names(task: Task, prefix: str) -> list[str]:
    """The metrics `task` reports under `prefix`, by summarising sums of ones."""
    return list(task.summarize(dict.fromkeys(task.sum_names, 1.0), prefix))
