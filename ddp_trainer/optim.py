"""Optimizers and learning-rate schedules (linear warmup, then constant, cosine or step decay)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from ddp_trainer.config import Config, OptimConfig
from ddp_trainer.errors import UsageError


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by `optim.name` over the model's parameters, fused where the device has the kernels."""
    params = list(model.parameters())
    if not any(param.requires_grad for param in params):  # torch's own errors came from the optimizer or backward
        raise UsageError(
            f"the model ({type(model).__name__}) has no parameter to train: none, or all with requires_grad=False"
        )
    # A fused step skips a poisoned update on the device (found_inf): no host sync (see MixedPrecision.step).
    devices = _get_fused_kernels_supported_devices()
    fused = all(param.device.type in devices and param.is_floating_point() for param in params) or None
    options = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "fused": fused}
    if cfg.name in ("adam", "adamw"):
        return {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.name](params, **options)
    if any(isinstance(param, DTensor) for param in params):
        fused = options["fused"] = None  # FSDP's DTensors have fused Adam kernels (torch 2.14), not fused SGD
    optimizer = torch.optim.SGD(params, momentum=cfg.momentum, **options)
    if fused and cfg.momentum > 0:
        # A skipped first fused step would leave its new momentum buffers uninitialised (empty_like); zeros
        # make the first update the same (buffer = gradient, no dampening) and survive a skip.
        for param in params:
            if param.requires_grad:  # a frozen base (LoRA, say) never steps: a buffer would double it in every file
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
    return optimizer


def lr_multiplier(
    cfg: OptimConfig, steps_per_epoch: int | None, total_steps: int | None, offset: int = 0
) -> Callable[[int], float]:
    """LR factor per optimizer step: linear warmup, then the configured decay down to `min_lr`; epochs (of the step
    schedule) start `offset` steps later than `steps_per_epoch` would place them (see `relay_schedule`)."""
    needs = {"cosine": total_steps, "step": steps_per_epoch}
    if needs.get(cfg.scheduler, 0) is None:
        remedy = {"cosine": "set trainer.max_steps", "step": "use optim.scheduler=none, or cosine + trainer.max_steps"}
        raise UsageError(
            f"optim.scheduler={cfg.scheduler} needs the run's length, and the training stream has none: "
            + remedy[cfg.scheduler]
        )
    if cfg.scheduler != "none" and cfg.min_lr > cfg.lr:  # a floor above the peak: the "decay" would climb to it
        raise UsageError(
            f"config key 'optim.min_lr' has invalid value {cfg.min_lr!r}: expected at most optim.lr ({cfg.lr:g}), "
            f"the rate optim.scheduler={cfg.scheduler} decays from"
        )
    decay_steps = max((total_steps or 0) - cfg.warmup_steps, 1)
    floor = cfg.min_lr / cfg.lr

    # A plain function: LambdaLR saves a callable object's fields, which weights_only=True may refuse to load.
    def multiplier(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.scheduler == "cosine":
            progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.scheduler == "step":
            return max(cfg.gamma ** ((step - offset) // (cfg.step_epochs * steps_per_epoch)), floor)
        return 1.0

    return multiplier


def schedule_length(cfg: Config, batches_per_epoch: int | None) -> tuple[int | None, int | None]:
    """(optimizer steps per epoch, in the whole run): None where a stream of unknown length leaves it open."""
    trainer = cfg.trainer
    if batches_per_epoch is None:
        return None, trainer.max_steps if trainer.max_steps > 0 else None
    steps_per_epoch = math.ceil(batches_per_epoch / trainer.accumulate_grad_batches)
    return steps_per_epoch, _run_steps(cfg, steps_per_epoch)


def _run_steps(cfg: Config, steps_per_epoch: int, offset: int = 0) -> int:
    # `offset`: steps the run took beyond what its epochs so far take at this world size (see relay_schedule).
    max_steps = cfg.trainer.max_steps if cfg.trainer.max_steps > 0 else math.inf
    return min(max_steps, offset + cfg.trainer.epochs * steps_per_epoch)


def relay_schedule(scheduler: LambdaLR, cfg: Config, steps_per_epoch: int, offset: int) -> None:
    """Lay a restored schedule over a run whose steps so far were taken at another world size, from its step on.

    Epochs at another global batch took another number of steps: the schedule's length is the steps taken (`offset`
    more than their whole epochs take at this size) and those of the epochs left, the current one counted whole.
    """
    multiplier = lr_multiplier(cfg.optim, steps_per_epoch, _run_steps(cfg, steps_per_epoch, offset), offset)
    scheduler.lr_lambdas = [multiplier] * len(scheduler.lr_lambdas)
    set_current_lrs(scheduler)


def set_current_lrs(scheduler: LambdaLR) -> None:
    """Give each parameter group the lr its schedule holds for the current step, after the schedule was changed."""
    groups = scheduler.optimizer.param_groups
    for group, base_lr, multiplier in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base_lr * multiplier(scheduler.last_epoch)


class StepwiseLambdaLR(LambdaLR):
    """LambdaLR stepped once per optimizer step by a loop that keeps the order: the same lrs and state, less Python.

    torch's scheduler wraps `optimizer.step` to warn when the two are called out of order, and passes each of its own
    steps through warning and context-manager machinery: tens of µs a step, which count where the host sets a GPU's
    pace. The trainer always steps the optimizer first, so this scheduler leaves both out.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr_lambda: Callable[[int], float]) -> None:
        super().__init__(optimizer, lr_lambda)
        if getattr(optimizer.step, "_wrapped_by_lr_sched", False):
            del optimizer.step  # the order-checking wrapper torch set on the instance: the class's step again

    def step(self, epoch: None = None) -> None:
        """One optimizer step on: each group's lr is its base lr times its multiplier at the new step count."""
        self._step_count += 1
        self.last_epoch += 1
        lambdas = zip(self.lr_lambdas, self.base_lrs, strict=True)
        self._last_lr = [base_lr * multiplier(self.last_epoch) for multiplier, base_lr in lambdas]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr


def build_scheduler(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int | None, total_steps: int | None
) -> LambdaLR:
    """A LambdaLR stepped once per optimizer step; its state (the step count) goes into checkpoints."""
    return StepwiseLambdaLR(optimizer, lr_multiplier(cfg, steps_per_epoch, total_steps))
