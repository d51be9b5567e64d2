"""Saving a run: what a checkpoint holds, and rank 0 writing it at once or from one background thread."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddp_trainer import checkpoint
from ddp_trainer.assembly import Parts
from ddp_trainer.config import Config, to_container
from ddp_trainer.errors import CliError, first_line
from ddp_trainer.sharding import full_state_dicts


class CheckpointWriteFailed(CliError):
    """A checkpoint file could not be written (no permission, disk full): one line naming the file, exit code 1."""


def model_state(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str = "ddp") -> dict[str, Any]:
    """The unsharded model and optimizer state dicts; under FSDP a collective that every rank calls, rank 0 keeps."""
    weights, optimizer_state = full_state_dicts(model, optimizer, strategy)
    return {"model": weights, "optimizer": optimizer_state}


def build_state(
    parts: Parts, cfg: Config, world_size: int, partial_totals: dict[str, float] | None, gathered: list[Any]
) -> dict[str, Any]:
    """The checkpoint but `model_state`; `gathered` holds every rank's (RNG states, data position), in rank order."""
    return {
        "scheduler": parts.scheduler.state_dict(),
        "grad_scaler": parts.precision.state_dict(),
        **parts.progress.state_dict(),
        "partial_epoch_totals": partial_totals,
        "data_position": [position for _, position in gathered] if partial_totals else None,
        **parts.monitor.state_dict(),
        "world_size": world_size,
        "rng": [states for states, _ in gathered],
        "config": to_container(cfg),
    }


def stage(state: Any) -> Any:
    """A deep copy of `state` whose tensors live in new CPU memory that training never writes to."""
    copied = _copy_to_cpu(state)
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # one wait for every non_blocking device-to-host copy above
    return copied


def _copy_to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu":
            # A CPU state dict aliases the live weights and optimizer buffers, which the next step updates in place.
            return value.detach().clone()
        pinned = torch.empty_like(value, device="cpu", pin_memory=True)  # pinned: the copy can run asynchronously
        return pinned.copy_(value.detach(), non_blocking=True)
    if isinstance(value, dict):
        return {key: _copy_to_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_to_cpu(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_copy_to_cpu(item) for item in value)
    return value  # numbers, strings, None: immutable


class Saver:
    """Rank 0's checkpoint writes into one folder: at once, or (async_save) staged to CPU and written by a thread."""

    def __init__(self, directory: Path, keep_last: int, async_save: bool) -> None:
        self.directory, self.keep_last = directory, keep_last
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer") if async_save else None
        self.pending: Future[None] | None = None

    def save(self, state: dict[str, Any], names: Sequence[str]) -> None:
        """Write `state` as each of `names` ("last", "best"), in order; with async_save return once it is staged."""
        # One write in flight: memory for one staged copy, and files land in the order they were saved.
        self.wait()
        if self.writer is None:
            self._write(state, names)
        else:
            self.pending = self.writer.submit(self._write, stage(state), names)

    def wait(self) -> None:
        """Return once no write is running; a background write's error is raised here, on the training thread."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the pending write and end the writer thread."""
        try:
            self.wait()
        finally:
            if self.writer is not None:
                self.writer.shutdown()

    def _write(self, state: dict[str, Any], names: Sequence[str]) -> None:
        for name in names:
            path = self.directory / f"{name}.pt"
            try:
                if name == "last":
                    checkpoint.save_last(state, self.directory, self.keep_last)
                else:
                    checkpoint.save_atomic(state, path)
            except Exception as error:
                # The previous whole file stays in place: save_atomic renames only a finished file over it.
                raise CheckpointWriteFailed(
                    f"could not write checkpoint {path} ({type(error).__name__}: {first_line(error)}); "
                    "the previous one is intact"
                ) from error
