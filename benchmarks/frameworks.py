"""Worker: train one workload with a hand-written PyTorch loop, Lightning or Accelerate; rank 0 writes epoch times.

Launched by variants.py under `python` (1 process) or torchrun (2 processes), like ddp-trainer's own CLI. Every
variant times each epoch's pass over the same DataLoader, after a barrier, evaluation-free; epoch 1 is warm-up.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import time_epochs, write_json
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from workloads import WORKLOADS, Workload, make_optimizer, seeded_model

from ddp_trainer.distributed import teardown

REPORT_EVERY = 100  # the tutorial prints the loss every 100 batches: one host sync per 100 steps


def tutorial_epoch(
    model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, backward: Callable[[torch.Tensor], None]
) -> None:
    """One pass of the PyTorch tutorial's `train_loop` (Optimizing Model Parameters)."""
    for batch, (inputs, targets) in enumerate(loader):
        loss = F.cross_entropy(model(inputs), targets)
        backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if batch % REPORT_EVERY == 0:
            loss.item()  # where the tutorial prints the loss


def train_torch(
    workload: Workload, train_size: int, epochs: int, first_step_file: Path | None
) -> tuple[list[float], int]:
    """The tutorial loop; under torchrun, the DDP tutorial's additions: process group, sampler, DDP wrapper."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    train_set, _ = workload.datasets(train_size)
    model = seeded_model(workload, first_step_file)
    sampler = DistributedSampler(train_set, shuffle=True, seed=0) if distributed else None
    loader = DataLoader(train_set, batch_size=workload.batch_size, sampler=sampler, shuffle=sampler is None)
    optimizer = make_optimizer(model)
    train_model = DistributedDataParallel(model) if distributed else model

    def run_epoch(epoch: int) -> None:
        if sampler is not None:
            sampler.set_epoch(epoch)
        tutorial_epoch(train_model, loader, optimizer, torch.Tensor.backward)

    return time_epochs(epochs, run_epoch, dist.barrier if distributed else lambda: None), len(loader)


def train_accelerate(
    workload: Workload, train_size: int, epochs: int, first_step_file: Path
) -> tuple[list[float], int]:
    """The tutorial loop as Accelerate's quick tour writes it: prepare(), then accelerator.backward."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    train_set, _ = workload.datasets(train_size)
    model = seeded_model(workload, first_step_file)
    loader = DataLoader(train_set, batch_size=workload.batch_size, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, make_optimizer(model), loader)

    def run_epoch(epoch: int) -> None:
        loader.set_epoch(epoch)
        tutorial_epoch(model, loader, optimizer, accelerator.backward)

    return time_epochs(epochs, run_epoch, accelerator.wait_for_everyone), len(loader)


def train_lightning(workload: Workload, train_size: int, epochs: int, first_step_file: Path) -> tuple[list[float], int]:
    """A LightningModule whose training_step returns the loss, fitted by a Trainer with every extra turned off."""
    import lightning as L

    class Classifier(L.LightningModule):
        """The workload's model; Lightning runs backward, the optimizer and DDP."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
            """The loss of one batch, as in Lightning's own examples."""
            inputs, targets = batch
            return F.cross_entropy(self.model(inputs), targets)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            """The optimizer every variant uses."""
            return make_optimizer(self.model)

    class EpochTimer(L.Callback):
        """Times each training epoch, from after a barrier to the epoch's end."""

        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            """Start the clock once every rank is here."""
            trainer.strategy.barrier()  # as the other variants: every rank starts the timed epoch together
            self.started = time.perf_counter()

        def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            """Stop the clock."""
            self.seconds.append(time.perf_counter() - self.started)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    train_set, _ = workload.datasets(train_size)
    loader = DataLoader(train_set, batch_size=workload.batch_size, shuffle=True)
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp" if world_size > 1 else "auto",
        max_epochs=epochs,
        callbacks=[timer],
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(Classifier(seeded_model(workload, first_step_file)), loader)
    return timer.seconds, trainer.num_training_batches


TRAINERS = {"torch": train_torch, "accelerate": train_accelerate, "lightning": train_lightning}


def main() -> None:
    """Train as told on the command line; rank 0 writes the epoch times to --result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=sorted(TRAINERS), required=True)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--train-size", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--first-step-file", type=Path, required=True)
    args = parser.parse_args()
    workload = WORKLOADS[args.workload]
    seconds, steps = TRAINERS[args.framework](workload, args.train_size, args.epochs, args.first_step_file)
    # ddp-trainer's teardown for every framework: without it, gloo can abort the process at exit (SIGABRT).
    teardown()
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(
            args.result, {"epoch_seconds": seconds, "steps_per_epoch": steps, "threads": torch.get_num_threads()}
        )


if __name__ == "__main__":
    main()
