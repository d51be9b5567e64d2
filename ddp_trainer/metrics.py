"""Exact global metrics: per-rank sums and counts on device, one all_reduce per synchronisation."""

from __future__ import annotations

import torch

from ddp_trainer.distributed import DistEnv, all_reduce_sum

SUM_NAMES = ("loss_sum", "correct", "samples")


class MetricSums:
    """Running sums (loss x samples, correct predictions, samples) kept on device without host syncs."""

    def __init__(self, names: tuple[str, ...], device: torch.device) -> None:
        self.names = names
        self.sums = torch.zeros(len(names), dtype=torch.float64, device=device)

    def add(self, values: torch.Tensor) -> None:
        """Add one batch's contributions, given in the order of `names`."""
        self.sums += values.detach().to(torch.float64)

    def add_global(self, totals: dict[str, float], env: DistEnv) -> None:
        """Seed the sums with already-global totals (from a checkpoint): rank 0 holds them so the sum stays exact."""
        if env.is_main:
            self.sums += torch.tensor(
                [totals[name] for name in self.names], dtype=torch.float64, device=self.sums.device
            )

    def reduce(self, env: DistEnv) -> dict[str, float]:
        """Global totals over all ranks: one all_reduce of a copy, one host sync."""
        totals = all_reduce_sum(self.sums.clone(), env)
        return dict(zip(self.names, totals.tolist(), strict=True))  # .tolist() waits for the device: do it rarely


def batch_sums(logits: torch.Tensor, targets: torch.Tensor, mean_loss: torch.Tensor) -> torch.Tensor:
    """(loss x samples, correct, samples) for one batch, on the batch's device."""
    samples = targets.new_tensor(targets.shape[0], dtype=torch.float64)
    correct = (logits.argmax(dim=1) == targets).sum().to(torch.float64)
    return torch.stack([mean_loss.detach().to(torch.float64) * samples, correct, samples])


def summarize(totals: dict[str, float], prefix: str) -> dict[str, float | int]:
    """Turn global sums into `prefix/loss`, `prefix/accuracy` and `prefix/samples`."""
    samples = totals["samples"]
    return {
        f"{prefix}/loss": totals["loss_sum"] / max(samples, 1.0),
        f"{prefix}/accuracy": totals["correct"] / max(samples, 1.0),
        f"{prefix}/samples": int(round(samples)),
    }
