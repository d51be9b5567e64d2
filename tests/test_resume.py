"""Resume: a killed run started again with the same command ends where an uninterrupted run ends."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import factories
import pytest
import torch
from conftest import REPO_DIR, cli_command, cli_env, dead, launch_cli, read_metrics, run_cli
from dist_helpers import free_port, run_ranks

import ddp_trainer
from ddp_trainer import checkpoint, config, optim
from ddp_trainer.cli.train import main
from ddp_trainer.errors import UsageError
from ddp_trainer.loggers import RunLogger

DIGITS = ["--config", "configs/digits_mlp.yaml", "trainer.device=cpu", "model.hidden_sizes=[64]", "model.dropout=0.2"]


def final_weights(output_dir) -> dict[str, torch.Tensor]:
    return checkpoint.load(output_dir / "checkpoints" / "last.pt")["model"]


def assert_same_weights(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


# Dropout draws from every rank's RNG, so the weights only match if each rank's stream was restored.
# Step checkpoints every 5 of the 45 steps per epoch: a kill usually lands mid-epoch.
KILLED_RUN = [*DIGITS, "trainer.epochs=12", "checkpoint.every_n_steps=5"]


@pytest.fixture(scope="module")
def uninterrupted_one_rank(tmp_path_factory) -> Path:
    """The output folder of KILLED_RUN in one process, never interrupted: what a killed run must end as."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    # A subprocess like the killed run's, with the same thread count: float reductions happen in the same order.
    straight = run_cli([*KILLED_RUN, f"output_dir={output_dir}"])
    assert straight.returncode == 0, straight.stderr
    return output_dir


