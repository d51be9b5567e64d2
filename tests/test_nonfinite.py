"""A NaN loss on any rank: the run stops without saving poison, or every rank skips that step."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import read_metrics
from dist_helpers import run_ranks

from ddp_trainer import checkpoint, metrics
from ddp_trainer.cli.train import main
from ddp_trainer.precision import MixedPrecision

BLOBS = [
    "data._target_=factories.blobs",
    "data.batch_size=8",
    "trainer.device=cpu",
    "model._target_=factories.NanAtStep",
]


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(tensor).all() for tensor in state.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_skip_flag_tells_nan_and_both_infinities_from_every_finite_value(dtype):
    info = torch.finfo(dtype)
    values = [0.0, -2.5, info.max, info.min, info.tiny, float("nan"), float("inf"), float("-inf")]
    flags = [metrics.skip_flag(value, torch.empty(())) for value in torch.tensor(values, dtype=dtype)]
    assert [flag.dtype for flag in flags] == [torch.float32] * 8  # what a fused optimizer reads as found_inf
    assert [flag.item() for flag in flags] == [0.0] * 5 + [1.0] * 3  # exactly 1.0: the fused kernels test for it


# fp16: the GradScaler would skip the poisoned step itself, and a run that judged nothing finished with exit 0, a NaN
# train/loss and its checkpoints, however often the loss was NaN.
# A finite loss with NaN gradients was judged by its loss alone in one process: the run saved NaN weights as good ones.
# Judged by the norm alone, an infinite loss with finite gradients went unseen.
POISONS = [("32", "loss"), ("fp16", "loss"), ("32", "gradient"), ("32", "infinite_loss")]


@pytest.mark.parametrize(("precision", "poisons"), POISONS)
def test_nan_loss_stops_the_run_in_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys, precision, poisons):
    # 96 samples / batch 8 = 12 steps per epoch: the NaN comes in epoch 2, after epoch 1's checkpoint.
    args = [*BLOBS, "model.nan_step=15", f"model.poisons={poisons}", "trainer.epochs=3"]
    args.append(f"trainer.precision={precision}")
    assert main([*args, f"output_dir={tmp_path}"]) == 3
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "not finite" in error and "at step 15 (epoch 2)" in error
    saved = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["step"]) == (1, 12) and all_finite(saved["model"])
    assert [line["epoch"] for line in read_metrics(tmp_path)] == [1]


@pytest.mark.parametrize(("precision", "poisons"), POISONS)
def test_steps_after_a_skip_go_on_past_the_verdict_buffer_and_keep_the_first(tmp_path, capsys, precision, poisons):
    # The step verdicts hold one log interval (2 steps here): every interval after the skip must empty them.
    args = [*BLOBS, "model.nan_step=2", f"model.poisons={poisons}", "trainer.nonfinite_loss=skip"]
    args += ["trainer.log_every_n_steps=2", "trainer.epochs=1", f"trainer.precision={precision}"]
    assert main([*args, f"output_dir={tmp_path}"]) == 0
    assert "skipped 1 optimizer step(s) by step 2, the epoch's first at step 2 (epoch 1)" in capsys.readouterr().out
    lines = read_metrics(tmp_path)
    assert [(line["step"], line["train/skipped_steps"]) for line in lines] == [(12, 1)]
    assert math.isfinite(lines[0]["train/loss"]) and lines[0]["train/samples"] == 96 - 8  # the NaN step left out


@pytest.mark.parametrize(("strategy", "precision"), [("ddp", "32"), ("fsdp", "32"), ("ddp", "fp16")])
def test_nan_loss_on_one_rank_is_skipped_by_both(tmp_path, strategy, precision):
    # Under fp16 each rank judges its own loss (the shared norm overflows as the GradScaler finds its scale): the
    # sync must share rank 1's verdict with rank 0, whose loss at step 5 was finite.
    args = [*BLOBS, "model.nan_step=5", "model.nan_rank=1", "trainer.nonfinite_loss=skip", "trainer.epochs=2"]
    args += [f"trainer.strategy={strategy}", f"trainer.precision={precision}"]
    result = run_ranks([*args, f"output_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr
    assert "skipped 1 optimizer step(s) by step 6, the epoch's first at step 5 (epoch 1)" in result.stdout
    lines = read_metrics(tmp_path)
    assert [line["train/skipped_steps"] for line in lines] == [1, 0]
    assert [line["step"] for line in lines] == [6, 12]  # 6 batches per rank per epoch: a skipped step still counts
    assert lines[0]["train/samples"] == 96 - 2 * 8  # the skipped batch of each rank is not counted
    last = tmp_path / "checkpoints" / ("last" if strategy == "fsdp" else "last.pt")  # fsdp: a sharded folder
    assert all_finite(checkpoint.load(last)["model"])


@pytest.mark.parametrize("precision", ["32", "fp16"])
def test_nan_loss_on_one_rank_stops_both_at_that_step_without_saving_it(tmp_path, precision):
    # `stop` judges at the host sync, not before each step: the gradients' norm, the same on both ranks after DDP's
    # all-reduce (under fp16, rank 1's loss, shared at the sync), makes both name the poisoned step, and the sync
    # comes before epoch 2's save.
    args = [*BLOBS, "model.nan_step=8", "model.nan_rank=1", "trainer.epochs=3", f"trainer.precision={precision}"]
    result = run_ranks([*args, f"output_dir={tmp_path}"])
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("not finite on at least one rank at step 8 (epoch 2)") == 2, result.stderr
    saved = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["step"]) == (1, 6) and all_finite(saved["model"])


def test_a_float16_gradient_norm_past_float16s_range_is_finite():
    # Measured in float16, a norm past 65504 was infinite: every step of a .half()'d model with large gradients was
    # judged not finite, though its loss and every gradient were.
    # A float64 one beside them must keep its own dtype: narrowed to float32 with them, it failed every step.
    layer, extra = torch.nn.Linear(4, 2).half(), torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    layer.weight.grad, layer.bias.grad = torch.full((2, 4), 40000.0).half(), torch.full((2,), 3.0).half()
    extra.grad = torch.full((3,), 2.0, dtype=torch.float64)
    parameters = [*layer.parameters(), extra]
    norm = MixedPrecision("32", torch.device("cpu")).unscale_and_clip(
        torch.optim.SGD(parameters), parameters, 0.0, measure=True
    )
    assert torch.isfinite(norm) and norm.item() == pytest.approx(math.sqrt(8 * 40000.0**2 + 2 * 9.0 + 3 * 4.0))
