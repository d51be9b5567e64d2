"""Optimizers (fused, skipping poisoned steps on the device) and learning-rate schedules per optimizer step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import read_metrics

from ddp_trainer.cli.train import main
from ddp_trainer.config import OptimConfig
from ddp_trainer.optim import build_optimizer, build_scheduler, lr_multiplier
from ddp_trainer.precision import MixedPrecision


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
    # 13 steps took the first 2 epochs at another world size: epochs of 5 steps start at steps 13, 18, 23...
    moved = lr_multiplier(OptimConfig(scheduler="step", step_epochs=2, gamma=0.5), 5, total_steps=43, offset=3)
    assert [moved(step) for step in (12, 13, 22, 23)] == [1.0, 0.5, 0.5, 0.25]


def test_a_floor_above_the_peak_is_refused_where_a_schedule_decays_to_it(tmp_path, capsys):
    args = ["--config", "configs/digits_mlp.yaml", "trainer.device=cpu", "optim.min_lr=1e-2", f"output_dir={tmp_path}"]
    assert main(args) == 2  # its cosine 'decay' climbed to ten times optim.lr=1e-3
    assert (
        "config key 'optim.min_lr' has invalid value 0.01: expected at most optim.lr (0.001)" in capsys.readouterr().err
    )
    assert not (tmp_path / "checkpoints").exists()
    assert lr_multiplier(OptimConfig(lr=1e-3, min_lr=1e-2), 5, total_steps=50)(10) == 1.0  # no schedule reads it


def test_no_scheduler_keeps_the_lr():
    factor = lr_multiplier(OptimConfig(), steps_per_epoch=5, total_steps=50)
    assert all(math.isclose(factor(step), 1.0) for step in range(50))


def test_the_stepwise_scheduler_gives_lambdalrs_lrs_and_state_without_wrapping_the_optimizer():
    cfg = OptimConfig(lr=0.1, scheduler="cosine", warmup_steps=3, min_lr=0.001)
    optimizers = [build_optimizer(cfg, torch.nn.Linear(2, 2)) for _ in range(2)]
    ours = build_scheduler(cfg, optimizers[0], steps_per_epoch=4, total_steps=12)
    torch_own = torch.optim.lr_scheduler.LambdaLR(optimizers[1], lr_multiplier(cfg, 4, 12))
    assert not hasattr(optimizers[0].step, "_wrapped_by_lr_sched") and hasattr(
        optimizers[1].step, "_wrapped_by_lr_sched"
    )
    for _ in range(14):
        assert [group["lr"] for group in optimizers[0].param_groups] == [g["lr"] for g in optimizers[1].param_groups]
        for optimizer, scheduler in zip(optimizers, (ours, torch_own), strict=True):
            optimizer.step()
            scheduler.step()
    keys = ("base_lrs", "last_epoch", "_step_count", "_last_lr")
    assert [ours.state_dict()[key] for key in keys] == [torch_own.state_dict()[key] for key in keys]
    assert ours.get_last_lr() == torch_own.get_last_lr() and ours.last_epoch == 14


@pytest.mark.parametrize("name", ["sgd", "adamw", "adam"])
def test_a_fused_step_told_it_found_inf_changes_nothing(name):
    model = torch.nn.Linear(4, 3)
    optimizer = build_optimizer(OptimConfig(name=name, lr=0.1), model)
    assert optimizer.defaults["fused"]  # skips on the device: no host sync per step
    precision = MixedPrecision("32", torch.device("cpu"))
    model(torch.randn(8, 4)).square().mean().backward()
    precision.step(optimizer, torch.tensor(0.0))  # one real step, so every state tensor exists
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    model(torch.randn(8, 4)).mean().mul(float("nan")).backward()
    precision.step(optimizer, torch.tensor(1.0))
    after = (model.state_dict(), optimizer.state_dict())
    assert all(torch.equal(tensor, before[0][key]) for key, tensor in after[0].items())
    for index, state in after[1]["state"].items():  # momentum, moments and Adam's step count alike
        assert all(torch.equal(value, before[1]["state"][index][key]) for key, value in state.items())


def test_a_skipped_first_sgd_step_leaves_a_clean_momentum_buffer():
    model = torch.nn.Linear(4, 3)
    optimizer = build_optimizer(OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.0), model)
    initial = copy.deepcopy(model.state_dict())
    model(torch.randn(8, 4)).mean().mul(float("nan")).backward()
    MixedPrecision("32", torch.device("cpu")).step(optimizer, torch.tensor(1.0))
    assert all(torch.equal(tensor, initial[key]) for key, tensor in model.state_dict().items())
    buffers = [state["momentum_buffer"] for state in optimizer.state.values()]
    assert len(buffers) == 2 and all(torch.equal(buffer, torch.zeros_like(buffer)) for buffer in buffers)


def test_the_logged_lr_is_the_one_the_epochs_last_step_trained_with(tmp_path):
    # Halved after every epoch of 6 steps: epoch 1 trained at 0.1 throughout, epoch 2 at 0.05; the rate the schedule
    # holds for the next step (0.05, then 0.025) is not what the epoch used.
    schedule = ["optim.scheduler=step", "optim.step_epochs=1", "optim.gamma=0.5", "optim.lr=0.1", "trainer.epochs=2"]
    args = ["data._target_=factories.blobs", "model._target_=factories.small_net", "trainer.device=cpu"]
    assert main([*args, *schedule, "data.batch_size=16", "trainer.log_every_n_steps=6", f"output_dir={tmp_path}"]) == 0
    assert [line["lr"] for line in read_metrics(tmp_path)] == [0.1, 0.05]


def test_a_frozen_parameter_gets_no_momentum_buffer():
    # A LoRA-style frozen base never steps: its zero buffers doubled it in memory and in every checkpoint.
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    model[0].requires_grad_(False)
    optimizer = build_optimizer(OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.0), model)
    assert [id(param) for param in optimizer.state] == [id(param) for param in model[1].parameters()]
