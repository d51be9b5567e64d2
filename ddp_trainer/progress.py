"""Where the training loop stands: the one object a checkpoint stores to continue exactly where a run stopped."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class Progress:
    """Epochs and optimizer steps done, and within an unfinished epoch what a resumed run needs to finish it."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps, over all epochs
    batch_in_epoch: int = 0  # micro-batches of the current epoch, over all the runs that trained it
    partial_epoch_totals: dict[str, float] | None = None  # global sums of an epoch stopped part-way
    data_position: list[dict[str, Any]] | None = None  # each rank's place in its data order, part-way an epoch
    wandb_run_id: str | None = None  # a requeued job continues the same wandb run
    last_lr: float | None = None  # the rate the last optimizer step took, which an epoch's line logs
    schedule_offset: int = 0  # steps beyond what the epochs done take at this world size (taken at another one)
    epoch_train_s: float = 0.0  # seconds an unfinished epoch trained before its checkpoint: its time/train_s goes on

    def finish_epoch(self) -> None:
        """The epoch ran to its end: the next starts from its beginning."""
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.partial_epoch_totals, self.data_position, self.epoch_train_s = None, None, 0.0

    def state_dict(self) -> dict[str, Any]:
        """The fields as top-level checkpoint keys (`epoch` and `step` among them, as the file format promises)."""
        return asdict(self)  # the caller adds the unfinished epoch's totals and positions, known only when it saves

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's keys; a key an older file lacks keeps its default."""
        for field in fields(self):
            if field.name in state:
                setattr(self, field.name, state[field.name])
