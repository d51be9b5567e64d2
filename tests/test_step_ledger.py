"""The step ledger: each step's sums on the device, folded at host syncs exactly as one add per step would."""

from __future__ import annotations

import pytest
import torch
from conftest import read_metrics

from ddp_trainer import trainer
from ddp_trainer.cli.train import main
from ddp_trainer.metrics import MetricSums, StepLedger
from ddp_trainer.tasks import training_measure

NAN = float("nan")
CPU = torch.device("cpu")


class Plain:
    """A task without `step_outputs`: each step's sums are its outputs, and the fold stacks them."""

    def forward(self, model, batch):
        return batch[0], batch


STACKED = training_measure(Plain(), accumulate=1)[1]


def ledger_of(capacity: int, norms: bool, now: bool = True) -> StepLedger:
    return StepLedger(STACKED, 2, capacity=capacity, norms=norms, device=CPU, now=now)


def record_all(ledger: StepLedger, rows: torch.Tensor, norms: torch.Tensor | None, first_step: int = 1) -> list:
    flags = []
    for offset, row in enumerate(rows):
        norm = None if norms is None else norms[offset]
        flags.append(ledger.record(first_step + offset, row[0], row, norm, by_norm=True))  # the loss: the row's first
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
        ledger, start = ledger_of(12, norms=False), 0
        for size in splits:
            record_all(ledger, rows[start : start + size, :2], None, first_step=start + 1)
            folded.add_steps(ledger.fold(weight=1.0))
            assert ledger.settle(find=False) == 0
            start += size
        assert torch.equal(folded.sums, one_by_one.sums), splits


@pytest.mark.parametrize("weight", [1.0, 0.0])
def test_a_skipped_steps_sums_count_nowhere_and_the_first_is_found(weight):
    rows = torch.tensor([[2.0, 8.0], [NAN, 8.0], [float("inf"), 8.0], [3.0, 8.0]], dtype=torch.float64)
    unclipped = ledger_of(4, norms=False)
    flags = record_all(unclipped, rows, None, first_step=10)  # judged by the loss
    assert [flag.item() for flag in flags] == [0.0, 1.0, 1.0, 0.0]
    clipped = ledger_of(4, norms=True)
    record_all(clipped, rows, torch.tensor([1.0, NAN, float("inf"), 4.0]), first_step=10)  # judged by the norm
    # (loss_sum, samples, skipped, norm sum, norm steps): skips and norms are every rank's, counted by one (weight)
    expected = [[2, 8, 0, weight, weight], [0, 0, weight, 0, 0], [0, 0, weight, 0, 0], [3, 8, 0, 4 * weight, weight]]
    assert clipped.fold(weight).tolist() == expected
    assert clipped.settle(find=True) == 11 and clipped.settle(find=True) == 0  # the first skipped; then none recorded


@pytest.mark.parametrize("norms", [None, torch.tensor([1.0, NAN, float("inf"), 4.0])], ids=["loss", "norm"])
def test_steps_judged_at_the_sync_are_flagged_there_as_if_judged_each_step(norms):
    # trainer.nonfinite_loss=stop: no step waits for its verdict; the fold gives the same rows and the same first skip.
    rows = torch.tensor([[2.0, 8.0], [NAN, 8.0], [float("inf"), 8.0], [3.0, 8.0]], dtype=torch.float64)
    now, later = ledger_of(4, norms is not None), ledger_of(4, norms is not None, now=False)
    record_all(now, rows, norms, first_step=10)
    assert record_all(later, rows, norms, first_step=10) == [None] * 4
    assert later.flags.tolist() == [0.0] * 4  # nothing judged yet
    assert later.fold(1.0).tolist() == now.fold(1.0).tolist()
    assert later.flags.tolist() == [0.0, 1.0, 1.0, 0.0] and later.settle(find=True) == 11


