"""Functions run inside real worker processes started by torch.multiprocessing (gloo on CPU)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddp_trainer import config, data, distributed, models, train
from ddp_trainer.loggers import RunLogger
from ddp_trainer.trainer import Trainer


def free_port() -> int:
    """A TCP port nobody listens on right now (tests must not hard-code ports)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


def _evaluate(cfg: config.Config, env: distributed.DistEnv) -> dict[str, float | int]:
    bundle = data.build(cfg.data, env, cfg.seed)
    model = models.build(cfg.model, bundle.input_shape, bundle.num_classes)
    return Trainer(cfg, env, model, bundle, RunLogger(Path(cfg.output_dir), False, False)).evaluate()


def evaluate_checkpoint(rank: int, world_size: int, port: int, overrides: list[str], out_file: str) -> None:
    """Restore a checkpoint (trainer.resume=PATH in overrides) and write rank 0's validation metrics."""
    _join_as(rank, world_size, port)
    cfg = config.load(None, overrides)
    env = distributed.setup("cpu", 60)
    try:
        # The trainer (and its DDP wrapper) is gone before teardown, as in ddp_trainer.train.run.
        metrics = _evaluate(cfg, env)
    finally:
        distributed.teardown()
    if env.is_main:
        Path(out_file).write_text(json.dumps(metrics))
