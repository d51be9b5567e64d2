"""Real ranks for tests: functions run in processes torch.multiprocessing starts, and the CLI as plain ranks."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO_DIR, cli_env
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from ddp_trainer import assembly
from ddp_trainer.cli import train


def free_port() -> int:
    """A TCP port nobody listens on right now (tests must not hard-code ports)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def plain_ranks(args: list[str], world_size: int = 2) -> list[subprocess.Popen]:
    """The CLI in `world_size` plain processes with the rank variables set, as srun would start them.

    Not torchrun: torchrun ends the other ranks as soon as one exits, which would hide what each rank does alone.
    """
    port = str(free_port())
    return [
        subprocess.Popen(
            [sys.executable, "-m", "ddp_trainer.train", *args],
            env={
                **cli_env(),
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_DIR,
        )  # fmt: skip
        for rank in range(world_size)
    ]


def spawn(world_size: int, function: Callable, *args: object) -> None:
    """Run function(rank, world_size, port, *args) in `world_size` fresh processes; re-raise their errors."""
    mp.spawn(function, args=(world_size, free_port(), *args), nprocs=world_size, join=True)


def _join_as(rank: int, world_size: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def train_counting_all_reduce(rank: int, world_size: int, port: int, args: list[str], out_dir: str) -> None:
    """Run the CLI on this rank and record how many times torch.distributed.all_reduce was called."""
    _join_as(rank, world_size, port)
    original, calls = dist.all_reduce, []

    def counting(tensor, *call_args, **call_kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - mirrors all_reduce
        if tensor.dtype == torch.float64:  # metric sums; the per-step stop flag is int64
            calls.append(1)
        return original(tensor, *call_args, **call_kwargs)

    dist.all_reduce = counting
    try:
        assert train.main(args) == 0
    finally:
        dist.all_reduce = original
    Path(out_dir, f"all_reduce_rank{rank}.txt").write_text(str(len(calls)))


def evaluate_checkpoint(rank: int, world_size: int, port: int, path: str, overrides: list[str], out_file: str) -> None:
    """Run `ddp-train evaluate --checkpoint PATH --json` on this rank; rank 0's printed JSON goes to `out_file`."""
    _join_as(rank, world_size, port)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert train.main(["evaluate", "--checkpoint", path, "--json", *overrides]) == 0
    if rank == 0:
        Path(out_file).write_text(printed.getvalue())
    else:
        assert printed.getvalue() == ""  # only rank 0 reports


def train_counting_gradient_allreduces(rank: int, world_size: int, port: int, args: list[str], out_dir: str) -> None:
    """Run the CLI on this rank with a DDP communication hook that counts gradient all-reduces."""
    _join_as(rank, world_size, port)
    calls: list[int] = []

    # No annotations: DDP compares them with dist.GradBucket, and postponed evaluation makes them strings.
    def counting_allreduce(state, bucket):  # noqa: ANN001, ANN202
        calls.append(bucket.index())
        return default_hooks.allreduce_hook(None, bucket)

    class CountingDDP(DistributedDataParallel):
        def __init__(self, *ddp_args: object, **ddp_kwargs: object) -> None:
            super().__init__(*ddp_args, **ddp_kwargs)
            self.register_comm_hook(None, counting_allreduce)

    assembly.DistributedDataParallel = CountingDDP
    assert train.main(args) == 0
    Path(out_dir, f"gradient_allreduces_rank{rank}.txt").write_text(str(len(calls)))


def train_rank(rank: int, world_size: int, port: int, args: list[str]) -> None:
    """Run the CLI on this rank; it must succeed."""
    _join_as(rank, world_size, port)
    assert train.main(args) == 0