def test_under_fp16_only_the_loss_is_judged_and_only_finite_norms_are_averaged():
    # The GradScaler skips the steps whose gradients overflowed, routine as it finds its scale: they count, and their
    # norms stay out of the mean. A loss that is not finite is a poisoned step, as at 32 bits.
    ledger = ledger_of(3, norms=True)
    rows = torch.tensor([[1.0, 4.0], [2.0, 4.0], [NAN, 4.0]], dtype=torch.float64)
    norms = torch.tensor([2.0, float("inf"), NAN])
    flags = [ledger.record(step, rows[step, 0], rows[step], norms[step], by_norm=False) for step in range(3)]
    assert [flag.item() for flag in flags] == [0.0, 0.0, 1.0]
    assert ledger.fold(1.0).tolist() == [[1, 4, 0, 2, 1], [2, 4, 0, 0, 0], [0, 0, 1, 0, 0]]


@pytest.mark.parametrize("now", [True, False], ids=["judged-each-step", "judged-at-the-sync"])
def test_a_step_that_trained_nothing_here_adds_a_zero_row_and_is_not_skipped(now):
    # A rank whose user stream ran dry joins steps without data: nothing to measure or judge, even in a slot whose
    # flag an earlier interval's skipped step left at 1.0.
    ledger = ledger_of(2, norms=False, now=now)
    record_all(ledger, torch.tensor([[1.0, 2.0], [NAN, 2.0]], dtype=torch.float64), None)
    assert ledger.fold(1.0).tolist()[0] == [1, 2, 0] and ledger.settle(find=True) == 2
    ledger.record(3, torch.tensor(5.0), torch.tensor([5.0, 1.0], dtype=torch.float64), None, by_norm=True)
    ledger.record(4, None, None, None, by_norm=True)
    assert ledger.fold(0.0).tolist() == [[5, 1, 0], [0, 0, 0]]
    assert ledger.flags.tolist() == [0.0, 0.0] and ledger.settle(find=True) == 0


def test_a_ledger_far_larger_than_the_steps_it_holds_costs_only_those_steps():
    rows = torch.tensor([[2.0, 8.0], [NAN, 8.0], [3.0, 8.0]], dtype=torch.float64)
    ledger = ledger_of(10**7, norms=False)  # one view per slot made up front took 0.6 KB each: 6 GB here
    assert [flag.item() for flag in record_all(ledger, rows, None)] == [0.0, 1.0, 0.0]
    assert len(ledger.places) == 3
    assert ledger.fold(weight=1.0)[:, 2].tolist() == [0.0, 1.0, 0.0]  # the skipped column


def test_a_log_interval_longer_than_an_epoch_sizes_the_ledger_by_the_epoch(tmp_path, monkeypatch):
    capacities = []

    class Recording(StepLedger):
        def __init__(self, rows_of, width, capacity, *args) -> None:
            capacities.append(capacity)
            super().__init__(rows_of, width, capacity, *args)

    monkeypatch.setattr(trainer, "StepLedger", Recording)
    args = ["--config", "configs/digits_mlp.yaml", "trainer.device=cpu", "trainer.epochs=2", f"output_dir={tmp_path}"]
    assert main([*args, "trainer.log_every_n_steps=10000000"]) == 0
    assert capacities == [45]  # 1438 samples in batches of 32: a sync at each epoch's end, 45 steps apart
    assert [line["train/samples"] for line in read_metrics(tmp_path)] == [1438, 1438]


def test_integer_sums_fold_exactly_beyond_float32s_integers():
    # A task's pixel counts, (pred == mask).sum(), are int64: folded through float32 they lost their last units.
    ledger = StepLedger(lambda losses, outputs: torch.stack(outputs), 2, capacity=2, norms=False, device=CPU)
    for step, count in enumerate([16_777_217, 33_554_433]):
        ledger.record(step, torch.tensor(1.0), torch.tensor([count, 1]), None, by_norm=False)
    assert ledger.fold(1.0)[:, :2].tolist() == [[16_777_217, 1], [33_554_433, 1]]
