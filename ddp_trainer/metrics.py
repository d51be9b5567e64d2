"""Exact global metrics: per-rank sums kept on the device, summed over ranks with one host sync per synchronisation
(one all_reduce, and one more of the skip flags where fp16's scaler may skip steps)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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

    def add_steps(self, steps: torch.Tensor) -> None:
        """Add a (steps, names) float64 matrix row by row, in order, as one add per step would: bit for bit alike."""
        # cumsum adds along the rows one after another (on the GPU too: one sequential scan per column), so a fold at
        # other steps (a resumed run's save, say) sums in the same order and the totals stay identical.
        self.sums = torch.cat([self.sums.view(1, -1), steps]).cumsum(0)[-1]

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


def skip_flag(value: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write 1.0 into `out` where the device tensor `value` is NaN or ±inf, else 0.0, without a host sync."""
    torch.sub(value, value, out=out)  # 0 for every finite value, NaN for NaN and ±inf
    return out.nan_to_num_(nan=1.0)  # two kernels, and a float: what a fused optimizer reads as found_inf


class StepLedger:
    """Each optimizer step's loss, outputs, skip flag and gradient norm since the last host sync, kept on the device.

    A step keeps references and, judged `now`, writes its flag in two ops, never waiting. The host sync turns the kept
    steps into rows of sums (`rows_of(stacked losses, outputs)`), leaving out skipped steps for all the rows at once,
    and reads the flags only to find an epoch's first skipped step. A ledger that does not judge `now` flags the judged
    steps at the sync, all at once: only an optimizer that must skip a poisoned step needs its flag before it steps.
    """

    def __init__(
        self,
        rows_of: Callable[[torch.Tensor, list[Any]], torch.Tensor],
        width: int,
        capacity: int,
        norms: bool,
        device: torch.device,
        now: bool = True,
        share_with: DistEnv | None = None,
        alone: bool = False,
    ) -> None:
        self.rows_of, self.width, self.device, self.now = rows_of, width, device, now
        self.share_with = share_with  # where each rank judges only its own loss: the ranks whose verdicts fold joins
        # One process judges its loss with the norm (an infinite loss can have finite gradients); ranks judge only the
        # norm, which they share: a rank's own loss would part their verdicts, and `skip` has no collective to join.
        self.alone = alone
        self.flags = torch.zeros(capacity, dtype=torch.float32, device=device)  # 0.0 unless written: never skipped
        # Views made once, as steps first reach them: indexing the flags every step would cost an op each time.
        self.places: list[torch.Tensor] = []
        self.measures_norms = norms
        self.steps: list[int] = []
        self.losses: list[torch.Tensor | None] = []
        self.outputs: list[Any] = []
        self.norms: list[torch.Tensor] = []
        self.judged: list[torch.Tensor | None] = []  # what the sync judges, when the steps are not judged `now`

    def record(
        self, step: int, loss: torch.Tensor | None, outputs: Any, norm: torch.Tensor | None, by_norm: bool
    ) -> torch.Tensor | None:
        """Keep step `step`'s detached mean loss and outputs (None: no micro-batch of it trained here), and its norm
        when measured; flag the step skipped if its norm (`by_norm` and measured; else, or also `alone`, its loss) is
        not finite: judged `now`, the flag, a float32 device scalar (1.0: skip), is returned; otherwise the next fold
        flags it."""
        self.steps.append(step)
        self.losses.append(loss)
        self.outputs.append(outputs)
        if self.measures_norms:
            self.norms.append(norm)
        judged = loss if not by_norm or norm is None else norm + loss if self.alone and loss is not None else norm
        if not self.now:
            self.judged.append(judged)
            return None
        flag = self._place(len(self.steps) - 1)
        return flag.zero_() if judged is None else skip_flag(judged, flag)  # nothing trained: nothing to judge

    def fold(self, weight: float) -> torch.Tensor | None:
        """The recorded steps as rows of (sums, skipped, [norm sum, norm steps]); sums of skipped steps zeroed.

        Skips and norms are the same on every rank: `weight` (1 on rank 0, else 0) counts them once globally.
        """
        count = len(self.steps)
        if not count:
            return None
        if self.judged:
            self._flag_judged()
        if self.share_with is not None:  # a step any rank flagged is skipped on every rank, and counted once
            all_reduce_sum(self.flags[:count], self.share_with).clamp_(max=1.0)
        kept = (self.flags[:count] == 0).view(-1, 1)
        rows = self._rows()
        # float64 first: where() would round a task's integer sums (pixel counts) through float32 beyond 2**24.
        rows = rows if rows.dtype == torch.float64 else rows.double()  # no op where they are: every op counts
        columns = [torch.where(kept, rows, 0.0), torch.where(kept, 0.0, weight)]
        if self.measures_norms:  # fp16's overflowed norms stay out of the mean
            norms = torch.stack(self.norms).view(-1, 1)
            measured = torch.isfinite(norms)
            columns += [torch.where(measured, norms * weight, 0.0), measured * weight]
        return torch.cat(columns, dim=1)

    def _flag_judged(self) -> None:
        if all(value is not None for value in self.judged):  # a few ops for the whole interval
            skip_flag(torch.stack(self.judged).view(-1), self.flags[: len(self.judged)])
            return
        for index, value in enumerate(self.judged):
            flag = self._place(index)
            if value is None:  # nothing trained here: nothing to judge, whatever an earlier interval left in the slot
                flag.zero_()
            else:
                skip_flag(value, flag)

    def _place(self, index: int) -> torch.Tensor:
        """The flag of the interval's `index`-th step: a view of the flags, made the first time a step reaches it."""
        while len(self.places) <= index:
            self.places.append(self.flags[len(self.places)])
        return self.places[index]

    def _rows(self) -> torch.Tensor:
        if all(loss is not None for loss in self.losses):  # not `None in`: that compares tensors with None
            return self.rows_of(torch.stack(self.losses), self.outputs)
        # A rank without data for some steps (a user stream ran dry): those steps' rows are zeros.
        none = torch.zeros(self.width, dtype=torch.float64, device=self.device)
        rows = [
            none if loss is None else self.rows_of(loss.view(1), [out])[0]
            for loss, out in zip(self.losses, self.outputs, strict=True)
        ]
        return torch.stack(rows)

    def settle(self, find: bool) -> int:
        """Forget the recorded steps, as every host sync must; with `find`, first the first skipped (a host sync)."""
        steps, self.steps = self.steps, []
        self.losses, self.outputs, self.norms, self.judged = [], [], [], []
        if not find:
            return 0
        flags = self.flags[: len(steps)].tolist()
        return next((step for step, flag in zip(steps, flags, strict=True) if flag), 0)
