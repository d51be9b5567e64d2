"""Learning-rate schedules: warmup, then cosine or step decay, per optimizer step."""

from __future__ import annotations

import math

import pytest

from ddp_trainer.config import OptimConfig
from ddp_trainer.optim import lr_multiplier


def test_linear_warmup_then_cosine_to_min_lr():
    cfg = OptimConfig(lr=0.1, scheduler="cosine", warmup_steps=10, min_lr=0.001)
    factor = lr_multiplier(cfg, steps_per_epoch=10, total_steps=110)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.01 + 0.99 * 0.5)
    assert factor(110) == pytest.approx(0.01)


def test_step_decay_counts_epochs_in_optimizer_steps():
    factor = lr_multiplier(OptimConfig(scheduler="step", step_epochs=2, gamma=0.5), steps_per_epoch=5, total_steps=50)
    assert [factor(step) for step in (0, 9, 10, 20)] == [1.0, 1.0, 0.5, 0.25]


def test_no_scheduler_keeps_the_lr():
    factor = lr_multiplier(OptimConfig(), steps_per_epoch=5, total_steps=50)
    assert all(math.isclose(factor(step), 1.0) for step in range(50))
