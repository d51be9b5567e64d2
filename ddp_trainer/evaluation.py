"""Evaluation: exact global validation metrics, each validation sample counted once at any world size."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from ddp_trainer.data import to_device
from ddp_trainer.distributed import DistEnv, all_reduce_sum, broadcast_buffers
from ddp_trainer.errors import UsageError
from ddp_trainer.metrics import MetricSums
from ddp_trainer.precision import MixedPrecision
from ddp_trainer.sharding import unsharded
from ddp_trainer.tasks import Task


@torch.no_grad()
def evaluate_model(
    model: nn.Module, loader: DataLoader, env: DistEnv, precision: MixedPrecision, task: Task, channels_last: bool
) -> dict[str, float | int]:
    """The task's global validation metrics (`val/...`), each validation sample counted exactly once."""
    # The bare module, not DDP: evaluation must not run a collective per batch (ranks hold uneven counts).
    broadcast_buffers(model, env)  # e.g. BatchNorm statistics: every rank evaluates rank 0's
    was_training = model.training
    model.eval()
    sums, batches = MetricSums(task.sum_names, env.device), 0
    with unsharded(model):  # FSDP: gathered once, as an all-gather per batch would hang on uneven counts
        for batch in loader:
            with precision.autocast():
                sums.add(task.forward(model, to_device(batch, env.device, channels_last))[1])
            batches += 1
    model.train(was_training)
    # A stream may yield nothing (a generator spent on its first pass): its metrics would read 0, a perfect loss.
    if not all_reduce_sum(torch.tensor([batches], device=env.device), env).item():
        raise UsageError("data: the validation data yielded no batch (a stream's __iter__ must start over every pass)")
    return task.summarize(sums.reduce(env), "val")
