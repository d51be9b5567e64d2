"""Exact global metrics: per-rank sums on device and counts in Python, one all_reduce per synchronisation."""

from __future__ import annotations

import torch

from ddp_trainer.distributed import DistEnv, all_reduce_sum

# Device sums of a classification batch, in the order `batch_sums` returns them; the sample count is a Python int.
SUM_NAMES = ("loss_sum", "correct")
COUNT_NAMES = ("samples",)


class MetricSums:
    """Running sums kept on device (added without host syncs) and integer counts kept in Python."""

    def __init__(self, names: tuple[str, ...], counts: tuple[str, ...], device: torch.device) -> None:
        self.names, self.count_names = names, counts
        self.sums = torch.zeros(len(names), dtype=torch.float64, device=device)
        self.counts = dict.fromkeys(counts, 0)

    def add(self, values: torch.Tensor, **counts: int) -> None:
        """Add device values in the order of `names` (float64, as `batch_sums` makes them) and counts by name."""
        self.sums += values
        for name, amount in counts.items():
            self.counts[name] += amount

    def add_global(self, totals: dict[str, float], env: DistEnv) -> None:
        """Seed the sums with already-global totals (from a checkpoint): rank 0 holds them so the sum stays exact."""
        if env.is_main:
            # .get: a run resumed with other settings (clipping switched on) starts the sums it did not keep at 0.
            stored = [totals.get(name, 0.0) for name in self.names]
            self.sums += torch.tensor(stored, dtype=torch.float64, device=self.sums.device)
            for name in self.count_names:
                self.counts[name] += int(totals.get(name, 0))

    def reduce(self, env: DistEnv) -> dict[str, float]:
        """Global totals over all ranks: one all_reduce of sums and counts together, one host sync."""
        counts = torch.tensor([self.counts[name] for name in self.count_names], dtype=torch.float64)
        totals = all_reduce_sum(torch.cat([self.sums, counts.to(self.sums.device)]), env)
        return dict(zip(self.names + self.count_names, totals.tolist(), strict=True))  # .tolist() waits: do it rarely


def batch_sums(logits: torch.Tensor, targets: torch.Tensor, mean_loss: torch.Tensor) -> torch.Tensor:
    """(loss x samples, correct predictions) of one batch as float64, on the batch's device."""
    correct = (logits.argmax(dim=1) == targets).sum(dtype=torch.float64)
    return torch.stack([mean_loss.detach().double() * targets.shape[0], correct])


def summarize(totals: dict[str, float], prefix: str) -> dict[str, float | int]:
    """Turn global sums into `prefix/loss`, `prefix/accuracy` and `prefix/samples`."""
    samples = totals["samples"]
    return {
        f"{prefix}/loss": totals["loss_sum"] / max(samples, 1.0),
        f"{prefix}/accuracy": totals["correct"] / max(samples, 1.0),
        f"{prefix}/samples": int(round(samples)),
    }