@pytest.mark.parametrize(
    ("signum", "exit_code"),
    # Two ranks stopped by SIGTERM: test_torchrun_restarts_a_rank_stopped_by_sigterm_and_ends_with_the_same_weights.
    # SIGKILL mid-epoch, resumed bitwise: test_kill_during_a_background_write_leaves_the_previous_checkpoint_and_...
    # (1 rank), test_kill_during_a_checkpoint_write_loses_nothing (2 ranks) and the FSDP one in test_distributed.py.
    [(signal.SIGTERM, 128 + 15)],
)
def test_killed_run_resumes_to_the_same_weights_and_epoch_lines(tmp_path, uninterrupted_one_rank, signum, exit_code):
    args = [*KILLED_RUN, f"output_dir={tmp_path}"]
    metrics = tmp_path / "metrics.jsonl"
    process = launch_cli(args)
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signum)  # SIGTERM: the step finishes and a checkpoint is written; SIGKILL: nothing is
    assert process.wait(timeout=60) == exit_code
    epochs_before_kill = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["epoch"]
    assert 2 <= epochs_before_kill < 12, "the kill must land mid-run for this test to mean anything"

    rerun = run_cli(args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from {tmp_path / 'checkpoints' / 'last.pt'}" in rerun.stdout
    assert_same_weights(final_weights(tmp_path), final_weights(uninterrupted_one_rank))
    killed, straight = read_metrics(tmp_path), read_metrics(uninterrupted_one_rank)
    assert [line["epoch"] for line in killed] == list(range(1, 13))
    for resumed_line, straight_line in zip(killed, straight, strict=True):
        for key in ("step", "train/samples", "val/loss", "val/accuracy", "lr"):
            assert resumed_line[key] == straight_line[key], key
        assert resumed_line["train/loss"] == pytest.approx(straight_line["train/loss"], rel=1e-12)


def test_a_kill_between_the_first_saves_best_and_last_names_resumes_from_best(tmp_path):
    # The first save wrote best.pt, then died before last.pt: the folder held best.pt alone, which auto refused, so
    # every restart or requeue of the same command failed with exit 2.
    args = [*DIGITS, "trainer.epochs=2", "checkpoint.keep_last=0"]
    straight = run_cli([*args, f"output_dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr
    killed = [*args, f"output_dir={tmp_path / 'killed'}"]
    died = subprocess.run(
        [sys.executable, "-m", "fault_entry", *killed],
        capture_output=True,
        text=True,
        timeout=180,
        env={**cli_env(), "KILL_AT_LINK": "1"},
        cwd=REPO_DIR,
    )
    assert died.returncode == -signal.SIGKILL, died.stderr
    best = tmp_path / "killed" / "checkpoints" / "best.pt"
    assert sorted(path.name for path in best.parent.iterdir()) == ["best.pt"]
    rerun = run_cli(killed)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from {best}: step 45, epochs done: 1" in rerun.stdout
    assert_same_weights(final_weights(tmp_path / "killed"), final_weights(tmp_path / "straight"))
    untimed = [
        [{key: value for key, value in line.items() if not key.startswith("time/")} for line in read_metrics(run)]
        for run in (tmp_path / "killed", tmp_path / "straight")
    ]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 2


def test_run_stopped_mid_epoch_finishes_the_epoch_exactly(tmp_path, capsys):
    # No LR schedule: a cosine schedule is stretched over the run's length, so the stopped run would differ by design.
    # Without one, a resumed run may change its length (trainer.epochs, trainer.max_steps): it continues the same run.
    args = [*DIGITS, "optim.scheduler=none"]
    assert main([*args, "trainer.epochs=3", f"output_dir={tmp_path / 'straight'}"]) == 0
    split = [*args, f"output_dir={tmp_path / 'split'}"]
    assert main([*split, "trainer.epochs=2", "trainer.max_steps=70"]) == 0  # 45 steps per epoch
    stopped = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step"], stopped["batch_in_epoch"]) == (1, 70, 25)
    assert main([*split, "trainer.epochs=2", "trainer.max_steps=70"]) == 0  # finished: says so, keeps its lines
    assert "this run is finished (1 of 2 epochs, step 70, at trainer.max_steps=70): nothing" in capsys.readouterr().out
    assert [line["step"] for line in read_metrics(tmp_path / "split")] == [45, 70]
    assert main([*split, "trainer.epochs=3"]) == 0
    assert_same_weights(final_weights(tmp_path / "split"), final_weights(tmp_path / "straight"))
    # The part epoch was validated at step 70, yet only whole epochs are judged: best.pt is the uninterrupted run's.
    bests = [checkpoint.load(tmp_path / run / "checkpoints" / "best.pt") for run in ("split", "straight")]
    assert [(best["step"], best["best_metric"]) for best in bests] == [(bests[1]["step"], bests[1]["best_metric"])] * 2
    split, straight = read_metrics(tmp_path / "split"), read_metrics(tmp_path / "straight")
    assert [line["epoch"] for line in split] == [1, 2, 3]
    for split_line, straight_line in zip(split, straight, strict=True):
        assert split_line["train/samples"] == straight_line["train/samples"]
        assert split_line["train/loss"] == pytest.approx(straight_line["train/loss"], rel=1e-9)
        assert split_line["val/accuracy"] == straight_line["val/accuracy"]


def test_a_crash_after_an_epochs_last_step_was_saved_logs_the_rate_that_step_took(tmp_path, monkeypatch):
    # The step checkpoint at step 45 is the epoch's last step; the crash comes before the epoch's own save. Resumed,
    # the epoch has no step left, and its line must give the rate step 45 took, not the one step 46 will take.
    args = [*DIGITS, "trainer.epochs=2", "checkpoint.every_n_steps=45"]
    assert main([*args, f"output_dir={tmp_path / 'straight'}"]) == 0

    real_log_epoch = RunLogger.log_epoch

    def log_then_crash(logger: RunLogger, *args: object) -> None:
        real_log_epoch(logger, *args)
        raise RuntimeError("crashed before the epoch's own save")

    monkeypatch.setattr(RunLogger, "log_epoch", log_then_crash)
    with pytest.raises(RuntimeError, match="crashed before"):
        main([*args, f"output_dir={tmp_path / 'crashed'}"])
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "crashed" / "checkpoints" / "last.pt")["batch_in_epoch"] == 45
    assert main([*args, f"output_dir={tmp_path / 'crashed'}"]) == 0
    crashed, straight = read_metrics(tmp_path / "crashed"), read_metrics(tmp_path / "straight")
    assert [line["lr"] for line in crashed] == [line["lr"] for line in straight]
    assert straight[0]["lr"] != straight[1]["lr"]  # a cosine schedule: each epoch's last rate differs


@pytest.mark.parametrize("per_sample_seed", [True, False])
def test_mid_epoch_resume_with_augmenting_workers_is_exact_with_per_sample_seeds(tmp_path, per_sample_seed):
    # 96 samples / batch 8 = 12 steps per epoch; the split run stops at step 7 and resumes mid-epoch.
    args = [
        "data._target_=factories.augmented_blobs",
        "model._target_=factories.small_net",
        "trainer.device=cpu",
        "data.batch_size=8",
        "data.num_workers=2",
        "trainer.epochs=2",
        f"data.per_sample_seed={per_sample_seed}",
    ]
    assert main([*args, f"output_dir={tmp_path / 'straight'}"]) == 0
    assert main([*args, f"output_dir={tmp_path / 'split'}", "trainer.max_steps=7"]) == 0
    assert main([*args, f"output_dir={tmp_path / 'split'}"]) == 0
    straight, split = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    same = all(torch.equal(straight[name], split[name]) for name in straight)
    assert same == per_sample_seed  # without a seed per sample, the workers' streams restart at the resume


def test_an_epoch_finished_by_a_resumed_run_reports_its_whole_training_time(tmp_path):
    # time/train_s counted only the resumed run's part: samples / time/train_s read 1.5x the real throughput here.
    args = ["data._target_=factories.blobs", "model._target_=factories.SlowNet", "model.delay_s=0.1"]
    args += ["trainer.device=cpu", "data.batch_size=8", "trainer.epochs=1", f"output_dir={tmp_path}"]  # 12 steps
    assert main([*args, "trainer.max_steps=4"]) == 0
    part = read_metrics(tmp_path)[0]["time/train_s"]
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["epoch_train_s"] == part >= 0.4
    assert main([*args, "trainer.max_steps=-1"]) == 0
    (whole,) = read_metrics(tmp_path)  # the part epoch's line made way for the whole epoch's
    assert whole["time/epoch_s"] >= whole["time/train_s"] >= part + 8 * 0.1
    assert whole["time/train_s"] >= 12 * 0.1


def test_corrupt_checkpoint_stops_the_run_and_is_left_as_it_was(tmp_path, capsys):
    last = tmp_path / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"\x00" * 64)
    assert main([*DIGITS, f"output_dir={tmp_path}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("ddp-train: error: no readable checkpoint") and str(last) in error and "\n" not in error
    assert last.read_bytes() == b"\x00" * 64


def test_checkpoint_of_another_model_from_python_is_refused_in_one_line(tmp_path, capsys):
    # The same config with another module, which fit() receives as an object: only the weights can tell.
    train, val = factories.blobs()
    overrides = ["trainer.device=cpu", "trainer.epochs=1", f"output_dir={tmp_path}"]
    ddp_trainer.fit(factories.small_net(hidden=16), train, val, overrides=overrides)
    fits = "does not fit this run's model or optimizer: Error.s. in loading state_dict for .*: size mismatch for "
    with pytest.raises(UsageError, match=fits) as refused:
        ddp_trainer.fit(factories.small_net(hidden=32), train, val, overrides=[*overrides, "trainer.epochs=2"])
    assert "\n" not in str(refused.value)


class Holder(torch.nn.Module):
    """A module whose submodule the user named `module`, as EMA wrappers do."""

    def __init__(self) -> None:
        super().__init__()
        self.module = factories.small_net(hidden=16)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.module(inputs)


@pytest.mark.parametrize("wrapped", ["a submodule named module", "compiled by the user"])
def test_a_model_whose_keys_look_wrapped_resumes_and_its_file_loads_into_a_fresh_one(tmp_path, wrapped):
    # Both saved keys cut as if DDP's or compile's prefixes: the run could not resume ("Missing key(s)"), and the
    # first's file loaded into no fresh instance of the user's class.
    def model() -> torch.nn.Module:
        return Holder() if wrapped == "a submodule named module" else torch.compile(Holder(), backend="eager")

    train, val = factories.blobs()
    overrides = ["trainer.device=cpu", "trainer.epochs=1", f"output_dir={tmp_path}"]
    ddp_trainer.fit(model(), train, val, overrides=overrides)
    record = ddp_trainer.fit(
        model(), train, val, overrides=[*overrides, "trainer.epochs=2", "trainer.allow_changes=[trainer.epochs]"]
    )
    assert record["epoch"] == 2
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(key.startswith("module.") for key in saved)
    Holder().load_state_dict(saved)  # strict: every key the user's class has


def test_a_run_resumed_on_other_data_from_python_is_refused_in_one_line(tmp_path):
    # No config key describes the data fit() is handed: the checkpoint records how many samples it had.
    train, val = factories.blobs()
    overrides = ["trainer.device=cpu", "trainer.max_steps=3", f"output_dir={tmp_path}"]
    ddp_trainer.fit(factories.small_net(), train, val, overrides=overrides)
    saved = checkpoint_files(tmp_path)
    fewer = torch.utils.data.Subset(train, range(40))
    with pytest.raises(UsageError, match=r"data_sizes \[96, 37\] -> \[40, 37\]; .*cannot change within one run"):
        ddp_trainer.fit(factories.small_net(), fewer, val, overrides=[*overrides, "trainer.max_steps=6"])
    assert checkpoint_files(tmp_path) == saved


def checkpoint_files(output_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((output_dir / "checkpoints").glob("*.pt"))}


def test_best_checkpoints_monitor_left_to_the_task_is_the_same_as_the_one_it_picks_written_out(tmp_path, capsys):
    # The recipe once wrote val/accuracy and max, the task's own choice: its runs must resume with today's recipe.
    args = [*DIGITS, "trainer.epochs=1", f"output_dir={tmp_path}"]
    assert main([*args, "checkpoint.monitor=val/accuracy", "checkpoint.mode=max"]) == 0
    assert main(args) == 0
    assert "this run is finished (1 of 1 epochs" in capsys.readouterr().out
    assert main([*args, "checkpoint.monitor=val/loss"]) == 2  # another metric: best.pt would follow something else
    assert "checkpoint.mode 'max' -> 'min', checkpoint.monitor 'val/accuracy' -> 'val/loss'" in capsys.readouterr().err


def test_a_finished_run_started_again_with_fewer_epochs_says_it_trained_past_them(tmp_path, capsys):
    # Without a cosine schedule, trainer.epochs may be lowered on resume: it said "(2 of 1 epochs, ...)".
    constant = [*DIGITS, "optim.scheduler=none", "trainer.epochs=2", f"output_dir={tmp_path}"]
    assert main(constant) == 0
    assert main([*constant, "trainer.epochs=1"]) == 0
    assert "this run is finished (2 epochs, past trainer.epochs=1, step 90): nothing" in capsys.readouterr().out
    assert main([*constant, "trainer.max_steps=50"]) == 0  # said "(2 of 2 epochs, step 90)" of a step limit
    said = capsys.readouterr().out
    assert "this run is finished (2 of 2 epochs, step 90, past trainer.max_steps=50): nothing" in said


def test_a_finished_run_whose_last_metrics_line_a_crash_cut_says_it_is_finished(tmp_path, capsys):
    # The record it reports was read from the last line whole: a JSONDecodeError traceback, exit 1.
    args = [*DIGITS, "trainer.epochs=1", f"output_dir={tmp_path}"]
    assert main(args) == 0
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as file:
        file.write('{"epoch": 2, "st')
    before = metrics.read_bytes()
    capsys.readouterr()
    assert main(args) == 0
    assert "this run is finished (1 of 1 epochs" in capsys.readouterr().out
    assert metrics.read_bytes() == before


def test_a_monitor_left_to_the_task_is_compared_as_the_task_chose_it(tmp_path, capsys):
    # An unset monitor in the checkpoint's config was taken as this run's choice: val/loss after val/accuracy passed
    # without a word, and best.pt and early stopping compared losses with the restored accuracy.
    args = [*DIGITS, "trainer.epochs=1", f"output_dir={tmp_path}"]
    assert main(args) == 0
    assert main([*args, "checkpoint.monitor=val/loss"]) == 2
    assert "checkpoint.mode 'max' -> 'min', checkpoint.monitor 'val/accuracy' -> 'val/loss'" in capsys.readouterr().err
    assert main([*args, "checkpoint.monitor=val/accuracy"]) == 0  # the task's own choice, written out


@pytest.mark.parametrize(
    ("first", "then", "said"), [([], ["model.hidden=8"], "16 -> 8"), (["model.hidden=8"], [], "8 -> 16")]
)
def test_a_factory_argument_set_or_left_out_on_resume_is_a_change(tmp_path, capsys, first, then, said):
    # Only keys both configs held were compared: an argument added on resume, or an override a restart forgot, ran
    # the factory with another value, without a word. Left out, an argument is its factory's default (16).
    args = ["data._target_=factories.blobs", "model._target_=factories.small_net", "trainer.device=cpu"]
    args += ["trainer.epochs=1", f"output_dir={tmp_path}"]
    assert main([*args, *first]) == 0
    capsys.readouterr()
    assert main([*args, *then]) == 2
    assert f"another config: model.kwargs.hidden {said}; " in capsys.readouterr().err
    assert main([*args, *first, "model.classes=3"]) == 0  # the default, written out: no change


@pytest.mark.parametrize(
    ("factories", "first", "then", "said"),
    [
        # A node's own copy of the data: data.root reaches the factory as its root.
        (
            ["data._target_=factories.folder_blobs"],
            ["data.root=/data/blobs"],
            ["data.root=/moved/blobs"],
            "'/data/blobs' -> '/moved/blobs'",
        ),
        # channels_last reaches a model class that takes **options: a layout, as for a built-in model.
        (
            ["data._target_=factories.blobs", "model._target_=factories.AnyOptions"],
            [],
            ["model.channels_last=true"],
            "unset -> True",
        ),
    ],
)
def test_a_harmless_key_that_reaches_a_factory_may_change_on_resume(tmp_path, capsys, factories, first, then, said):
    args = [*factories, "trainer.device=cpu", "trainer.epochs=1", f"output_dir={tmp_path}"]
    assert main([*args, *first]) == 0
    assert main([*args, *then]) == 0
    key = then[0].split("=")[0].replace(".", ".kwargs.", 1)
    assert f"as it was: {key} {said}" in capsys.readouterr().out


def test_resume_refuses_changes_to_the_result_names_the_others_and_continues_on_request(tmp_path, capsys):
    args = [*DIGITS, "trainer.epochs=2", f"output_dir={tmp_path}"]
    assert main(args) == 0
    saved, last = checkpoint_files(tmp_path), tmp_path / "checkpoints" / "last.pt"
    capsys.readouterr()

    # The recipe's cosine schedule spans the run, so more epochs change it as a new learning rate does.
    assert main([*args, "optim.lr=3e-4", "trainer.epochs=4"]) == 2
    assert capsys.readouterr().err == (
        f"ddp-train: error: checkpoint {last} was saved with another config: optim.lr 0.001 -> 0.0003, "
        "trainer.epochs 2 -> 4; to train anew, use another output_dir; to go on from step "
        "90 with the new values: trainer.allow_changes=[optim.lr,trainer.epochs]\n"
    )
    assert main([*args, "model.hidden_sizes=[32]", "seed=1"]) == 2
    assert capsys.readouterr().err == (
        f"ddp-train: error: checkpoint {last} was saved with another config: model.hidden_sizes [64] -> [32], "
        "seed 0 -> 1; to train anew, use another output_dir; model.hidden_sizes, seed "
        "cannot change within one run\n"
    )
    assert main([*args, "trainer.allow_changes=[model.name]"]) == 2
    assert "config key 'trainer.allow_changes' has invalid value ['model.name']" in capsys.readouterr().err
    assert checkpoint_files(tmp_path) == saved

    assert main([*args, "trainer.log_every_n_steps=7", "trainer.dist_timeout_s=60"]) == 0
    output = capsys.readouterr().out
    assert "as it was: trainer.dist_timeout_s 300.0 -> 60.0, trainer.log_every_n_steps 10 -> 7" in output
    assert "this run is finished (2 of 2 epochs, step 90): nothing to train" in output
    assert checkpoint_files(tmp_path) == saved and len(read_metrics(tmp_path)) == 2

    changed = ["optim.lr=3e-4", "trainer.epochs=4", "trainer.allow_changes=[optim.lr,trainer.epochs]"]
    assert main([*args, *changed]) == 0
    cfg = config.load("configs/digits_mlp.yaml", [*DIGITS[2:], *changed])
    multiplier = optim.lr_multiplier(cfg.optim, steps_per_epoch=45, total_steps=180)
    assert [(line["epoch"], line["step"]) for line in read_metrics(tmp_path)] == [(1, 45), (2, 90), (3, 135), (4, 180)]
    # The rate epoch 3's last step (135) trained with: the schedule's factor after 134 steps.
    assert read_metrics(tmp_path)[2]["lr"] == pytest.approx(3e-4 * multiplier(134), rel=1e-12)


@pytest.mark.parametrize("floor", [[], ["optim.min_lr=1e-4"]])
def test_a_schedule_changed_on_resume_sets_the_rate_of_the_very_next_step(tmp_path, floor):
    # The saved run ended its cosine at 0 and its optimizer holds that rate: one step more, then the run ends.
    args = [*DIGITS, f"output_dir={tmp_path}"]
    assert main([*args, "trainer.epochs=1"]) == 0
    keys = ",".join(["trainer.epochs", "trainer.max_steps", *[key.split("=")[0] for key in floor]])
    longer = ["trainer.epochs=2", "trainer.max_steps=46", *floor, f"trainer.allow_changes=[{keys}]"]
    assert main([*args, *longer]) == 0
    cfg = config.load("configs/digits_mlp.yaml", [*DIGITS[2:], *longer])
    first, resumed = read_metrics(tmp_path)
    assert first["lr"] > 0 and resumed["step"] == 46
    # Step 46 trained with the new schedule's factor after 45 steps, not with the 0 the saved schedule had reached.
    multiplier = optim.lr_multiplier(cfg.optim, steps_per_epoch=45, total_steps=46)
    assert resumed["lr"] == pytest.approx(1e-3 * multiplier(45), rel=1e-12) and resumed["lr"] > 0
    assert resumed["val/loss"] != first["val/loss"]


def test_a_run_resumed_on_more_ranks_lays_its_cosine_over_the_steps_it_will_take(tmp_path):
    # 45 steps of 32 on one rank, then 23 an epoch on two: the schedule spans 45 + 2 x 23 = 91 steps. Laid over
    # 3 x 23 = 69 steps, as if every epoch had run on two ranks, the rate reached 0 with an epoch still to train.
    args = ["--config", "configs/digits_mlp.yaml", "trainer.device=cpu", "model.hidden_sizes=[16]"]
    args.append(f"output_dir={tmp_path}")
    assert main([*args, "trainer.epochs=1"]) == 0
    resumed = run_ranks([*args, "trainer.epochs=3", "trainer.allow_changes=[world_size,trainer.epochs]"])
    assert resumed.returncode == 0, resumed.stderr
    lines = read_metrics(tmp_path)
    assert [(line["epoch"], line["step"]) for line in lines] == [(1, 45), (2, 68), (3, 91)]
    # The rate step 68 took: after 20 warmup steps, the cosine's factor 67 - 20 steps into its 91 - 20.
    assert lines[1]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 47 / 71)), rel=1e-9)
    assert lines[2]["lr"] > 0 and lines[2]["val/loss"] != lines[1]["val/loss"]  # the last epoch trained


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the torchrun workers below `launcher_pid`, read from /proc."""
    parents = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            parents[int(status.parent.name)] = int(status.read_text().split("PPid:\t")[1].split()[0])
        except (OSError, IndexError, ValueError):
            continue
    workers, frontier = {}, {launcher_pid}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier}
        for pid in frontier:
            try:
                variables = dict(
                    item.split(b"=", 1)
                    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    if b"=" in item
                )
            except OSError:
                continue
            if b"TORCHELASTIC_RUN_ID" in variables and b"RANK" in variables:
                workers[int(variables[b"RANK"])] = pid
    return workers


TORCHRUN_RUN = [*DIGITS, "trainer.epochs=12", "checkpoint.every_n_steps=5"]


@pytest.fixture(scope="module")
def uninterrupted_two_ranks(tmp_path_factory) -> Path:
    """The output folder of TORCHRUN_RUN on 2 ranks, never interrupted: what every faulted run must end as."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_ranks([*TORCHRUN_RUN, f"output_dir={output_dir}"])
    assert result.returncode == 0, result.stderr
    return output_dir


