"""FSDP2 (`fully_shard`): the model sharded per block, its state dicts for checkpoints, unsharded evaluation."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ddp_trainer.checkpoint import SafeLoadPlanner, SafeReader, dcp_cause, fitted, named_load_error, unwrapped
from ddp_trainer.config import TrainerConfig
from ddp_trainer.errors import UsageError, first_line
from ddp_trainer.precision import AUTOCAST_DTYPES

# One process reads and writes sharded checkpoints on purpose (fsdp without torchrun, evaluate): DCP need not warn.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized, assuming")


def _refuse_split_parameters(model: nn.Module, blocks: list[nn.Module], wrap: list[str]) -> None:
    """Refuse units that would share a parameter (tied embedding and output weights): FSDP fails at the first step."""
    units, owner = list(dict.fromkeys([*blocks, model])), {}  # innermost first, as they are sharded
    for unit in units:
        modules = [unit]
        for module in modules:  # the unit's own modules: nested units manage theirs
            modules += [child for child in module.children() if child not in units]
            for name, parameter in module.named_parameters(recurse=False):
                if owner.setdefault(id(parameter), unit) is not unit:
                    raise UsageError(
                        f"trainer.fsdp_wrap={wrap}: parameter {name} of {type(module).__name__} is shared with another "
                        "FSDP unit; leave one of the modules sharing it out, so that one unit holds both"
                    )


def _refuse_non_contiguous(model: nn.Module) -> None:
    """Refuse what fully_shard cannot shard, before any collective: FSDP's own error was a traceback on every rank."""
    laid_out = next((name for name, parameter in model.named_parameters() if not parameter.is_contiguous()), None)
    if laid_out is not None:
        raise UsageError(
            f"trainer.strategy=fsdp shards contiguous parameters only, and {laid_out} is not (model.channels_last=true "
            "lays convolution weights out NHWC): set model.channels_last=false"
        )


def _broadcast_from_rank_zero(model: nn.Module, device: torch.device) -> None:
    """Every rank takes rank 0's weights and buffers, as DDP's wrapper does, whether the user seeded them alike or not.

    NCCL sends device tensors only: each is staged there alone, as fully_shard moves them, and freed with this frame.
    """
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        local = tensor.detach()
        staged = local.to(device)
        dist.broadcast(staged, src=0)
        local.copy_(staged)


def shard_model(model: nn.Module, cfg: TrainerConfig, device: torch.device | None) -> list[str]:
    """Shard `model` in place per `trainer.fsdp_wrap` block, then the root, onto `device` unit by unit (None: one
    process, no shards; activation checkpointing still applies); returns the names of the block classes found."""
    shard = device is not None
    if shard:
        _refuse_non_contiguous(model)
    # FSDP's default mesh is CUDA whenever a GPU exists: trainer.device=cpu on a GPU machine needs its own.
    mesh = init_device_mesh(device.type, (dist.get_world_size(),)) if shard else None
    dtype = AUTOCAST_DTYPES.get(cfg.precision)
    # bf16 compute with fp32 gradient reduction: a sum over ranks in bf16 would lose the small contributions.
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    wrap = set(cfg.fsdp_wrap)
    # Innermost first: a block's parameters belong to the innermost unit holding them, never to its parent.
    blocks = [module for module in reversed(list(model.modules())) if type(module).__name__ in wrap]
    found = sorted({type(block).__name__ for block in blocks})  # before fully_shard renames them (FSDPLinear)
    if shard:
        _broadcast_from_rank_zero(model, device)
    if dtype is not None and shard:
        # BatchNorm keeps fp32 weights beside its fp32 running statistics (the kernel needs one dtype): each is a unit
        # that computes in fp32 and hands bf16 on.
        batchnorm = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, output_dtype=dtype)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                fully_shard(module, mesh=mesh, mp_policy=batchnorm)
    if shard:  # one process trains the whole model: no unit is split off
        _refuse_split_parameters(model, blocks, cfg.fsdp_wrap)
    for block in blocks:
        if block is model:
            continue
        if cfg.activation_checkpointing:
            checkpoint(block)  # recompute the block's activations in backward instead of keeping them
        if shard:
            fully_shard(block, mesh=mesh, mp_policy=policy)
    if shard:  # the root hands its outputs on in fp32, as autocast does: the loss and metrics are not taken in bf16
        root = dataclasses.replace(policy, output_dtype=torch.float32 if dtype else None)
        fully_shard(model, mesh=mesh, mp_policy=root)
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


def sharded_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's shards of the model and optimizer state (DTensors under FSDP), keyed by parameter name for DCP."""
    weights, optimizer_state = get_state_dict(model, optimizer)
    return {"model": weights, "optimizer": optimizer_state}


def load_shards(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Read this rank's part of a sharded checkpoint, at any world size (DCP reshards); every rank calls it."""
    tensors = sharded_state_dicts(model, optimizer)
    reader, planner = SafeReader(folder), SafeLoadPlanner()
    try:
        dcp.load(tensors, storage_reader=reader, planner=planner, no_dist=not dist.is_initialized())
    except CheckpointException as error:  # a BaseException, which the caller's handling of bad files would miss
        cause = dcp_cause(error)
        if isinstance(cause, pickle.UnpicklingError | EOFError):  # a damaged shard file, not another model's
            raise named_load_error(folder, cause) from error
        raise RuntimeError(first_line(cause)) from error
    set_state_dict(model, optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optimizer"])


def load_full_state_dicts(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
    strategy: str,
) -> None:
    """Load a checkpoint file; under FSDP (a `ddp-train consolidate` file) each rank takes its shard of it."""
    if strategy != "fsdp":
        unwrapped(model).load_state_dict(fitted(model_state, model))
        optimizer.load_state_dict(optimizer_state)
        return
    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, fitted(model_state, model), options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
