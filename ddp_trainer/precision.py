"""Mixed precision: autocast for the forward pass, a GradScaler for fp16, and the unscale-clip-step order."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from ddp_trainer.errors import UsageError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """One run's `trainer.precision`: autocast on the run's device, and loss scaling when it is fp16."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.dtype = AUTOCAST_DTYPES.get(precision)
        self.device_type = device.type
        if self.dtype is not None and not torch.amp.is_autocast_available(self.device_type):
            raise UsageError(f"trainer.precision={precision} has no autocast on device {device}")
        # fp16's narrow range underflows small gradients without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None
        self.half_parameters: bool | None = None  # whether the model has float16 parameters: set at the first step

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the forward pass and the loss run in (a no-op at 32-bit precision)."""
        return contextlib.nullcontext() if self.dtype is None else torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss`, scaled first under fp16."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_and_clip(
        self, optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter], clip_norm: float, measure: bool
    ) -> torch.Tensor | None:
        """The total gradient norm (of the true gradients under fp16) when measured or clipped, clipping if asked."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # clip and measure the true gradients, not the scaled ones
        if clip_norm <= 0 and not measure:
            return None
        if self.half_parameters is None:  # parameters keep their dtypes: a scan once, not every step
            self.half_parameters = any(parameter.dtype == torch.float16 for parameter in parameters)
        grads = [p.grad for p in parameters if p.grad is not None]
        # torch's get_total_norm adds a `.to()` per tensor. A float16 norm overflows past 65504 (a model .half()'d at
        # precision 32): such a model's float16 gradients are measured in float32, one by one (DTensors take no dtype).
        norms = torch._foreach_norm(grads) if not self.half_parameters else [_wide_norm(grad) for grad in grads]
        norm = torch.linalg.vector_norm(torch.stack(norms))
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # FSDP: each rank holds a shard of the gradients; an all-reduce makes it whole
        if clip_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(parameters, clip_norm, norm)
        return norm

    def step(self, optimizer: torch.optim.Optimizer, skip: torch.Tensor | None) -> None:
        """The optimizer step, skipped where `skip` (a float32 device scalar) is 1.0; under fp16 the scaler judges.

        A fused optimizer skips on the device, reading `skip` as the GradScaler's `found_inf`: no host sync. Other
        optimizers must read it on the host, which waits for the device once per step. None: nothing to skip.
        """
        if self.scaler is not None:  # it skips a step whose gradients overflowed and lowers the scale
            self.scaler.step(optimizer)
            self.scaler.update()
        elif skip is None:
            optimizer.step()
        elif getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = skip
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        elif not bool(skip):  # host sync: an optimizer without fused kernels
            optimizer.step()

    def state_dict(self) -> dict[str, Any] | None:
        """The scaler's state (scale and growth tracker) for checkpoints; None without a scaler."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore the scaler saved by `state_dict`, so a resumed fp16 run scales exactly as before."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def _wide_norm(tensor: torch.Tensor) -> torch.Tensor:
    """The 2-norm of `tensor`, a float16 one taken in float32 (its own range ends at 65504)."""
    return torch.linalg.vector_norm(tensor.float() if tensor.dtype == torch.float16 else tensor)
