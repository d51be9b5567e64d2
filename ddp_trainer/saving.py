"""Saving a run: what a checkpoint holds; rank 0 writes a file or every rank its shard, at once or in the background."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.optim import Optimizer
from torch.torch_version import TorchVersion

from ddp_trainer import atomic, checkpoint
from ddp_trainer.assembly import Parts
from ddp_trainer.config import Config, to_container
from ddp_trainer.errors import CheckpointWriteFailed, first_line
from ddp_trainer.peers import is_peer_failure
from ddp_trainer.sharding import sharded_state_dicts

STAGER_KEEPS_BUFFERS = TorchVersion(torch.__version__) >= "2.13"
State = dict[str, Any] | None  # a checkpoint's entries but the model and optimizer: rank 0's, None on the others


def model_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model's state dict (no wrapper prefixes) and the optimizer's: what a checkpoint file holds beside `state`."""
    return {"model": checkpoint.unwrapped(model).state_dict(), "optimizer": optimizer.state_dict()}


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
        "data_sizes": parts.data_sizes,
        "rng": [states for states, _ in gathered],
        "config": to_container(cfg),
    }


def stage(state: Any, reuse: Any = None) -> Any:
    """A deep copy of `state` in CPU memory that training never writes to: `reuse`'s tensors where they fit, else new.

    Reusing the previous save's copy (its write finished) skips a page fault per page of fresh memory, and under CUDA
    the cost of pinning it again.
    """
    copied = _copy_to_cpu(state, reuse, {})
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # one wait for every non_blocking device-to-host copy above
    return copied


