"""Tasks: what a batch means and what is measured, as a loss plus named sums that make exact global metrics.

A task turns (model, batch) into the mean loss to backpropagate and a float64 vector of sums over the batch. The
trainer adds those sums on the device, all_reduces them once per log interval and epoch, and hands the global
totals back to the task to name the metrics. Sums, not means, so every metric is exact at any world size (training
counts the samples the padded sampler repeats to even out the ranks; validation counts each once).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import default_collate

from ddp_trainer.errors import UsageError, first_line

# The trainer's own sums beside a task's: the epoch's skipped (non-finite) steps, and with clipping the (all-reduced)
# gradient norms and the steps they cover. A task may not name its sums so.
STEP_SUMS, CLIP_SUMS = ("skipped_steps",), ("grad_norm_sum", "grad_norm_steps")


class Task(Protocol):
    """The protocol a task follows; `sum_names` starts with "loss_sum" and holds "samples".

    - `sum_names`: names of the sums `forward` returns, in order. "loss_sum" (the mean loss times what it averages
      over) comes first; "samples" counts the batch's samples. A step whose mean loss (or, under DDP or clipping,
      gradient norm) is not finite stops the run or is skipped (`trainer.nonfinite_loss`); its sums are left out.
    - `forward(model, batch)`: (mean loss, float64 sums) on the batch's device, without a host sync.
    - `summarize(totals, prefix)`: metrics named `prefix/...` from global sums; `prefix/loss` and `prefix/samples`
      among them.
    - `default_monitor`: the validation metric best.pt follows unless `checkpoint.monitor` says otherwise.
    - `higher_is_better` (optional): metric names, without prefix, that improve upwards (best.pt and early
      stopping maximise them unless `checkpoint.mode` says otherwise); all others are minimised.
    - `step_outputs(model, batch)` and `sums_of(losses, outputs)` (optional, both or neither): a training step then
      keeps the mean loss and fresh device tensors of its own (`outputs`), and each host sync turns the kept steps
      into rows of sums at once: `sums_of(stacked losses, [outputs, ...])`, one row per step, each equal bit for bit
      to `forward`'s sums. Where the host sets a GPU's pace, every op a step saves counts.
    - `collate(samples)` (optional): one batch of a list of samples, where torch's `default_collate` cannot make it
      (sequences of different lengths, say); the loaders' workers call it.
    """

    sum_names: tuple[str, ...]
    default_monitor: str

    def forward(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean loss to backpropagate and this batch's sums, in the order of `sum_names`."""

    def summarize(self, totals: dict[str, float], prefix: str) -> dict[str, float | int]:
        """Named metrics from global sums."""


def inputs_and_targets(batch: Any) -> tuple[Any, torch.Tensor]:
    """(inputs, targets) of a batch given as a pair or as a dict with "inputs" and "targets"."""
    if isinstance(batch, Mapping) and "inputs" in batch and "targets" in batch:
        return batch["inputs"], batch["targets"]
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return batch[0], batch[1]
    raise UsageError(
        f"a batch must be (inputs, targets) or a dict with 'inputs' and 'targets', not {describe(batch)}; "
        "pass a task object for other layouts"
    )


def describe(batch: Any) -> str:
    """A batch, a model's output or a task's result in a few words, for an error line."""
    if torch.is_tensor(batch):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"a dict with keys {sorted(batch)}"
    if isinstance(batch, list | tuple):
        return f"a {type(batch).__name__} of {len(batch)}"
    return type(batch).__name__


def _count(reference: torch.Tensor, value: int) -> torch.Tensor:
    """A float64 device scalar holding a host count, made without a copy from the host (no sync), and only once."""
    return _device_count(reference.device, value)


@functools.lru_cache(maxsize=64)
def _device_count(device: torch.device, value: int) -> torch.Tensor:
    # Batches mostly share one size: a cached scalar saves every step a fill kernel. It is only read, never changed.
    return torch.full((), value, dtype=torch.float64, device=device)


