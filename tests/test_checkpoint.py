"""Checkpoint files: atomic replacement, prefix-free state dicts, weights_only loading with named errors."""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import sys

import pytest
import torch
from conftest import FullDisk

from ddp_trainer import atomic, checkpoint
from ddp_trainer.errors import UsageError


def minimal_state(value: float) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "optimizer": {}, "epoch": 1, "step": 2, "config": {"seed": 0}}


def test_save_then_load_round_trips(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    atomic.save_atomic(minimal_state(1.5), path)
    loaded = checkpoint.load(path)
    assert torch.equal(loaded["model"]["w"], torch.full((3,), 1.5))
    assert os.listdir(path.parent) == ["last.pt"]


def test_failed_save_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    atomic.save_atomic(minimal_state(1.0), path)
    unpicklable = {**minimal_state(2.0), "bad": lambda: None}
    with pytest.raises(Exception, match="lambda|pickle"):
        atomic.save_atomic(unpicklable, path)
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.full((3,), 1.0))
    assert os.listdir(tmp_path) == ["last.pt"]


def test_a_full_disk_fails_with_no_space_left_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic.save_atomic(minimal_state(1.0), path)
    # torch.save turns the writer's OSError into "enforce fail at inline_container.cc ... unexpected pos", no cause.
    monkeypatch.setattr(os, "fdopen", lambda handle, mode: io.BufferedWriter(FullDisk(handle, mode, room=5000)))
    with pytest.raises(OSError, match=r"^\[Errno 28\] No space left on device$"):
        atomic.save_atomic({**minimal_state(2.0), "data": torch.zeros(100_000)}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.full((3,), 1.0))
    assert os.listdir(tmp_path) == ["last.pt"]


def test_wrapper_prefixes_are_stripped():
    state = {"module.0.weight": 1, "_orig_mod.module.1.bias": 2, "2.weight": 3}
    assert checkpoint.clean_state_dict(state) == {"0.weight": 1, "1.bias": 2, "2.weight": 3}


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({**minimal_state(0.0), "payload": RunsCode()}, path)
    with pytest.raises(UsageError, match="evil.pt refused.*posix.system"):
        checkpoint.load(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", "truncate"])
def test_unreadable_files_are_named(tmp_path, content):
    path = tmp_path / "last.pt"
    if content == "truncate":
        atomic.save_atomic(minimal_state(1.0), path)
        content = path.read_bytes()[:100]
    path.write_bytes(content)
    with pytest.raises(UsageError, match=f"{path}.*unreadable") as raised:
        checkpoint.load(path)
    if not content:  # was "(EOFError: EOFError)": torch's error has no message
        assert str(raised.value) == f"checkpoint {path} is unreadable (an empty file)"


def test_a_foreign_file_is_not_taken_for_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(UsageError, match="missing model"):
        checkpoint.load(path)
    torch.save({**minimal_state(1.0), "config": "notadict"}, path)  # resume failed with AttributeError at its keys
    with pytest.raises(UsageError, match=r"not a ddp-trainer checkpoint \(config is 'notadict'\)$"):
        checkpoint.load(path)
    # Crafted fields failed far from here, in tracebacks: the resume check, the RNG, the monitor, the progress.
    for crafted, said in (
        ({"config": {"trainer": "oops"}}, "config.trainer is 'oops'"),
        ({"rng": "x"}, "rng is 'x'"),
        ({"best_metric": "x"}, "best_metric is 'x'"),
        ({"batch_in_epoch": "x"}, "batch_in_epoch is 'x'"),
        ({"step": -5}, "step is -5"),  # NumPy's "expected non-negative integer" as the RNG streams were seeded
        ({"batch_in_epoch": -2}, "batch_in_epoch is -2"),
    ):
        torch.save({**minimal_state(1.0), **crafted}, path)
        with pytest.raises(UsageError, match=f"not a ddp-trainer checkpoint \\({re.escape(said)}\\)$"):
            checkpoint.load(path)
    torch.save({**minimal_state(1.0), "schedule_offset": -45}, path)  # resumed on fewer ranks: longer epochs
    assert checkpoint.load(path)["schedule_offset"] == -45


def test_resume_none_refuses_to_overwrite_a_saved_run(tmp_path):
    atomic.save_atomic(minimal_state(1.0), tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(UsageError, match="trainer.resume=none"):
        checkpoint.load_for_resume("none", tmp_path, print)
    state, path = checkpoint.load_for_resume("auto", tmp_path, print)
    assert path == tmp_path / "checkpoints" / "last.pt" and state["step"] == 2
    assert checkpoint.load_for_resume("auto", tmp_path / "fresh", print) is None


def test_best_alone_is_a_saved_run_auto_goes_on_from_unless_later_steps_were_recorded(tmp_path):
    best = tmp_path / "checkpoints" / "best.pt"
    atomic.save_atomic(minimal_state(1.0), best)  # a kill between the first save's best.pt and last.pt
    with pytest.raises(UsageError, match=f"trainer.resume=none but {best} exists"):
        checkpoint.load_for_resume("none", tmp_path, print)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "step": 2}\n')
    state, path = checkpoint.load_for_resume("auto", tmp_path, print)
    assert path == best and state["step"] == 2
    # last.pt removed by hand after later epochs: going on from best.pt would drop their lines.
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "step": 2}\n{"epoch": 2, "step": 4}\n')
    with pytest.raises(UsageError, match=f"holds best.pt but no last or step checkpoint, .*trainer.resume={best}"):
        checkpoint.load_for_resume("auto", tmp_path, print)


