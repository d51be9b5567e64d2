"""checkpoint.async_save: the same run as a synchronous save, staged copies, kills and write errors lose nothing."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import REPO_DIR, cli_env, read_metrics, run_cli
from dist_helpers import run_ranks
from torch import nn

from ddp_trainer import atomic, checkpoint, errors, saving
from ddp_trainer.cli.train import main

DIGITS = ["--config", "configs/digits_mlp.yaml", "trainer.device=cpu", "model.hidden_sizes=[64]"]
RUN = [*DIGITS, "trainer.epochs=2", "checkpoint.every_n_steps=5"]  # 45 steps per epoch: 18 step saves
ASYNC = "checkpoint.async_save=true"


def checkpoint_states(output_dir) -> dict[str, dict]:
    """Every checkpoint file of a run, loaded as a resume would load it (weights_only=True)."""
    return {path.name: checkpoint.load(path) for path in sorted((output_dir / "checkpoints").glob("*.pt"))}


def assert_same_tensors(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def without_times(lines: list[dict]) -> list[dict]:
    return [{key: value for key, value in line.items() if not key.startswith("time/")} for line in lines]


def test_async_run_ends_with_the_weights_metrics_and_files_of_a_sync_run(tmp_path, monkeypatch):
    writers, save_atomic = [], atomic.save_atomic
    monkeypatch.setattr(
        atomic, "save_atomic", lambda *args: writers.append(threading.current_thread().name) or save_atomic(*args)
    )
    assert main([*RUN, f"output_dir={tmp_path / 'sync'}"]) == 0
    assert set(writers) == {"MainThread"}
    writers.clear()
    assert main([*RUN, ASYNC, f"output_dir={tmp_path / 'async'}"]) == 0
    assert writers and all(writer.startswith("checkpoint-writer") for writer in writers)  # the files, off the loop
    written, expected = checkpoint_states(tmp_path / "async"), checkpoint_states(tmp_path / "sync")
    assert list(written) == list(expected) == ["best.pt", "last.pt", "step-00000085.pt", "step-00000090.pt"]
    for name, state in written.items():
        assert state["step"] == expected[name]["step"], name
        assert_same_tensors(state["model"], expected[name]["model"])
    assert without_times(read_metrics(tmp_path / "async")) == without_times(read_metrics(tmp_path / "sync"))


def test_a_staged_checkpoint_keeps_its_values_while_training_changes_the_model(tmp_path, monkeypatch):
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    staged = {name: value.clone() for name, value in saving.model_state(model, optimizer)["model"].items()}
    moments = optimizer.state[model.weight]["exp_avg"].clone()
    release, real_save_last = threading.Event(), checkpoint.save_last

    def held_save_last(*args, **kwargs) -> None:  # the writer thread waits until training has moved on
        release.wait(timeout=60)
        real_save_last(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_last", held_save_last)
    saver = saving.Saver(tmp_path, keep_last=0, async_save=True)
    saver.save({**saving.model_state(model, optimizer), "epoch": 0, "step": 1, "config": {}}, ["last"])
    optimizer.step()  # updates the weights and AdamW's moments in place, as the next training step would
    with torch.no_grad():
        model.weight.add_(1.0)
    release.set()
    saver.close()
    written = checkpoint.load(tmp_path / "last.pt")
    assert_same_tensors(written["model"], staged)
    assert torch.equal(written["optimizer"]["state"][0]["exp_avg"], moments)
    assert not torch.equal(written["model"]["weight"], model.weight.detach())


def test_the_next_async_save_copies_into_the_previous_copy_once_its_write_is_done(tmp_path):
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    saver = saving.Saver(tmp_path, keep_last=0, async_save=True)
    for step in (1, 2):
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        saver.save({**saving.model_state(model, optimizer), "epoch": 0, "step": step, "config": {}}, ["last"])
        if step == 1:
            first_weights, first_moments = saver.staged["model"]["weight"], saver.staged["optimizer"]["state"][0]
    assert saver.staged["model"]["weight"] is first_weights  # no fresh memory (and page faults) at every save
    assert saver.staged["optimizer"]["state"][0]["exp_avg"] is first_moments["exp_avg"]
    saver.close()
    written = checkpoint.load(tmp_path / "last.pt")
    assert written["step"] == 2 and torch.equal(written["model"]["weight"], model.weight.detach())
    assert torch.equal(written["optimizer"]["state"][0]["exp_avg"], optimizer.state[model.weight]["exp_avg"])


def test_an_async_save_writes_a_tied_weight_once_as_a_sync_save_does(tmp_path):
    embedding = nn.Embedding(1000, 64)
    model = nn.Sequential(embedding, nn.Linear(64, 1000, bias=False))
    model[1].weight = embedding.weight  # tied, as a language model's input and output embeddings often are
    sizes = {}
    for async_save in (False, True):
        (tmp_path / str(async_save)).mkdir()
        saver = saving.Saver(tmp_path / str(async_save), keep_last=0, async_save=async_save)
        state = {**saving.model_state(model, torch.optim.SGD(model.parameters())), "epoch": 0, "step": 1, "config": {}}
        saver.save(state, ["last"])
        saver.close()
        sizes[async_save] = (tmp_path / str(async_save) / "last.pt").stat().st_size
        written = checkpoint.load(tmp_path / str(async_save) / "last.pt")["model"]
        assert written["0.weight"].untyped_storage().data_ptr() == written["1.weight"].untyped_storage().data_ptr()
    assert max(sizes.values()) < 1000 * 64 * 4 * 1.1  # one copy of the 256 KB matrix each, not two


def test_kill_during_a_background_write_leaves_the_previous_checkpoint_and_resumes_exactly(tmp_path):
    args = [*RUN, "model.dropout=0.2"]  # dropout: the resumed run needs its RNG streams back
    straight = run_cli([*args, f"output_dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr
    killed_args = [*args, ASYNC, f"output_dir={tmp_path / 'killed'}"]
    # The 8th write (step 40) dies half-way, in the writer thread, while the training thread goes on.
    killed = subprocess.run(
        [sys.executable, "-m", "fault_entry", *killed_args],
        capture_output=True, text=True, timeout=180, env={**cli_env(), "KILL_AT_SAVE": "8"}, cwd=REPO_DIR,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    folder = tmp_path / "killed" / "checkpoints"
    assert checkpoint.load(folder / "last.pt")["step"] == 35  # the 7th save, whole
    assert len(list(folder.glob(".step-00000040.pt.*.tmp"))) == 1  # the half-written 8th

    resumed = run_cli(killed_args)
    assert resumed.returncode == 0, resumed.stderr
    assert "a checkpoint write that a crash interrupted" in resumed.stdout
    assert f"resumed from {folder / 'last.pt'}" in resumed.stdout
    assert not list(folder.glob(".*"))
    final, expected = checkpoint_states(tmp_path / "killed"), checkpoint_states(tmp_path / "straight")
    assert_same_tensors(final["last.pt"]["model"], expected["last.pt"]["model"])
    lines, straight_lines = read_metrics(tmp_path / "killed"), read_metrics(tmp_path / "straight")
    assert [line["epoch"] for line in lines] == [1, 2]
    for line, straight_line in zip(lines, straight_lines, strict=True):
        for key in ("step", "train/samples", "train/loss", "val/loss", "val/accuracy", "lr"):
            assert line[key] == straight_line[key], key


def test_a_failed_background_write_stops_the_run_with_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    real_save, writes = torch.save, []

    def save_until_the_disk_is_full(state, file, *args, **kwargs) -> None:
        writes.append(file)
        if len(writes) == 3:
            raise OSError(28, "No space left on device")
        real_save(state, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    assert main([*RUN, ASYNC, f"output_dir={tmp_path}"]) == 1
    last = tmp_path / "checkpoints" / "last.pt"
    error = capsys.readouterr().err
    assert error.startswith(f"ddp-train: error: could not write checkpoint {last} (OSError: [Errno 28] No space")
    assert error.count("\n") == 1
    assert checkpoint.load(last)["step"] == 10  # the 2nd save, whole; the 3rd never replaced it
    assert len(writes) == 3  # the run stopped at the next save: nothing was written after the failure


@pytest.mark.parametrize("async_save", [False, True])
def test_a_save_failure_names_the_file_in_either_mode(tmp_path, monkeypatch, async_save):
    def full_disk(*args, **kwargs) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    saver = saving.Saver(tmp_path, keep_last=2, async_save=async_save)
    state = {"model": {}, "optimizer": {}, "epoch": 0, "step": 1, "config": {}}
    # Synchronous, the save itself fails; asynchronous, the wait for its background write does.
    failing = saver.close if async_save else functools.partial(saver.save, state, ["best"])
    if async_save:
        saver.save(state, ["best"])
    with pytest.raises(errors.CheckpointWriteFailed, match=f"could not write checkpoint {tmp_path / 'best.pt'}"):
        failing()
    assert list(tmp_path.iterdir()) == []


def test_last_and_best_saved_together_are_one_write_so_best_never_lags_behind_last(tmp_path, monkeypatch):
    real_save, writes = torch.save, []

    def disk_full_after_one_write(*args, **kwargs) -> None:
        if writes:  # before: the second write (best.pt) failed, and last.pt already named it the best
            raise OSError(28, "No space left on device")
        writes.append(args[1])
        real_save(*args, **kwargs)

    saver = saving.Saver(tmp_path, keep_last=0, async_save=False)
    saver.save({"model": {}, "optimizer": {}, "epoch": 1, "step": 5, "config": {}}, ["last", "best"])
    monkeypatch.setattr(torch, "save", disk_full_after_one_write)
    saver.save({"model": {}, "optimizer": {}, "epoch": 2, "step": 10, "config": {}}, ["last", "best"])
    assert [checkpoint.load(tmp_path / name)["step"] for name in ("last.pt", "best.pt")] == [10, 10]
    assert len(writes) == 1 and os.path.samefile(tmp_path / "last.pt", tmp_path / "best.pt")


@pytest.mark.parametrize("keep_last", [0, 2])
def test_a_save_killed_between_its_names_leaves_last_behind_best_never_best_behind_last(
    tmp_path, monkeypatch, keep_last
):
    # Killed after last.pt named the new state, best.pt still held an older one that last.pt no longer called the
    # best, for good. Killed before last.pt, the older last.pt resumes and redoes the epoch, which names best again.
    saver = saving.Saver(tmp_path, keep_last=keep_last, async_save=False)
    state = {"model": {}, "optimizer": {}, "epoch": 1, "step": 5, "config": {}}
    saver.save(state, ["last", "best"])
    named = []

    def killed_at_the_second_name(publish):
        def publishing(source, target) -> None:
            if target.name in ("last.pt", "best.pt"):
                named.append(target.name)
                if len(named) == 2:
                    raise KeyboardInterrupt
            publish(source, target)

        return publishing

    monkeypatch.setattr(atomic, "save_atomic", killed_at_the_second_name(atomic.save_atomic))
    monkeypatch.setattr(atomic, "link_atomic", killed_at_the_second_name(atomic.link_atomic))
    with pytest.raises(KeyboardInterrupt):
        saver.save({**state, "epoch": 2, "step": 10}, ["last", "best"])
    assert [checkpoint.load(tmp_path / name)["step"] for name in ("last.pt", "best.pt")] == [5, 10]


FAILING_SAVES_ON_RANK_0 = """
import errno, sys
from ddp_trainer import checkpoint, distributed
from ddp_trainer.cli import train
if distributed.detect_launcher().rank == 0:
    def failing(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    checkpoint.save_last = failing
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_stops_save_failing_on_rank_0_is_named_on_the_others_in_one_line(tmp_path):
    # The background write fails as the stop waits for it: rank 0 says so, and rank 1, meeting the others to say who
    # had the signal, must name rank 0 as lost, not print gloo's traceback.
    script = tmp_path / "failing_saves.py"
    script.write_text(FAILING_SAVES_ON_RANK_0)
    args = ["data._target_=factories.faulty_blobs", "data.fault=term", "data.fault_rank=0", "data.after=20"]
    args += ["model._target_=factories.small_net", "trainer.device=cpu", ASYNC, "data.batch_size=8"]
    result = run_ranks([*args, f"output_dir={tmp_path / 'run'}"], script=script)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "ddp-train: error (rank 0): could not write checkpoint" in result.stderr
    assert "ddp-train: error (rank 1): rank 0, which hosts the rendezvous store, is gone" in result.stderr
