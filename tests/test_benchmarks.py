"""Benchmarks stay runnable: the GPU one skips cleanly on a CPU machine, the checkpoint-stall one runs --quick.

benchmarks/fsdp_memory.py --quick (about 25 s: two torchrun launches) is left out, like the other multi-process
benchmarks, to keep CI under its 20 minutes.
"""

from __future__ import annotations

import types

import pytest
import torch
from conftest import REPO_DIR, run_script


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs for minutes instead of skipping")
def test_gpu_benchmark_skips_cleanly_without_cuda():
    result = run_script(REPO_DIR / "benchmarks" / "gpu_throughput.py", ["--quick"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no CUDA device" in result.stdout + result.stderr


def test_the_gpu_benchmarks_ratio_cancels_an_advantage_of_going_first(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_DIR / "benchmarks"))
    from gpu_throughput import Pair

    # Timed epoch k runs ddp-trainer first when k is even; whichever loop goes first runs 8% faster, over a drift.
    true_ratio, boost, base = 0.97, 1.08, [1000.0, 1030.0, 980.0, 1010.0, 995.0]
    hand = [rate * (boost if k % 2 else 1) for k, rate in enumerate(base)]
    ours = [rate * true_ratio * (1 if k % 2 else boost) for k, rate in enumerate(base)]
    pair = Pair(hand, ours)
    assert pair.ratio == pytest.approx(true_ratio, rel=1e-12)  # the unpaired fifth epoch is left out
    assert pair.by_order() == pytest.approx((true_ratio * boost, true_ratio / boost), rel=1e-12)
    assert Pair(hand[:1], ours[:1]).ratio == pytest.approx(true_ratio * boost, rel=1e-12)
    # Unequal gains are not cancelled: each loop's own gain shows what is left, sqrt(1.02 / 1.07) here.
    hand, ours = [1000.0 * (1.07 if k % 2 else 1) for k in range(4)], [970.0 * (1 if k % 2 else 1.02) for k in range(4)]
    assert Pair(hand, ours).first_gains() == pytest.approx((1.02, 1.07), rel=1e-12)
    assert Pair(hand, ours).ratio == pytest.approx(true_ratio * (1.02 / 1.07) ** 0.5, rel=1e-12)


def test_async_checkpoint_benchmark_prints_its_table_in_quick_mode():
    result = run_script(REPO_DIR / "benchmarks" / "async_checkpoint.py", ["--quick"], timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]  # below the header
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert [row[0] for row in rows] == ["DDP, rank-0 `torch.save` (today)", "DDP, `checkpoint.async_save=true`"] + [
        "FSDP, sharded DCP", "FSDP, sharded DCP, `checkpoint.async_save=true`"
    ]  # fmt: skip
    assert rows[0][2] == "1.00x" and all(float(row[1].replace(",", "")) > 0 for row in rows)


def test_the_step_dispatches_few_ops_beyond_the_hand_written_loop():
    # Where the host sets the pace (bf16 eager on a GPU), every op a step adds costs throughput: 21 in the second
    # GPU run's step, 10 in the third's, 6.4 in the fourth's, 3 once `stop` judged at the host sync (the task's
    # argmax and compare 2, the loss's detach 1; the fold's few ops spread over the interval), and 4 more since the
    # gradients' norm judges each step (_foreach_norm, stack, vector_norm), in one process added to the loss.
    args = ["--steps", "20", "--timed-epochs", "1"]
    result = run_script(REPO_DIR / "benchmarks" / "step_ops.py", args, timeout=180)
    assert result.returncode == 0, result.stderr
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in result.stdout.splitlines() if "|" in line}
    hand, ours, extra = (float(rows[loop][0]) for loop in ("hand-written", "ddp-trainer", "extra"))
    assert hand > 20 and extra == pytest.approx(ours - hand, abs=0.11)
    assert extra <= 8.5, result.stdout
    # The phases split each loop's host time where both call the same functions: every one fired in both loops,
    # and (one timed epoch: no medians) they add up to the whole step.
    phases = ["loader", "loss", "backward", "optimizer kernels", "zero_grad", "whole step"]
    timed = [float(cell.replace(",", "")) for phase in phases for cell in rows[phase][:2]]
    assert all(microseconds > 0 for microseconds in timed), result.stdout
    table = result.stdout[result.stdout.index("| phase of the step") :].split("\n\n")[0].splitlines()[2:]
    for column in (2, 3):
        *parts, whole = [float(line.split("|")[column].replace(",", "")) for line in table]
        assert sum(parts) == pytest.approx(whole, abs=0.1 * len(parts)), table
    # Each timed epoch on its own row, hand-written first in the first (one epoch: it is also the fastest).
    assert rows["1"][0].strip() == "hand-written", result.stdout
    fastest = [rows[loop][-1] for loop in ("hand-written", "ddp-trainer")]
    assert rows["1"][1:3] == fastest and float(rows["1"][3]) > 0, result.stdout


def test_the_gpu_benchmark_keeps_what_it_measured_when_a_cell_fails_or_a_lease_ends(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_DIR / "benchmarks"))
    import gpu_throughput

    outcomes = iter([RuntimeError("benchmark run failed (exit 1): ...\nUsageError: compile failed"), "pair"])

    def measure(model_name, mode_name, settings, folder):
        outcome = next(outcomes, gpu_throughput.Stopped())  # then SIGTERM, as `timeout` ends a lease
        if isinstance(outcome, BaseException):
            raise outcome
        return gpu_throughput.Pair([100.0, 100.0], [98.0, 98.0])

    monkeypatch.setattr(gpu_throughput, "measure", measure)
    cells = [("resnet18", "fp32"), ("resnet18", "bf16 + channels_last"), ("resnet50", "fp32")]
    pairs, left_out, failures = gpu_throughput.measure_all(gpu_throughput.Settings("cpu"), 2, None, cells)
    assert [len(pairs[cell]) for cell in cells] == [0, 1, 0]  # 6 planned, stopped at the third
    assert left_out == [f"{model}, {mode} (stopped)" for model, mode in [cells[2], *cells]]
    assert failures == ["resnet18, fp32, repeat 1: UsageError: compile failed"]


def test_the_gpu_benchmark_skips_a_process_its_budget_cannot_hold_and_runs_a_shorter_one_after_it(monkeypatch):
    # It stopped at the first process that would not fit: the cells after it (resnet18's second here) never ran.
    monkeypatch.syspath_prepend(str(REPO_DIR / "benchmarks"))
    import gpu_throughput

    now, took = [0.0], {"resnet50": 40.0, "resnet18": 10.0}

    def measure(model_name, mode_name, settings, folder):
        now[0] += took[model_name]
        return gpu_throughput.Pair([100.0, 100.0], [98.0, 98.0])

    monkeypatch.setattr(gpu_throughput, "measure", measure)
    monkeypatch.setattr(gpu_throughput, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    cells = [("resnet50", "fp32"), ("resnet18", "fp32")]
    pairs, left_out, _ = gpu_throughput.measure_all(gpu_throughput.Settings("cpu"), 2, 85.0, cells)
    assert [len(pairs[cell]) for cell in cells] == [1, 2] and now[0] == 60.0
    assert left_out == ["resnet50, fp32 (past --budget-s)"]
