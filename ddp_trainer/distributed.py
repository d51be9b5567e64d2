"""Process-group plumbing: the only module that reads launcher environment variables or picks a backend."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ddp_trainer.errors import UsageError


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job: rank, local rank, world size, device and backend."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None
    launcher: str

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group connects more than one rank."""
        return self.world_size > 1


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError as error:
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from error


def detect_launcher() -> tuple[str, int, int, int]:
    """Return (launcher, rank, local_rank, world_size) from torchrun's variables, or a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = _int_env("RANK"), _int_env("WORLD_SIZE")
        local_rank = _int_env("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "env"
        return launcher, rank, local_rank, world_size
    return "single", 0, 0, 1


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """Map trainer.device (auto|cpu|cuda) to this rank's device, one GPU per local rank."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("trainer.device=cuda but no CUDA device is available (use trainer.device=cpu or auto)")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise UsageError(f"local rank {local_rank} has no GPU: only {count} visible; start fewer processes per node")
    return torch.device("cuda", local_rank)


def setup(requested_device: str, timeout_s: float) -> DistEnv:
    """Join the process group when launched with more than one rank; return this rank's DistEnv."""
    launcher, rank, local_rank, world_size = detect_launcher()
    device = resolve_device(requested_device, local_rank)
    backend = None
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # A short timeout turns a dead or stuck peer into an error instead of the default 10-30 minute hang.
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    return DistEnv(rank, local_rank, world_size, device, backend, launcher)


def teardown() -> None:
    """Destroy the process group if one exists; safe to call on every exit path."""
    if dist.is_available() and dist.is_initialized():
        # DDP's reducer sits in reference cycles and keeps the group alive; collected only at interpreter exit,
        # gloo's threads then die mid-finalisation (SIGABRT, "terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """All ranks meet here (e.g. after rank 0 wrote a checkpoint)."""
    if env.distributed:
        if env.backend == "nccl":
            dist.barrier(device_ids=[env.local_rank])
        else:
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum `tensor` over all ranks in place and return it; a no-op in a single process."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module, env: DistEnv) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank; a no-op in a single process."""
    if env.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def rank_label() -> str:
    """' (rank N)' when several ranks run, for messages that must say which rank failed; '' otherwise."""
    world_size = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')})" if world_size not in ("", "1") else ""