def assert_same_run(faulted: Path, uninterrupted: Path) -> None:
    assert_same_weights(final_weights(faulted), final_weights(uninterrupted))
    lines, expected = read_metrics(faulted), read_metrics(uninterrupted)
    assert [line["epoch"] for line in lines] == [line["epoch"] for line in expected]
    for line, expected_line in zip(lines, expected, strict=True):
        for key in ("step", "train/samples", "train/loss", "val/loss", "val/accuracy", "lr"):
            assert line[key] == expected_line[key], key


def torchrun_with_one_restart(args: list[str]) -> subprocess.Popen:
    command = cli_command(args, nproc=2)
    command.insert(command.index("--standalone"), "--max-restarts=1")
    return subprocess.Popen(command, cwd=REPO_DIR, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_torchrun_restarts_a_rank_stopped_by_sigterm_and_ends_with_the_same_weights(tmp_path, uninterrupted_two_ranks):
    # Both ranks agree to stop, save mid-epoch and exit 143; torchrun restarts them from that save.
    # A rank killed outright (SIGKILL) is test_kill_during_a_checkpoint_write_loses_nothing.
    process = torchrun_with_one_restart([*TORCHRUN_RUN, f"output_dir={tmp_path}"])
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(worker_pids(process.pid)[1], signal.SIGTERM)
    output = process.communicate(timeout=180)[0].decode()
    assert process.returncode == 0, output
    assert "stopped by SIGTERM (sent to rank 1 only: see its output) at step " in output  # rank 0's line
    assert "resumed from" in output
    assert_same_run(tmp_path, uninterrupted_two_ranks)


def test_ranks_whose_torchrun_was_killed_save_and_stop_and_the_run_resumes_exactly(tmp_path, uninterrupted_two_ranks):
    # torchrun starts its ranks in sessions of their own, so they outlive a SIGKILL to it: they must not train on.
    # Paced: unpaced, the 9 epochs left took about 1 s, the watcher's poll, and a fast machine finished them first.
    args = [*TORCHRUN_RUN, f"output_dir={tmp_path}"]
    launcher, metrics = launch_cli(args, nproc=2, module="paced_entry"), tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks = list(worker_pids(launcher.pid).values())
    assert len(ranks) == 2
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 60
    while not all(map(dead, ranks)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(map(dead, ranks)), "the orphaned ranks trained on"
    stopped = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert 3 <= stopped["epoch"] < 12  # saved as on SIGTERM, not trained to the end
    resumed = run_ranks(args)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path, uninterrupted_two_ranks)


def importing_torch(pid: int) -> bool:
    """Whether rank `pid` has mapped torch's library, so it is past `import ddp_trainer` and into torch's imports."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_ranks_whose_torchrun_was_killed_while_they_imported_torch_end_at_once(tmp_path):
    # Orphaned before fit() started its watcher, they found PID 1 as their parent and nothing to watch: with torchrun's
    # store gone, they waited in the rendezvous for trainer.startup_timeout_s (30 minutes by default).
    launcher = launch_cli([*DIGITS, "trainer.startup_timeout_s=600", f"output_dir={tmp_path}"], nproc=2)
    ranks, deadline = {}, time.monotonic() + 60
    while not (len(ranks) == 2 and all(map(importing_torch, ranks.values()))) and time.monotonic() < deadline:
        ranks = worker_pids(launcher.pid)
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 60
    try:
        while not all(map(dead, ranks.values())) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(ranks) == 2 and all(map(dead, ranks.values())), "the orphaned ranks waited on"
    finally:
        for pid in ranks.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def two_agents_with_one_restart(args: list[str]) -> list[subprocess.Popen]:
    """`python -m fault_entry ARGS` under two torchrun agents, one rank each, as on two nodes; one restart allowed."""
    rendezvous = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    command = [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--max-restarts=1", "-m", "fault_entry"]
    env = {**cli_env(), "KILL_AT_SAVE": "8"}
    return [
        subprocess.Popen([*command, *args], cwd=REPO_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]


def test_kill_during_a_checkpoint_write_loses_nothing(tmp_path, uninterrupted_two_ranks):
    # Rank 0 dies with half of its 8th checkpoint written to the temporary file; torchrun restarts the job. Two agents
    # count restarts apart (one 1, the other 0), so the restarted ranks must still find each other in the agent's store.
    agents = two_agents_with_one_restart([*TORCHRUN_RUN, f"output_dir={tmp_path}"])
    outputs = [agent.communicate(timeout=180)[0].decode() for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs
    output = "".join(outputs)
    assert "a checkpoint write that a crash interrupted" in output  # the half-written temporary file was found
    assert "resumed from" in output and "unreadable" not in output  # last.pt was the previous, whole checkpoint
    assert not list((tmp_path / "checkpoints").glob(".*"))
    assert_same_run(tmp_path, uninterrupted_two_ranks)


def test_two_ranks_refuse_a_changed_run_alike_and_go_on_with_an_accepted_one(tmp_path, uninterrupted_two_ranks, capsys):
    shutil.copytree(uninterrupted_two_ranks, tmp_path, dirs_exist_ok=True)
    saved, args = checkpoint_files(tmp_path), [*TORCHRUN_RUN, f"output_dir={tmp_path}"]
    refused = run_ranks([*args, "optim.lr=0.01"])  # every rank alone, no hang
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 2, refused.stderr
    for rank, line in enumerate(refused.stderr.splitlines()):
        assert line.startswith(f"ddp-train: error (rank {rank}): checkpoint ") and "optim.lr 0.001 -> 0.01;" in line
    assert main(args) == 2  # one rank where two trained: another global batch
    assert "world_size 2 -> 1;" in capsys.readouterr().err
    assert checkpoint_files(tmp_path) == saved

    more = ["trainer.epochs=13", "trainer.allow_changes=[trainer.epochs]", "trainer.log_every_n_steps=7"]
    went_on = run_ranks([*args, *more])
    assert went_on.returncode == 0, went_on.stderr
    assert (
        "trainer.log_every_n_steps 10 -> 7" in went_on.stdout.split("leave the result as it was: ")[1].splitlines()[0]
    )
    assert [(line["epoch"], line["world_size"]) for line in read_metrics(tmp_path)][-2:] == [(12, 2), (13, 2)]

    # Accepted, one rank goes on where two stopped: every sample once, in twice the steps; its RNG streams reseeded.
    alone = ["trainer.epochs=14", "trainer.allow_changes=[trainer.epochs,world_size]"]
    assert main([*args, *alone]) == 0
    assert "holds RNG streams of 2 ranks, not 1: reseeded" in capsys.readouterr().out
    *_, before, last = read_metrics(tmp_path)
    assert (last["epoch"], last["world_size"], last["train/samples"]) == (14, 1, before["train/samples"])
    assert (before["step"], last["step"]) == (13 * 23, 13 * 23 + 45)  # 1438 samples in batches of 32: 2 x 719, 1 x 1438


def test_unreadable_last_checkpoint_resumes_from_the_newest_readable_one(tmp_path, capsys):
    args = [*DIGITS, "checkpoint.every_n_steps=20", "checkpoint.keep_last=2", f"output_dir={tmp_path}"]
    assert main([*args, "trainer.epochs=2"]) == 0
    last = tmp_path / "checkpoints" / "last.pt"
    last.unlink()
    last.write_bytes(b"PK\x03\x04 cut off")  # a truncated file where last.pt was
    capsys.readouterr()
    assert main([*args, "trainer.epochs=3", "trainer.allow_changes=[trainer.epochs]"]) == 0
    output = capsys.readouterr().out
    assert f"checkpoint {last} is unreadable" in output and "resumed from" in output
    assert [line["epoch"] for line in read_metrics(tmp_path)] == [1, 2, 3]


def test_a_resume_that_cannot_restore_the_rng_streams_does_not_replay_the_first_ones(tmp_path, monkeypatch, capsys):
    states, dropout = [], torch.nn.Dropout.forward

    def recording(layer: torch.nn.Dropout, inputs: torch.Tensor) -> torch.Tensor:
        if layer.training:
            states.append(torch.get_rng_state())  # what the mask is drawn from
        return dropout(layer, inputs)

    monkeypatch.setattr(torch.nn.Dropout, "forward", recording)
    args = [*DIGITS, f"output_dir={tmp_path}"]
    assert main([*args, "trainer.epochs=1"]) == 0
    first = states[:]
    states.clear()
    last = tmp_path / "checkpoints" / "last.pt"
    state = checkpoint.load(last)
    torch.save({**state, "rng": state["rng"] * 2}, last)  # streams of 2 ranks: none fits this 1-rank run
    assert main([*args, "trainer.epochs=2", "trainer.allow_changes=[trainer.epochs]"]) == 0
    assert "holds RNG streams of 2 ranks, not 1: reseeded" in capsys.readouterr().out
    assert len(states) == len(first) == 45
    assert not any(torch.equal(again, drawn) for again, drawn in zip(states, first, strict=True))


def test_rng_states_made_by_hand_are_refused_in_one_line(tmp_path, capsys):
    # A list of the right length whose entries are no RNG states raised ValueError inside rng.restore.
    args = [*DIGITS, "trainer.epochs=1", "model.hidden_sizes=[16]"]
    assert main([*args, f"output_dir={tmp_path / 'first'}"]) == 0
    crafted = tmp_path / "crafted.pt"
    torch.save({**checkpoint.load(tmp_path / "first" / "checkpoints" / "last.pt"), "rng": [{"python": "x"}]}, crafted)
    capsys.readouterr()
    resumed = [*args, "trainer.epochs=2", "trainer.allow_changes=[trainer.epochs]", f"trainer.resume={crafted}"]
    resumed.append(f"output_dir={tmp_path / 'second'}")
    assert main(resumed) == 2
    assert f"checkpoint {crafted} holds RNG states no run could restore (" in capsys.readouterr().err