def test_epoch_lines_whose_checkpoints_are_gone_are_not_started_over(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"epoch": 1, "step": 5}\n')  # a crash before the first checkpoint: the new run replaces it
    assert checkpoint.load_for_resume("auto", tmp_path, print) is None
    metrics.write_text('{"epoch": 1, "step": 5}\n{"epoch": 2, "step": 10}\n')
    for resume in ("auto", "none", str(tmp_path / "elsewhere.pt")):
        with pytest.raises(UsageError, match=f"{metrics} holds 2 epoch lines of a run whose checkpoints are gone"):
            checkpoint.load_for_resume(resume, tmp_path, print)


def test_resume_from_a_path_never_trains_over_another_runs_checkpoints(tmp_path):
    elsewhere, last = tmp_path / "other.pt", tmp_path / "run" / "checkpoints" / "last.pt"
    atomic.save_atomic({**minimal_state(1.0), "step": 7}, elsewhere)
    state, path = checkpoint.load_for_resume(str(elsewhere), tmp_path / "run", print)  # nothing there yet
    assert (path, state["step"]) == (elsewhere, 7)
    atomic.save_atomic({**minimal_state(2.0), "config": {"trainer": {"resume": "auto"}}}, last)
    with pytest.raises(UsageError, match=f"trainer.resume={elsewhere}, but .* would overwrite .*last.pt"):
        checkpoint.load_for_resume(str(elsewhere), tmp_path / "run", print)
    assert checkpoint.load_for_resume(str(last), tmp_path / "run", print)[1] == last  # the run's own newest
    # The run started from elsewhere saved, then was requeued with the same command: it goes on from its own save.
    atomic.save_atomic({**minimal_state(3.0), "config": {"trainer": {"resume": str(elsewhere)}}}, last)
    state, path = checkpoint.load_for_resume(str(elsewhere), tmp_path / "run", print)
    assert path == last and torch.equal(state["model"]["w"], torch.full((3,), 3.0))


def step_state(step: int) -> dict:
    return {**minimal_state(float(step)), "step": step}


@pytest.mark.parametrize("named", ["output_dir", "checkpoints"])
def test_a_run_folder_named_as_the_checkpoint_is_refused_naming_the_checkpoint_inside(tmp_path, named):
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    checkpoint.save_last(step_state(5), last.parent, keep_last=1)
    folder = last.parent.parent if named == "output_dir" else last.parent
    with pytest.raises(UsageError) as refused:
        checkpoint.load_for_resume(str(folder), tmp_path / "new", print)
    assert (
        str(refused.value) == f"checkpoint {folder} is a folder of checkpoints, not one; name one of them, e.g. {last}"
    )
    with pytest.raises(UsageError, match="is a folder of checkpoints"):
        checkpoint.load(folder)


def test_last_is_also_the_newest_step_file_and_only_keep_last_are_kept(tmp_path):
    for step in (5, 10, 15, 20):
        checkpoint.save_last(step_state(step), tmp_path, keep_last=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.pt", "step-00000015.pt", "step-00000020.pt"]
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "step-00000020.pt")
    checkpoint.save_last(step_state(25), tmp_path, keep_last=0)
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 25


