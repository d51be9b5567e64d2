"""The step ledger: each step's sums on the device, folded at host syncs exactly as one add per step would."""

from __future__ import annotations

import pytest
import torch

from ddp_trainer.metrics import MetricSums, StepLedger

NAN = float("nan")


def record_all(ledger: StepLedger, rows: torch.Tensor, norms: torch.Tensor | None, first_step: int = 1) -> list:
    flags = []
    for offset, row in enumerate(rows):
        norm = None if norms is None else norms[offset]
        flags.append(ledger.record(first_step + offset, row, norm, judge=True))
    return flags


def test_folds_at_any_steps_give_the_sums_of_one_add_per_step_bit_for_bit():
    # Random float64 values: their sum depends on the order of the adds, so only the same order gives equal bits.
    rows = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e6
    one_by_one = MetricSums(("loss_sum", "samples", "skipped_steps"), torch.device("cpu"))
    for row in rows:
        one_by_one.add(torch.cat([row[:2], row.new_zeros(1)]))
    assert not torch.equal(rows.sum(0), rows.cumsum(0)[-1])  # a tree sum would differ: the test can fail
    for splits in ([12], [5, 7], [1, 4, 4, 3]):
        folded = MetricSums(("loss_sum", "samples", "skipped_steps"), torch.device("cpu"))
        ledger, start = StepLedger(2, capacity=12, norms=False, device=torch.device("cpu")), 0
        for size in splits:
            record_all(ledger, rows[start : start + size, :2], None, first_step=start + 1)
            folded.add_steps(ledger.fold(weight=1.0))
            assert ledger.settle(find=False) == 0
            start += size
        assert torch.equal(folded.sums, one_by_one.sums), splits


@pytest.mark.parametrize("weight", [1.0, 0.0])
def test_a_skipped_steps_sums_count_nowhere_and_the_first_is_found(weight):
    rows = torch.tensor([[2.0, 8.0], [NAN, 8.0], [float("inf"), 8.0], [3.0, 8.0]], dtype=torch.float64)
    unclipped = StepLedger(2, capacity=4, norms=False, device=torch.device("cpu"))
    flags = record_all(unclipped, rows, None, first_step=10)  # judged by loss_sum, the row's first value
    assert [flag.item() for flag in flags] == [0.0, 1.0, 1.0, 0.0]
    clipped = StepLedger(2, capacity=4, norms=True, device=torch.device("cpu"))
    record_all(clipped, rows, torch.tensor([1.0, NAN, float("inf"), 4.0]), first_step=10)  # judged by the norm
    # (loss_sum, samples, skipped, norm sum, norm steps): skips and norms are every rank's, counted by one (weight)
    expected = [[2, 8, 0, weight, weight], [0, 0, weight, 0, 0], [0, 0, weight, 0, 0], [3, 8, 0, 4 * weight, weight]]
    assert clipped.fold(weight).tolist() == expected
    assert clipped.settle(find=True) == 11 and clipped.settle(find=True) == 0  # the first skipped; then none recorded


def test_unjudged_steps_fp16s_all_count_and_only_finite_norms_are_averaged():
    # Under fp16 the GradScaler skips overflowed steps and the trainer does not judge: no flag, every sum counts.
    ledger = StepLedger(2, capacity=3, norms=True, device=torch.device("cpu"))
    rows = torch.tensor([[1.0, 4.0], [2.0, 4.0], [3.0, 4.0]], dtype=torch.float64)
    norms = torch.tensor([2.0, NAN, 5.0])
    flags = [ledger.record(step, rows[step], norms[step], judge=False) for step in range(3)]
    assert flags == [None] * 3
    assert ledger.fold(1.0).tolist() == [[1, 4, 0, 2, 1], [2, 4, 0, 0, 0], [3, 4, 0, 5, 1]]
