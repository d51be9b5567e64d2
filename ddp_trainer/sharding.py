"""FSDP2 (`fully_shard`): the model sharded per block, its full state dicts for checkpoints, unsharded evaluation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ddp_trainer.checkpoint import clean_state_dict
from ddp_trainer.config import TrainerConfig
from ddp_trainer.precision import AUTOCAST_DTYPES


def shard_model(model: nn.Module, cfg: TrainerConfig, shard: bool) -> list[str]:
    """Shard `model` in place (if `shard`): each `trainer.fsdp_wrap` block, then the root; returns the block classes."""
    dtype = AUTOCAST_DTYPES.get(cfg.precision)
    # bf16 compute with fp32 gradient reduction: a sum over ranks in bf16 would lose the small contributions.
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    wrap = set(cfg.fsdp_wrap)
    # Innermost first: a block's parameters belong to the innermost unit holding them, never to its parent.
    blocks = [module for module in reversed(list(model.modules())) if type(module).__name__ in wrap]
    found = sorted({type(block).__name__ for block in blocks})  # before fully_shard renames them (FSDPLinear)
    if dtype is not None and shard:
        # BatchNorm keeps fp32 weights beside its fp32 running statistics (the kernel needs one dtype): each is a unit
        # that computes in fp32 and hands bf16 on.
        batchnorm = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, output_dtype=dtype)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                fully_shard(module, mp_policy=batchnorm)
    for block in blocks:
        if block is model:
            continue
        if cfg.activation_checkpointing:
            checkpoint(block)  # recompute the block's activations in backward instead of keeping them
        if shard:
            fully_shard(block, mp_policy=policy)
    if shard:
        fully_shard(model, mp_policy=policy)
    return found


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Where a micro-batch's backward runs: its gradients stay local unless `sync` (DDP's no_sync, FSDP2's switch)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)  # holds until the next micro-batch sets it
    elif isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Every FSDP unit gathered while the block runs: forward passes then run no collective (uneven evaluation)."""
    if not isinstance(model, FSDPModule):
        yield
        return
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    model.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # fully_shard's default: the root's backward needs it


FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The unsharded model and optimizer state dicts that checkpoints hold; under FSDP a collective, rank 0 gets them.

    Under `fsdp` the optimizer's state is keyed by parameter name (torch.distributed.checkpoint's form), also in one
    process, so that a resume at another world size reads it; under `ddp` by index (`optimizer.state_dict()`).
    """
    if strategy != "fsdp":
        return clean_state_dict(model.state_dict()), optimizer.state_dict()
    model_state = get_model_state_dict(model, options=FULL_ON_CPU)
    return model_state, get_optimizer_state_dict(model, optimizer, options=FULL_ON_CPU)


def load_full_state_dicts(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
    strategy: str,
) -> None:
    """Load what `full_state_dicts` saved; every rank read the whole file and takes its own shard of it."""
    if strategy != "fsdp":
        model.load_state_dict(clean_state_dict(model_state))
        optimizer.load_state_dict(optimizer_state)
        return
    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, clean_state_dict(model_state), options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
