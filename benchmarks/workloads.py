"""The work every variant repeats: model, synthetic data, batch size and optimizer, defined once.

Imported by the training processes too (ddp-trainer builds the model through `model._target_=workloads.build_model`),
so it stays light: torch and ddp-trainer's own builders only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ddp_trainer import models
from ddp_trainer.config import ModelConfig, SyntheticConfig
from ddp_trainer.data.datasets import TensorClassification, synthetic

NUM_CLASSES = 10
VAL_SIZE = 256  # evaluation is not timed; a small set keeps ddp-trainer's epochs short
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01  # AdamW with ddp-trainer's defaults in every variant
SEED = 0


@dataclass(frozen=True)
class Workload:
    """One model on one synthetic dataset at one per-rank batch size, trained identically by every variant."""

    key: str
    title: str
    architecture: str
    input_shape: tuple[int, ...]
    hidden_sizes: tuple[int, ...]
    batch_size: int
    train_size: int

    def model_kwargs(self, first_step_file: Path | None = None) -> dict:
        """Keyword arguments of `build_model` for this workload."""
        kwargs = {
            "architecture": self.architecture,
            "input_shape": list(self.input_shape),
            "widths": list(self.hidden_sizes),
            "classes": NUM_CLASSES,
        }
        if first_step_file is not None:
            kwargs["first_step_file"] = str(first_step_file)
        return kwargs

    def datasets(self, train_size: int) -> tuple[TensorClassification, TensorClassification]:
        """ddp-trainer's `data.name=synthetic` datasets, so every variant trains on the same tensors."""
        return synthetic(SyntheticConfig(train_size, VAL_SIZE, list(self.input_shape), NUM_CLASSES))

    def trainer_overrides(self, train_size: int, first_step_file: Path | None = None) -> list[str]:
        """`key=value` overrides that make ddp-trainer's CLI train exactly this workload."""
        model = [f"model.{key}={_dotlist(value)}" for key, value in self.model_kwargs(first_step_file).items()]
        return [
            "data.name=synthetic",
            f"data.synthetic.train_size={train_size}",
            f"data.synthetic.val_size={VAL_SIZE}",
            f"data.synthetic.input_shape={_dotlist(list(self.input_shape))}",
            f"data.synthetic.num_classes={NUM_CLASSES}",
            f"data.batch_size={self.batch_size}",
            "data.num_workers=0",
            "model._target_=workloads.build_model",
            *model,
            "optim.name=adamw",
            f"optim.lr={LEARNING_RATE}",
            f"optim.weight_decay={WEIGHT_DECAY}",
            "optim.scheduler=none",
            f"seed={SEED}",
        ]


TINY_MLP = Workload("mlp", "tiny MLP (64-64-10, 1x8x8 inputs, batch 32)", "mlp", (1, 8, 8), (64,), 32, 12288)
SMALL_CNN = Workload("cnn", "small CNN (LeNet-5, 1x28x28 inputs, batch 32)", "cnn", (1, 28, 28), (), 32, 2400)
WORKLOADS = {workload.key: workload for workload in (TINY_MLP, SMALL_CNN)}


def _dotlist(value: object) -> str:
    return "[" + ",".join(str(item) for item in value) + "]" if isinstance(value, list) else str(value)


def build_model(
    architecture: str, input_shape: list[int], widths: list[int], classes: int, first_step_file: str | None = None
) -> nn.Module:
    """The workload's model, made by ddp-trainer's own builder; optionally stamps the wall time of its first forward."""
    config = ModelConfig(name=architecture, hidden_sizes=list(widths))
    model = models.build(config, tuple(input_shape), classes)
    if first_step_file is not None:
        stamp_first_forward(model, Path(first_step_file))
    return model


def stamp_first_forward(model: nn.Module, path: Path) -> None:
    """Append the wall time of the model's first forward call (the first training step) to `path`, once per rank."""

    def stamp(module: nn.Module, inputs: tuple) -> None:
        handle.remove()  # after the first call the model runs without hooks, as in any other run
        with path.open("a") as file:  # one short appended line per rank: ranks do not overwrite each other
            file.write(f"{time.time()}\n")

    handle = model.register_forward_pre_hook(stamp)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer every variant uses: AdamW, fused as ddp-trainer builds it, so a ratio measures the loop alone."""
    return torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, fused=True)


def seeded_model(workload: Workload, first_step_file: Path | None) -> nn.Module:
    """The workload's model with the same initial weights ddp-trainer gives it (seeded before building)."""
    torch.manual_seed(SEED)
    return build_model(**workload.model_kwargs(first_step_file))
