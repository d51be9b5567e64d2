"""How an epoch's batches become micro-batches of optimizer-step windows, for data of known and unknown length."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ddp_trainer.data.user_streams import RankShardedStream
from ddp_trainer.distributed import DistEnv, LaggedAgreement
from ddp_trainer.errors import UsageError


@dataclass
class MicroBatch:
    """One forward and backward: the loss is multiplied by `weight`; the window's last one syncs and steps."""

    batch: Any
    weight: float
    closes_window: bool
    trained: bool = True  # False: a zero-weight stand-in, on a rank whose stream ran out before the others'
    grad_scale: float = 1.0  # multiplies the window's gradients before the step (a stream's short last window)


@contextlib.contextmanager
def buffers_kept(model: torch.nn.Module, keep: bool) -> Iterator[None]:
    """Put `model`'s buffers back after the block, if `keep`: a stand-in's zero weight leaves the parameters alone,
    but its forward in train mode would move BatchNorm's running statistics by a batch already counted."""
    if not keep:
        yield
        return
    saved = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    yield
    with torch.no_grad():  # a buffer may require grad
        for name, buffer in model.named_buffers():
            if name in saved:  # not one the forward set anew (from None)
                buffer.copy_(saved[name])


def counted_windows(loader: Iterable[Any], batches_per_epoch: int, accumulate: int, start: int) -> Iterator[MicroBatch]:
    """Every rank holds the same number of batches: windows of `accumulate`, the epoch's last one maybe shorter.

    `start` is the epoch's batches already trained (a resumed epoch); the mean of k batch means is the window's mean.
    """
    for index, batch in enumerate(loader, start=start):
        window_start = index - index % accumulate
        window_batches = min(accumulate, batches_per_epoch - window_start)
        yield MicroBatch(batch, 1 / window_batches, index + 1 == window_start + window_batches)


def batch_rows(batch: Any) -> int:
    """The number of samples in a batch: the leading size of its first tensor (0 if it holds none)."""
    if torch.is_tensor(batch):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, dict):
        batch = batch.values()
    elif not isinstance(batch, list | tuple):  # a string or a number beside the tensors (a string iterates forever)
        return 0
    return next((rows for rows in map(batch_rows, batch) if rows), 0)


class AgreedFeed:
    """Micro-batches of a user stream, whose ranks hold different numbers of batches: steps go on until all are dry.

    Ranks agree, in the background and one micro-batch ahead, on how many of them hold a next batch and on its
    global size N. A rank already dry joins each step with a zero-weight stand-in, so DDP's all_reduce never waits
    for it; the weight n_r * world / N of a rank's mean loss makes the gradient the mean over the step's N samples.
    """

    def __init__(self, loader: Iterable[Any], stream: RankShardedStream, env: DistEnv, accumulate: int) -> None:
        self.loader, self.stream, self.env, self.accumulate = loader, stream, env, accumulate
        self.agreement = LaggedAgreement(env, size=3, op=dist.ReduceOp.SUM)
        self.stand_in: Any = None  # the last batch this rank trained (or skipped, when resumed): a dry rank's input

    def __iter__(self) -> Iterator[MicroBatch]:
        self.stand_in = None  # one epoch's stand-in: last epoch's would hide a stream that yields nothing this epoch
        source = iter(self.loader)
        upcoming = self._pull(source)
        self.agreement.send(self._flags(upcoming))
        holders, samples, lacking = self.agreement.receive()
        self._check_start(holders, lacking)
        in_window = 0
        try:
            while holders:
                current, upcoming = upcoming, None if upcoming is None else self._pull(source)
                self.agreement.send(self._flags(upcoming))
                in_window += 1
                closes = in_window == self.accumulate
                if current is None:
                    yield MicroBatch(self.stand_in, 0.0, closes, trained=False)
                else:
                    slot, self.stand_in = current
                    self.stream.handed_out(slot)
                    weight = batch_rows(self.stand_in) * self.env.world_size / samples / self.accumulate
                    yield MicroBatch(self.stand_in, weight, closes)
                in_window = 0 if closes else in_window
                holders, samples, _ = self.agreement.receive()
            if in_window:  # the last window closes short: a stand-in syncs it, the step counts its batches only
                yield MicroBatch(self.stand_in, 0.0, True, trained=False, grad_scale=self.accumulate / in_window)
        finally:
            self.agreement.receive()  # stopped early (max_steps, a signal): the exchange in flight ends everywhere

    def _pull(self, source: Iterator[tuple[int, Any]]) -> tuple[int, Any] | None:
        """The next (slot, batch) to train; a resumed reader's spare batch (slot -1) is kept as a stand-in."""
        for slot, batch in source:
            if slot >= 0:
                return slot, batch
            self.stand_in = batch
        return None

    def _flags(self, upcoming: tuple[int, Any] | None) -> list[int]:
        """(holds a next batch, its size, cannot stand in): what ranks agree on, summed."""
        if upcoming is None:
            return [0, 0, int(self.stand_in is None)]
        return [1, batch_rows(upcoming[1]), 0]

    def _check_start(self, holders: int, lacking: int) -> None:
        """Every rank learns the same sums, so every rank refuses alike, before any step's collective."""
        epoch = f"epoch {self.stream.epoch + 1}"
        if holders == 0 and lacking == self.env.world_size:  # not even a resumed epoch's skipped batch
            again = " (its __iter__ must start over on every pass, not resume a generator)" if self.stream.epoch else ""
            raise UsageError(f"data: the training stream yielded no record in {epoch}{again}")
        if holders and lacking:
            raise UsageError(
                f"data: {lacking} of {self.env.world_size} ranks got no record of the training stream in {epoch}: "
                "each rank needs at least one batch (use fewer ranks or data.num_workers, or more records)"
            )
