"""A user's task checked against the protocol: at start-up (names, summaries) and as it runs (what forward returns)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ddp_trainer.errors import UsageError, first_line
from ddp_trainer.tasks import BUILT_IN, CLIP_SUMS, STEP_SUMS, Task, describe


def resolve(task: str | Task) -> Task:
    """A built-in task by name, or a task object checked against the protocol; UsageError names what is wrong."""
    if isinstance(task, str):
        if task not in BUILT_IN:
            raise UsageError(f"task {task!r} is not one of {', '.join(BUILT_IN)} (or pass a task object)")
        return BUILT_IN[task]()
    if isinstance(task, type):
        raise UsageError(f"task {task.__name__} is a class; pass an instance: task={task.__name__}()")
    name = type(task).__name__
    missing = [key for key in ("sum_names", "default_monitor", "forward", "summarize") if not hasattr(task, key)]
    if missing:
        raise UsageError(f"task {name} lacks {', '.join(missing)} (see ddp_trainer.tasks.Task)")
    if hasattr(task, "step_outputs") != hasattr(task, "sums_of"):
        raise UsageError(f"task {name} must define both step_outputs and sums_of, or neither")
    upwards = getattr(task, "higher_is_better", ())
    if not isinstance(upwards, list | tuple | set | frozenset) or not all(isinstance(name, str) for name in upwards):
        # A bool (torchmetrics' spelling) fails at the first lookup; a string would match its substrings.
        raise UsageError(
            f"task {name}: higher_is_better must be a tuple of metric names (without prefix), not {upwards!r}"
        )
    names = tuple(task.sum_names)
    if not names or names[0] != "loss_sum" or "samples" not in names:
        raise UsageError(f"task {name}: sum_names must start with 'loss_sum' and hold 'samples'")
    taken = sorted(set(names) & {*STEP_SUMS, *CLIP_SUMS, "first_skipped_step"})  # the trainer's values would win
    if taken:
        raise UsageError(f"task {name}: sum_names may not use {', '.join(taken)}, which the trainer keeps itself")
    trained = _summary(task, name, names, "train")  # found now, not after the first log interval or a whole epoch
    summary = _summary(task, name, names, "val")
    if task.default_monitor not in {*trained, *summary}:  # else blamed on checkpoint.monitor, which nobody set
        raise UsageError(f"task {name}: default_monitor {task.default_monitor!r} is not among its metrics")
    unknown = [metric for metric in upwards if f"val/{metric}" not in summary]  # else silently minimised
    if unknown:
        reported = ", ".join(key.removeprefix("val/") for key in summary)
        raise UsageError(f"task {name}: higher_is_better names {', '.join(unknown)}, not among its metrics: {reported}")
    not_numbers = [key for key, value in summary.items() if not isinstance(value, int | float)]
    if not_numbers:  # a tensor, say: metrics.jsonl could not hold it, and the first epoch's line would fail
        raise UsageError(f"task {name}: summarize gave no plain number (int or float) for {', '.join(not_numbers)}")
    return _CheckedTask(task)


def _summary(task: Task, name: str, names: tuple[str, ...], prefix: str) -> dict[str, Any]:
    """summarize(sums of ones, prefix), refused unless its metrics are `prefix/...` with loss and samples among them."""
    try:
        summary = task.summarize(dict.fromkeys(names, 1.0), prefix)
    except KeyError as error:
        raise UsageError(f"task {name}: summarize(totals, {prefix!r}) reads {error}, which sum_names lacks") from None
    except Exception as error:  # its own bug, met here first: a total of 1 for every sum must give metrics
        raise UsageError(
            f"task {name}: summarize(totals, {prefix!r}) failed on totals of 1.0 each ({type(error).__name__}: "
            f"{first_line(error)})"
        ) from error
    metrics = {key.removeprefix(f"{prefix}/") for key in summary}
    if not {"loss", "samples"} <= metrics or any(not key.startswith(f"{prefix}/") for key in summary):
        raise UsageError(
            f"task {name}: summarize(totals, {prefix!r}) must name every metric '{prefix}/...', '{prefix}/loss' and "
            f"'{prefix}/samples' among them; it gave {', '.join(map(repr, summary))}"
        )
    if metrics & {"skipped_steps", "grad_norm"}:  # the trainer's own: its values would replace the task's
        raise UsageError(f"task {name}: {prefix}/skipped_steps and {prefix}/grad_norm are the trainer's own metrics")
    return summary


class _CheckedTask:
    """A user's task, its `forward` and `sums_of` results checked as they come: a wrong shape is named at once."""

    def __init__(self, task: Task) -> None:
        self.task, self.size = task, len(task.sum_names)
        # A subclass that overrides `forward` alone (of a built-in task, say) trains with it, not the parent's
        # `step_outputs`, which would compute another loss than validation's.
        self.defers = _defined_below(task, "step_outputs", "forward")

    def __getattr__(self, key: str) -> Any:
        if key == "step_outputs":
            if not self.defers or not hasattr(self.task, key):
                raise AttributeError(key)
            return self._step_outputs
        return getattr(self.task, key)

    def forward(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's own forward, refused unless it gives (a loss, a vector of one sum per `sum_names`)."""
        result = self.task.forward(model, batch)
        loss, sums = result if isinstance(result, list | tuple) and len(result) == 2 else (None, None)
        if not torch.is_tensor(sums) or sums.shape != (self.size,) or not torch.is_tensor(loss) or loss.numel() != 1:
            given = describe(result) if sums is None else f"loss {describe(loss)} and sums {describe(sums)}"
            raise UsageError(
                f"task {type(self.task).__name__}: forward must return (mean loss, a tensor of one value; a tensor of "
                f"{self.size} sums in the order of sum_names), not {given}"
            )
        self._attached(loss, "forward")
        self._on_device(sums, loss.device, "forward")
        return _scalar(loss), sums

    def _step_outputs(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
        result = self.task.step_outputs(model, batch)
        loss = result[0] if isinstance(result, list | tuple) and len(result) == 2 else None
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise UsageError(
                f"task {type(self.task).__name__}: step_outputs must return (mean loss, a tensor of one value; the "
                f"outputs sums_of reads), not {describe(result) if loss is None else f'loss {describe(loss)}'}"
            )
        self._attached(loss, "step_outputs")
        return _scalar(loss), result[1]

    def _attached(self, loss: torch.Tensor, method: str) -> None:
        if torch.is_grad_enabled() and not loss.requires_grad:  # training: backward would fail far from here
            raise UsageError(f"task {type(self.task).__name__}: {method}'s loss is detached from the model's weights")

    def sums_of(self, losses: torch.Tensor, outputs: list[Any]) -> torch.Tensor:
        """The task's own sums_of (called only if it has one), refused unless it gives a row of sums per step."""
        sums = self.task.sums_of(losses, outputs)
        if not torch.is_tensor(sums) or sums.shape != (len(outputs), self.size):
            raise UsageError(
                f"task {type(self.task).__name__}: sums_of must return a tensor of {len(outputs)} rows (one per step) "
                f"of {self.size} sums in the order of sum_names, not {describe(sums)}"
            )
        self._on_device(sums, losses.device, "sums_of")
        return sums

    def _on_device(self, sums: torch.Tensor, device: torch.device, method: str) -> None:
        # A CPU sum beside a CUDA loss (a torch.full without device=) fails only on a GPU, far from here, at the sum.
        if sums.device != device:
            raise UsageError(
                f"task {type(self.task).__name__}: {method} returned its sums on {sums.device}, not on the loss's "
                f"device {device}: create them there (device=loss.device)"
            )


def _scalar(loss: torch.Tensor) -> torch.Tensor:
    """`loss` as a 0-d tensor: one of shape (1,) resized the 0-d skip flag a fused optimizer reads as found_inf."""
    return loss if loss.dim() == 0 else loss.reshape(())


def _defined_below(task: Task, name: str, other: str) -> bool:
    """Whether the class defining `other`, or a subclass of it, defines `name`: `other` then cannot override it."""
    own = getattr(task, "__dict__", {})  # set on the object itself: below every class
    if name in own or other in own:
        return name in own
    owners = [next((cls for cls in type(task).__mro__ if key in vars(cls)), None) for key in (name, other)]
    return None not in owners and issubclass(owners[0], owners[1])