def test_steps_past_eight_digits_are_kept_in_step_order(tmp_path):
    for step in (99_999_999, 100_000_000):  # "step-100000000.pt" sorts before "step-99999999.pt" as text
        checkpoint.save_last(step_state(step), tmp_path, keep_last=1)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.pt", "step-100000000.pt"]
    (tmp_path / ".step-100000005.pt.x1y2.tmp").write_bytes(b"PK\x03\x04 half")
    assert checkpoint.remove_unfinished_writes(tmp_path) == [tmp_path / ".step-100000005.pt.x1y2.tmp"]


def test_files_and_folders_the_user_put_beside_the_checkpoints_are_never_deleted_or_resumed(tmp_path):
    directory = tmp_path / "checkpoints"
    checkpoint.save_last(step_state(5), directory, keep_last=1)
    copies = ["step-00000005 (copy).pt", "step-00000005-keep.pt", "step-99999999.pt.bak"]
    for name in copies:
        (directory / name).write_bytes((directory / "last.pt").read_bytes())
    (directory / "step-00000001-notes").mkdir()
    (directory / "step-00000001-notes" / "notes.txt").write_text("mine")
    checkpoint.save_last(step_state(10), directory, keep_last=1)
    written = tmp_path / "written"
    written.mkdir()
    checkpoint.publish_folder(written, directory / "step-00000010", ["last"], keep_last=1)
    assert all((directory / name).is_file() for name in copies)
    assert (directory / "step-00000001-notes" / "notes.txt").read_text() == "mine"
    assert not (directory / "step-00000005.pt").exists()  # the trainer's own older step file went
    (directory / "last").unlink()
    (directory / "last.pt").unlink()
    assert checkpoint.load_for_resume("auto", tmp_path, print)[1].name == "step-00000010.pt"


def test_an_unreadable_last_falls_back_to_the_newest_readable_step_file(tmp_path):
    directory = tmp_path / "checkpoints"
    for step in (5, 10, 15):
        checkpoint.save_last(step_state(step), directory, keep_last=3)
    (directory / "last.pt").unlink()
    (directory / "last.pt").write_bytes(b"")  # e.g. a disk that lost the data of the newest file
    (directory / "step-00000015.pt").write_bytes(b"\x00" * 10)
    reports: list[str] = []
    state, path = checkpoint.load_for_resume("auto", tmp_path, reports.append)
    assert (path.name, state["step"]) == ("step-00000010.pt", 10)
    assert len(reports) == 2 and all("unreadable" in line and "\n" not in line for line in reports)


def test_no_readable_checkpoint_stops_instead_of_starting_over(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"truncated")
    with pytest.raises(UsageError, match="no readable checkpoint"):
        checkpoint.load_for_resume("auto", tmp_path, lambda line: None)


def test_a_malicious_last_is_refused_not_skipped(tmp_path):
    directory = tmp_path / "checkpoints"
    checkpoint.save_last(step_state(5), directory, keep_last=2)
    (directory / "last.pt").unlink()
    torch.save({**step_state(10), "payload": RunsCode()}, directory / "last.pt")
    with pytest.raises(UsageError, match="refused"):
        checkpoint.load_for_resume("auto", tmp_path, print)


def test_unfinished_writes_are_removed_and_finished_checkpoints_kept(tmp_path):
    checkpoint.save_last(step_state(5), tmp_path, keep_last=2)
    names = [".step-00000010.pt.x1y2.tmp", ".last.pt.4242.link", ".best.pt.a.tmp"]  # as save_atomic/save_last name them
    interrupted = [tmp_path / name for name in names]
    for path in interrupted:
        path.write_bytes(b"PK\x03\x04 half")
    (tmp_path / ".important.tmp").write_text("a user's")  # `.*.tmp` that no save writes: deleted, before
    (tmp_path / ".cache.tmp").mkdir()
    assert checkpoint.remove_unfinished_writes(tmp_path) == sorted(interrupted)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        ".cache.tmp",
        ".important.tmp",
        "last.pt",
        "step-00000005.pt",
    ]
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 5


@pytest.mark.parametrize(("umask", "mode"), [(0o077, 0o600), (0o002, 0o664)])
def test_a_checkpoint_is_as_open_as_the_users_umask_makes_files(tmp_path, umask, mode):
    code = "import sys, torch; from pathlib import Path; from ddp_trainer import atomic; "
    code += "atomic.save_atomic({'w': torch.ones(1)}, Path(sys.argv[1]))"
    path = tmp_path / "last.pt"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, preexec_fn=lambda: os.umask(umask))
    assert stat.S_IMODE(path.stat().st_mode) == mode  # was 0o644 whatever the umask: world-readable weights