def _counts(reference: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Float64 device counts, one per step, from cached scalars: no copy from the host, so no sync."""
    if len(set(sizes)) == 1:
        return _count(reference, sizes[0]).expand(len(sizes))
    return torch.stack([_count(reference, size) for size in sizes])


def _sum_each(steps: list[torch.Tensor]) -> torch.Tensor:
    """How many are set in each step's bool tensor, as float64: exact counts, so any summation order gives them."""
    if len(steps) == 1:  # one batch (evaluation): no stacking copy
        return steps[0].sum(dtype=torch.float64).view(1)
    if len({step.shape for step in steps}) == 1:  # a log interval of equal batches: one batched reduction
        return torch.stack(steps).flatten(1).sum(dim=1, dtype=torch.float64)
    return torch.stack([step.sum(dtype=torch.float64) for step in steps])


def _measured_now(task: Any, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    # One batch's sums through the same code as a log interval's: `forward` and the training step agree by design.
    loss, outputs = task.step_outputs(model, batch)
    return loss, task.sums_of(loss.detach().view(1), [outputs])[0]


def _model_output(task: str, model: nn.Module, inputs: Any) -> torch.Tensor:
    """`model(inputs)`, which a built-in task needs as one tensor; a tuple or dict of outputs is refused in one line."""
    outputs = model(inputs)
    if not torch.is_tensor(outputs):
        raise UsageError(
            f"{task}: the model returned {describe(outputs)}, not a tensor; pass a task object that reads it"
        )
    return outputs


def _per_sample_mean(totals: dict[str, float], name: str, count: str) -> float:
    # Nothing counted (an epoch whose every step was skipped) has no mean: a 0 would be a perfect loss, best for good.
    return totals[name] / totals[count] if totals[count] else float("nan")


class Classification:
    """Cross-entropy over class logits `model(inputs)`; reports loss and accuracy."""

    sum_names = ("loss_sum", "correct", "samples")
    default_monitor = "val/accuracy"
    higher_is_better = ("accuracy",)

    def forward(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy, and (loss x samples, correct predictions, samples)."""
        return _measured_now(self, model, batch)

    def step_outputs(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy, and which predictions were right (a fresh bool tensor: the batch may be reused)."""
        inputs, targets = inputs_and_targets(batch)
        logits = _model_output("classification", model, inputs)
        if logits.dim() != 2 or targets.shape != logits.shape[:1] or targets.is_floating_point():
            raise UsageError(  # else cross_entropy may take it and the accuracy count each position as a sample
                f"classification: the model gave {tuple(logits.shape)} for targets of {tuple(targets.shape)} "
                f"({targets.dtype}); it needs (batch, classes) logits and (batch,) integer class indices "
                "(pass a task object for other layouts)"
            )
        if targets.dtype != torch.int64:  # cross_entropy takes int64 alone; int32 labels come from NumPy arrays
            targets = targets.long()  # not always: a call dispatches an op each step even where it copies nothing
        try:
            loss = F.cross_entropy(logits, targets)
        except IndexError as error:  # raised on the CPU; on a GPU, CUDA's device-side assert stops the process
            raise UsageError(
                f"classification: a target is no class of the model's {logits.shape[1]} outputs ({first_line(error)}): "
                "labels run from 0 to model.num_classes - 1; set model.num_classes, or check the data's labels"
            ) from None
        return loss, logits.argmax(dim=1) == targets

    def sums_of(self, losses: torch.Tensor, hits: list[torch.Tensor]) -> torch.Tensor:
        """(loss x samples, correct predictions, samples) of each step, from its loss and `step_outputs`."""
        correct = _sum_each(hits)
        samples = _counts(losses, [step.shape[0] for step in hits])
        return torch.stack([losses * samples, correct, samples], dim=1)  # the float64 counts make it float64

    def summarize(self, totals: dict[str, float], prefix: str) -> dict[str, float | int]:
        """`prefix/loss`, `prefix/accuracy`, `prefix/samples`."""
        return {
            f"{prefix}/loss": _per_sample_mean(totals, "loss_sum", "samples"),
            f"{prefix}/accuracy": _per_sample_mean(totals, "correct", "samples"),
            f"{prefix}/samples": int(round(totals["samples"])),
        }


class Regression:
    """Mean squared error of `model(inputs)` against float targets of the same size; reports MSE and MAE."""

    sum_names = ("loss_sum", "abs_error_sum", "values", "samples")
    default_monitor = "val/loss"
    higher_is_better = ()

    def forward(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean squared error, and (squared error sum, absolute error sum, target values, samples)."""
        inputs, targets = inputs_and_targets(batch)
        predictions = _model_output("regression", model, inputs).float()
        if predictions.numel() != targets.numel():
            raise UsageError(
                f"regression: the model gave {tuple(predictions.shape)} for targets of {tuple(targets.shape)}"
            )
        errors = predictions.reshape(targets.shape) - targets.float()  # (B, 1) against (B,) is not a broadcast
        loss = errors.square().mean()
        values = _count(loss, targets.numel())
        sums = [loss.detach() * values, errors.detach().abs().sum(dtype=torch.float64)]
        return loss, torch.stack([*sums, values, _count(loss, targets.shape[0])])

    def summarize(self, totals: dict[str, float], prefix: str) -> dict[str, float | int]:
        """`prefix/loss` (the MSE), `prefix/mse`, `prefix/mae`, `prefix/samples`."""
        mse = _per_sample_mean(totals, "loss_sum", "values")
        return {
            f"{prefix}/loss": mse,
            f"{prefix}/mse": mse,
            f"{prefix}/mae": _per_sample_mean(totals, "abs_error_sum", "values"),
            f"{prefix}/samples": int(round(totals["samples"])),
        }


class LanguageModel:
    """Next-token cross-entropy: `model(tokens)` gives (batch, time, vocabulary) logits; reports perplexity.

    A batch is a (batch, time + 1) tensor of token ids, read as inputs [:, :-1] and targets [:, 1:], or an
    (inputs, targets) pair of (batch, time) tensors. Targets equal to -100 are not counted (padding): `collate`
    pads sequences of different lengths with them.
    """

    sum_names = ("loss_sum", "tokens", "samples")
    default_monitor = "val/loss"
    higher_is_better = ()
    ignore_index = -100

    def forward(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy per token, and (loss x tokens, tokens, sequences)."""
        return _measured_now(self, model, batch)

    def step_outputs(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy per token, and which targets count (a fresh bool tensor: the batch may be reused)."""
        batch = _alone(batch)
        inputs, targets = (batch[:, :-1], batch[:, 1:]) if torch.is_tensor(batch) else inputs_and_targets(batch)
        inputs, targets = _token_ids(inputs), targets.long()  # NumPy's uint16 ids: no embedding or loss takes them
        logits = _model_output("language_model", model, inputs)
        counted = targets != self.ignore_index
        loss_sum = F.cross_entropy(
            logits.flatten(0, -2).float(), targets.flatten(), ignore_index=self.ignore_index, reduction="sum"
        )
        # Not cross_entropy's mean: a batch of padding alone would make it 0 / 0, a NaN that stops the run.
        return loss_sum / counted.sum().clamp(min=1), counted

    def collate(self, samples: list[Any]) -> Any:
        """`default_collate`, but sequences of different lengths padded at their end: inputs with 0, targets -100."""
        pairs = [_sequence_pair(sample) for sample in samples]
        if None in pairs:
            return default_collate(samples)  # a layout of the user's: theirs to pad
        inputs, targets = ([torch.as_tensor(pair[part]) for pair in pairs] for part in (0, 1))
        targets = [sequence.long() for sequence in targets]  # -100 fits no unsigned type (NumPy ids are often uint16)
        if len({sequence.shape for sequence in inputs + targets}) == 1:
            return default_collate(samples)  # one length: the batch keeps the samples' layout
        odd = next(((x, y) for x, y in zip(inputs, targets, strict=True) if x.dim() != 1 or y.shape != x.shape), None)
        if odd is not None:  # an image and its label (task=language_model on digits): pad_sequence's C++ error
            raise UsageError(
                "task=language_model pads sequences of token ids (or pairs of them, of one length), not inputs of "
                f"shape {tuple(odd[0].shape)} with targets of shape {tuple(odd[1].shape)}"
            )
        padded = [pad_sequence(inputs, batch_first=True), pad_sequence(targets, True, self.ignore_index)]
        return tuple(padded)

    def sums_of(self, losses: torch.Tensor, counted: list[torch.Tensor]) -> torch.Tensor:
        """(loss x tokens, tokens, sequences) of each step, from its loss and `step_outputs`."""
        tokens = _sum_each(counted)
        sequences = _counts(losses, [step.shape[0] for step in counted])
        return torch.stack([losses * tokens, tokens, sequences], dim=1)

    def summarize(self, totals: dict[str, float], prefix: str) -> dict[str, float | int]:
        """`prefix/loss` (per token), `prefix/perplexity`, `prefix/samples` (sequences)."""
        if prefix == "val" and not totals["tokens"]:  # 0 / 1 would read as a perfect score, and best.pt would take it
            raise UsageError("data: every target of the validation data is -100 (ignored): no val/loss to take")
        loss = _per_sample_mean(totals, "loss_sum", "tokens")
        return {
            f"{prefix}/loss": loss,
            f"{prefix}/perplexity": math.exp(min(loss, 700.0)),  # exp overflows a float past ~709
            f"{prefix}/samples": int(round(totals["samples"])),
        }


NARROW_IDS = (torch.uint8, torch.int8, torch.int16, torch.uint16, torch.uint32, torch.uint64)


def _token_ids(inputs: Any) -> Any:
    """Integer token ids as int64 when their type is one `nn.Embedding` refuses (uint8, uint16, int16...)."""
    return inputs.long() if torch.is_tensor(inputs) and inputs.dtype in NARROW_IDS else inputs


def _alone(value: Any) -> Any:
    """The one item of a 1-tuple or list (TensorDataset(tokens) gives its samples and batches so), else `value`."""
    return value[0] if isinstance(value, list | tuple) and len(value) == 1 else value


def _sequence_pair(sample: Any) -> tuple[Any, Any] | None:
    """A language model sample as (inputs, targets): token ids (time + 1,), a pair, or a dict; None if neither."""
    sample = _alone(sample)
    if torch.is_tensor(sample) or isinstance(sample, np.ndarray):
        return sample[:-1], sample[1:]
    if isinstance(sample, Mapping) and "inputs" in sample and "targets" in sample:
        return sample["inputs"], sample["targets"]
    return tuple(sample) if isinstance(sample, list | tuple) and len(sample) == 2 else None


BUILT_IN = {"classification": Classification, "regression": Regression, "language_model": LanguageModel}


def training_measure(task: Task, accumulate: int) -> tuple[Callable[..., Any], Callable[..., torch.Tensor]]:
    """How a training step measures a micro-batch, and how a host sync turns the kept steps into rows of sums.

    A task with `step_outputs` leaves its sums to the host sync. Without it, or when a step accumulates several
    micro-batches (whose sums it adds up), each micro-batch gives its sums at once and the sync stacks them.
    """
    if accumulate == 1 and hasattr(task, "step_outputs"):
        return task.step_outputs, task.sums_of
    return task.forward, _stacked


def _stacked(losses: torch.Tensor, sums: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(sums)
