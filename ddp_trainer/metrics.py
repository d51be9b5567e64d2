"""Exact global metrics: per-rank sums kept on the device, one all_reduce and one host sync per synchronisation."""

from __future__ import annotations

import torch

from ddp_trainer.distributed import DistEnv, all_reduce_sum


class MetricSums:
    """Named running sums on the device: adding them never waits for the device, reading them does (once)."""

    def __init__(self, names: tuple[str, ...], device: torch.device) -> None:
        self.names = names
        self.sums = torch.zeros(len(names), dtype=torch.float64, device=device)

    def add(self, values: torch.Tensor) -> None:
        """Add float64 device values in the order of `names`."""
        self.sums += values

    def add_global(self, totals: dict[str, float], env: DistEnv) -> None:
        """Seed the sums with already-global totals (from a checkpoint): rank 0 holds them so the sum stays exact."""
        if env.is_main:
            # .get: a run resumed with other settings (clipping switched on) starts the sums it did not keep at 0.
            stored = [totals.get(name, 0.0) for name in self.names]
            self.sums += torch.tensor(stored, dtype=torch.float64).to(self.sums.device)

    def reduce(self, env: DistEnv) -> dict[str, float]:
        """Global totals over all ranks: one all_reduce and one host sync."""
        totals = all_reduce_sum(self.sums.clone(), env)
        return dict(zip(self.names, totals.tolist(), strict=True))  # host sync: only at log intervals and saves


def all_finite(value: torch.Tensor) -> torch.Tensor:
    """Whether a device scalar is finite, without a host sync: x - x is 0, except NaN for NaN and ±inf."""
    return (value - value) == 0  # two kernels; torch.isfinite takes four


class StepVerdicts:
    """Each step's finite-or-not verdict since the last host sync, on the device; read only once a skip is known."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.finite = torch.ones(capacity, dtype=torch.bool, device=device)
        self.steps: list[int] = []

    def record(self, step: int, finite: torch.Tensor) -> None:
        """Keep step `step`'s verdict (one device copy, no wait)."""
        self.finite[len(self.steps)] = finite
        self.steps.append(step)

    def settle(self, find: bool) -> int:
        """Forget the recorded steps, as every host sync must; with `find`, first the first not finite (a host sync)."""
        steps, self.steps = self.steps, []
        if not find:
            return 0
        verdicts = self.finite[: len(steps)].tolist()
        return next((step for step, finite in zip(steps, verdicts, strict=True) if not finite), 0)
