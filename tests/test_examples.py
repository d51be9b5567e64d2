"""The examples run as users run them, with `python` and `torchrun`, and agree across world sizes and strategies."""

from __future__ import annotations

import re

import pytest
from conftest import REPO_DIR, read_metrics, run_script

# Plain SGD: 1 rank with batch 2B and 2 ranks with batch B then take the same steps, so the metrics must agree.
SAME_STEPS = ["trainer.device=cpu", "optim.name=sgd", "optim.momentum=0", "optim.weight_decay=0", "trainer.epochs=1"]


@pytest.mark.parametrize(
    ("example", "metrics"),
    [
        ("regression_diabetes.py", ["val/loss", "val/mse", "val/mae", "train/loss"]),
        ("char_language_model.py", ["val/loss", "val/perplexity", "train/loss"]),
    ],
)
def test_example_gives_the_same_metrics_on_one_and_two_ranks(tmp_path, example, metrics):
    script = REPO_DIR / "examples" / example
    one = run_script(script, [*SAME_STEPS, "optim.lr=0.05", "data.batch_size=32", f"output_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr
    # The 2 ranks shard the model with FSDP: the task's metrics must not depend on the strategy either.
    args = [*SAME_STEPS, "optim.lr=0.05", "data.batch_size=16", "trainer.strategy=fsdp"]
    two = run_script(script, [*args, f"output_dir={tmp_path / 'two'}"], nproc=2)
    assert two.returncode == 0, two.stderr
    single, double = read_metrics(tmp_path / "one")[-1], read_metrics(tmp_path / "two")[-1]
    assert (single["world_size"], double["world_size"]) == (1, 2)
    for key in ("train/samples", "val/samples", "step"):
        assert single[key] == double[key], key
    for key in metrics:
        assert double[key] == pytest.approx(single[key], rel=1e-4), key
    # Both ranks write to one pipe, so one rank's line may land inside the other's: match records, not lines.
    printed = re.findall(r"val/\S+ [\d.]+ (?:\S+ [\d.]+ )*after epoch \d+", two.stdout)
    assert len(printed) == 2 and printed[0] == printed[1], two.stdout  # fit() returned the same record on both ranks


@pytest.mark.parametrize("example", ["regression_diabetes.py", "char_language_model.py", "digits_stream.py"])
def test_example_given_a_mistyped_key_ends_in_one_line_with_the_clis_exit_code(tmp_path, example):
    # It ended in fit()'s 20-line traceback and exit code 1.
    run = run_script(REPO_DIR / "examples" / example, ["optim.lrr=1", f"output_dir={tmp_path}"])
    assert (run.returncode, run.stderr) == (2, "error: unknown config key 'optim.lrr' (Did you mean: 'lr'?)\n")