def _copy_to_cpu(value: Any, reuse: Any, copies: dict[tuple, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        # Tied weights (an embedding shared with the output layer) are one copy, as torch.save writes them: not two.
        view = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), value.stride(), value.dtype)
        if (view, value.shape) not in copies:
            copies[view, value.shape] = _copy_tensor(value, reuse)
        return copies[view, value.shape]
    if isinstance(value, dict):
        old = reuse if isinstance(reuse, dict) else {}
        return {key: _copy_to_cpu(item, old.get(key), copies) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        old = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(value) else [None] * len(value)
        items = [_copy_to_cpu(item, previous, copies) for item, previous in zip(value, old, strict=True)]
        return items if isinstance(value, list) else tuple(items)
    return value  # numbers, strings, None: immutable


def _copy_tensor(value: torch.Tensor, reuse: Any) -> torch.Tensor:
    fits = isinstance(reuse, torch.Tensor) and (reuse.shape, reuse.dtype) == (value.shape, value.dtype)
    if value.device.type == "cpu":
        # A CPU state dict aliases the live weights and optimizer buffers, which the next step updates in place.
        return reuse.copy_(value.detach()) if fits else value.detach().clone()
    # Pinned: the copy can run asynchronously.
    pinned = reuse if fits and reuse.is_pinned() else torch.empty_like(value, device="cpu", pin_memory=True)
    return pinned.copy_(value.detach(), non_blocking=True)


class Saver:
    """Rank 0's checkpoint writes into one folder: at once, or (async_save) staged to CPU and written by a thread."""

    LAST = "last.pt"

    def __init__(self, directory: Path, keep_last: int, async_save: bool) -> None:
        self.directory, self.keep_last = directory, keep_last
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer") if async_save else None
        self.pending: Future[None] | None = None
        self.staged: dict[str, Any] | None = None  # the last async save's copy, reused once its write is done

    def save_run(self, model: nn.Module, optimizer: Optimizer, state: State, names: Sequence[str], step: int) -> None:
        """Rank 0, the one given `state`, saves it with the model and optimizer as one file under each of `names`."""
        if state is not None:
            self.save({**model_state(model, optimizer), **state}, names)

    def save(self, state: dict[str, Any], names: Sequence[str]) -> None:
        """Write `state` as each of `names` ("last", "best"; last.pt last); with async_save return once it is staged."""
        # One write in flight: memory for one staged copy, and files land in the order they were saved.
        self.wait()
        if self.writer is None:
            self._write(state, names)
        else:
            self.staged = stage(state, self.staged)
            self.pending = self.writer.submit(self._write, self.staged, names)

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
        # One write, the other names hard links to it: a second write failing (a full disk) would leave best.pt
        # behind the last.pt that records it as the best, for good. For the same reason last.pt is named last: a
        # kill between the names leaves the older last.pt, whose resume redoes the epoch and names best.pt again.
        written = None
        for name in sorted(names, key="last".__eq__):
            path = self.directory / f"{name}.pt"
            with failures_named(path):
                if name == "last":
                    checkpoint.save_last(state, self.directory, self.keep_last, written)
                elif written is not None:
                    atomic.link_atomic(written, path)
                else:
                    atomic.save_atomic(state, path)
            written = path


def build_saver(cfg: Config, directory: Path) -> Saver:
    """The run's saver: rank 0's file (ddp) or every rank's shard (fsdp), written at once or in the background."""
    keep_last, async_save = cfg.checkpoint.keep_last, cfg.checkpoint.async_save
    if cfg.trainer.strategy == "fsdp":
        # Its collectives wait on every rank's writes, which a slow disk may make long: start-up's timeout.
        return ShardedSaver(directory, keep_last, async_save, timedelta(seconds=cfg.trainer.startup_timeout_s))
    return Saver(directory, keep_last, async_save)


class ShardedSaver(Saver):
    """Sharded checkpoints (FSDP): every rank writes its shard with DCP into a folder that rank 0 then publishes.

    With async_save DCP copies the shards to CPU memory and writes them from a thread, its collectives on a gloo group
    of their own while the training thread's run on the default one; rank 0's writer thread then publishes the folder.
    """

    LAST = "last"

    def __init__(self, directory: Path, keep_last: int, async_save: bool, timeout: timedelta) -> None:
        super().__init__(directory, keep_last, async_save)
        self.group = dist.new_group(backend="gloo", timeout=timeout) if async_save and dist.is_initialized() else None
        # Pinned (and copied without blocking) only when the run is on a GPU: pinning would start CUDA in a CPU run.
        self.pinned = torch.cuda.is_initialized()
        self.stager: DefaultStager | None = None

    def _stager(self) -> DefaultStager:
        # One stager for every save copies into the CPU buffers it allocated the first time, not fresh (pinned)
        # memory. torch 2.11's stager frees its buffers and empties its copy tables after each stage, and a second
        # save through it fails (KeyError: <class 'type'>); 2.13 keeps them. Before 2.13 each save gets its own.
        if self.stager is not None and not STAGER_KEEPS_BUFFERS:
            self.stager.close()
            self.stager = None
        if self.stager is None:
            self.stager = DefaultStager(StagingOptions(self.pinned, False, False, self.pinned))
        return self.stager

    def save_run(self, model: nn.Module, optimizer: Optimizer, state: State, names: Sequence[str], step: int) -> None:
        """Every rank's shard into `step-<step>/`, with rank 0's `state` (None elsewhere) as its state file."""
        self.wait()
        written, final = self.directory / f".step-{step:08d}.tmp", self.directory / f"step-{step:08d}"
        shards, no_dist = sharded_state_dicts(model, optimizer), not dist.is_initialized()
        # A tensor every rank holds (a BatchNorm buffer, unsharded) is written once: from rank 0, whose values
        # evaluation uses, not from whichever rank DCP's default would pick, whose statistics drifted on their own.
        options = {
            "storage_writer": FileSystemWriter(written),
            "planner": DefaultSavePlanner(dedup_save_to_lowest_rank=True),
        }
        shards_written = None
        with failures_named(final):
            if self.writer is None:
                dcp.save(shards, no_dist=no_dist, **options)
            else:
                shards_written = dcp.async_save(
                    shards, process_group=self.group, async_stager=self._stager(), no_dist=no_dist, **options
                )
        if shards_written is None:
            self._publish(None, state, written, final, names)
        else:
            staged = stage(state) if state is not None else None
            self.pending = self.writer.submit(self._publish, shards_written, staged, written, final, names)

    def close(self) -> None:
        """Wait for the pending write, end the writer thread and free the staging buffers."""
        try:
            super().close()
        finally:
            if self.stager is not None:
                self.stager.close()

    def _publish(
        self,
        shards_written: Future | None,
        state: dict[str, Any] | None,
        written: Path,
        final: Path,
        names: Sequence[str],
    ) -> None:
        with failures_named(final):
            if shards_written is not None:
                shards_written.result()  # on rank 0: every rank's shard is in, DCP wrote `.metadata` last
            if state is not None:
                atomic.save_atomic(state, written / checkpoint.SHARDED_STATE)
                checkpoint.publish_folder(written, final, names, self.keep_last)


@contextmanager
def failures_named(path: Path) -> Iterator[None]:
    """A failed write (no permission, disk full, a rank's DCP error) as one line naming `path`."""
    try:
        yield
    except (Exception, CheckpointException) as error:  # DCP's CheckpointException is a BaseException
        cause = checkpoint.dcp_cause(error)
        if dist.is_initialized() and isinstance(cause, RuntimeError) and is_peer_failure(cause):
            # A rank died in the write's collectives: named as lost (exit 4), as elsewhere; this rank's write is fine.
            raise cause from (None if cause is error else error)
        said = f"{type(cause).__name__}: {first_line(cause)}"
        if isinstance(cause, RuntimeError) and "unexpected pos" in said:
            # DCP's shards go through torch's zip writer, which drops a failed write's OSError and then fails its own
            # position check: a write that came up short is a full disk or a quota.
            said = "a write came up short: no space left on the device, or over quota"
        # The previous checkpoint stays in place: only a finished file or folder is renamed over or beside it.
        raise CheckpointWriteFailed(
            f"could not write checkpoint {path} ({said}); every earlier checkpoint is intact"
        ) from error
