"""Sharded checkpoints (trainer.strategy=fsdp) in one process: folders, consolidation, fallback, code never run."""

from __future__ import annotations

import errno
import os
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem
from conftest import read_metrics
from dist_helpers import record_resume_choice, spawn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager

from ddp_trainer import checkpoint, saving
from ddp_trainer.cli.train import main
from ddp_trainer.errors import CheckpointWriteFailed, UsageError

FSDP = ["--config", "configs/digits_mlp.yaml", "trainer.device=cpu", "model.hidden_sizes=[64]", "trainer.strategy=fsdp"]
RUN = [*FSDP, "trainer.fsdp_wrap=[Linear]", "checkpoint.every_n_steps=20", "optim.scheduler=none"]


class RunsCode:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def folders(directory) -> list[str]:
    return sorted(
        path.name if not path.is_symlink() else f"{path.name}->{os.readlink(path)}" for path in directory.iterdir()
    )


def test_sharded_run_consolidates_into_a_file_that_evaluates_and_resumes_alike(tmp_path, capsys):
    assert main([*RUN, "trainer.epochs=2", "checkpoint.keep_last=1", f"output_dir={tmp_path / 'run'}"]) == 0
    saved = tmp_path / "run" / "checkpoints"
    assert folders(saved) == ["best->step-00000090", "last->step-00000090", "step-00000090"]  # keep_last=1
    assert sorted(os.listdir(saved / "last")) == [".metadata", "__0_0.distcp", "state.pt"]
    consolidated = tmp_path / "model.pt"
    assert main(["consolidate", "--checkpoint", str(saved / "best"), "--output", str(consolidated)]) == 0
    assert f"wrote {consolidated}: epoch 2, step 90, 4,810 model values (weights, buffers)" in capsys.readouterr().out
    plain = torch.load(consolidated, weights_only=True)
    assert list(plain["model"]) == ["1.weight", "1.bias", "3.weight", "3.bias"] and plain["step"] == 90
    assert list(plain["optimizer"]["state"]) == list(plain["model"])  # keyed by name: any world size reads it
    assert main(["consolidate", "--checkpoint", str(saved / "best"), "--output", str(consolidated)]) == 2
    assert "exists; consolidate never overwrites" in capsys.readouterr().err
    for source, output, said in (
        (saved / "gone", tmp_path / "x.pt", f"--checkpoint {saved / 'gone'} does not exist"),
        (saved / "best", consolidated / "x.pt", f"cannot write --output {consolidated / 'x.pt'}: File exists"),
        (saved / "best", saved / "last.pt", f"--output {saved / 'last.pt'} is inside a run's checkpoints folder"),
    ):
        assert main(["consolidate", "--checkpoint", str(source), "--output", str(output)]) == 2
        assert said in capsys.readouterr().err

    evaluated = []
    for path in (saved / "best", consolidated):
        assert main(["evaluate", "--checkpoint", str(path), "--json"]) == 0
        evaluated.append(capsys.readouterr().out.split('"metrics": ')[1].split("}")[0])
    assert evaluated[0] == evaluated[1] and '"val/samples": 359' in evaluated[0]
    # From the consolidated file and from the folder, one more epoch ends at the same weights.
    more = [*RUN, "trainer.epochs=3"]
    assert main([*more, f"output_dir={tmp_path / 'file'}", f"trainer.resume={consolidated}"]) == 0
    assert main([*more, f"output_dir={tmp_path / 'run'}"]) == 0
    from_file, from_folder = (checkpoint.load(tmp_path / name / "checkpoints" / "last") for name in ("file", "run"))
    assert from_file["step"] == from_folder["step"] == 135
    for name, weight in from_folder["model"].items():
        assert torch.equal(from_file["model"][name], weight), name
    assert read_metrics(tmp_path / "file")[-1]["val/loss"] == read_metrics(tmp_path / "run")[-1]["val/loss"]


@pytest.mark.parametrize("room_kib", [16, 24, 32, 40])  # where the disk fills: in a shard, or in state.pt
def test_a_sharded_checkpoint_on_a_full_disk_says_so_in_one_line(tmp_path, full_mount, capsys, room_kib):
    # DCP's shards go through torch's zip writer, which drops the failed write's OSError: the line said only
    # "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598".
    full_mount()
    filler = tmp_path / "disk" / "filler"
    os.truncate(filler, filler.stat().st_size - room_kib * 1024)  # config.yaml and the line fit, a checkpoint not
    output_dir = tmp_path / "disk" / "run"
    assert main([*FSDP, "trainer.epochs=1", f"output_dir={output_dir}"]) == 1
    said = capsys.readouterr().err.splitlines()[-1]
    assert said.startswith(f"ddp-train: error: could not write checkpoint {output_dir / 'checkpoints'}/step-")
    full = ("OSError: [Errno 28] No space left on device", "a write came up short: no space left on the device")
    assert any(f"({cause}" in said for cause in full), said


def test_consolidate_never_replaces_an_output_that_appears_as_it_reads(tmp_path, capsys, monkeypatch):
    # It checked the name first, then renamed its file over whatever had taken the name since.
    output = tmp_path / "model.pt"
    (tmp_path / "sharded").mkdir()

    def read_while_another_writes(path):
        output.write_text("another program's file")
        return {"model": {}, "epoch": 1, "step": 1}

    monkeypatch.setattr(checkpoint, "load", read_while_another_writes)
    assert main(["consolidate", "--checkpoint", str(tmp_path / "sharded"), "--output", str(output)]) == 2
    assert capsys.readouterr().err.endswith(f"--output {output} exists; consolidate never overwrites a file\n")
    assert output.read_text() == "another program's file" and sorted(os.listdir(tmp_path)) == ["model.pt", "sharded"]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun every rank wrote the file, the last one's kept
    assert main(["consolidate", "--checkpoint", str(tmp_path / "sharded"), "--output", str(tmp_path / "x.pt")]) == 2
    assert "consolidate runs in one process: start it without torchrun or srun" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("cut_file", "named"),
    [("state.pt", "state.pt is unreadable"), ("__0_0.distcp", "is unreadable (__0_0.distcp holds 8 of its ")],
)
def test_unreadable_newest_folder_falls_back_and_unfinished_folders_are_removed(tmp_path, capsys, cut_file, named):
    args = [*RUN, f"output_dir={tmp_path}"]
    assert main([*args, "trainer.epochs=1"]) == 0
    saved = tmp_path / "checkpoints"
    assert folders(saved) == ["best->step-00000045", "last->step-00000045", "step-00000040", "step-00000045"]
    (saved / "step-00000045" / cut_file).write_bytes(b"PK\x03\x04 cut")  # a copy cut off after 8 bytes
    (saved / ".step-00000060.tmp").mkdir()  # a save that a crash interrupted
    capsys.readouterr()
    assert main([*args, "trainer.epochs=2"]) == 0
    output = capsys.readouterr().out
    assert output.count(f"checkpoint {saved / 'step-00000045'}") == 1 and named in output  # once: `last` names it
    assert f"removed {saved / '.step-00000060.tmp'}" in output
    assert f"resumed from {saved / 'step-00000040'}: step 40, epochs done: 0" in output
    assert [line["epoch"] for line in read_metrics(tmp_path)] == [1, 2]  # epoch 1 written again, from step 40 on


def test_a_folder_whose_metadata_or_values_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "checkpoints" / "step-00000001"
    dcp.save({"model": {"w": torch.ones(2)}, "optimizer": {"lr": RunsCode(str(marker))}}, checkpoint_id=folder)
    torch.save({"epoch": 0, "step": 1, "config": {}}, folder / checkpoint.SHARDED_STATE)
    state = checkpoint.read_state(folder)  # the state file and .metadata hold nothing but data
    assert state["step"] == 1
    with pytest.raises(UsageError, match=r"refused: it holds objects that could run code .*GLOBAL posix.system"):
        checkpoint.load(folder)  # the optimizer's non-tensor value is read with weights_only
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(str(marker))))
    with pytest.raises(UsageError, match=r"refused: it holds objects that could run code .*GLOBAL posix.system"):
        checkpoint.load_for_resume("auto", tmp_path, print)  # refused, not skipped for an older checkpoint
    assert not marker.exists()


def test_metadata_is_unpickled_once_and_only_through_the_allowlist(tmp_path, monkeypatch):
    # After the allowlist's read, DCP's reader unpickled .metadata again with plain pickle: a file swapped in between
    # (a named pipe serving another pickle on its third open did) ran code.
    assert main([*RUN, "trainer.epochs=1", f"output_dir={tmp_path}"]) == 0

    def plain_pickle(*args, **kwargs):
        raise AssertionError("DCP's reader unpickled .metadata with plain pickle")

    monkeypatch.setattr(torch.distributed.checkpoint.filesystem.pickle, "load", plain_pickle)
    assert checkpoint.load(tmp_path / "checkpoints" / "last")["step"] == 45
    assert main([*RUN, "trainer.epochs=2", "trainer.allow_changes=[trainer.epochs]", f"output_dir={tmp_path}"]) == 0


def test_publishing_keeps_the_newest_folders_and_the_best_one(tmp_path):
    def publish(step: int, names: tuple[str, ...]) -> None:
        written = tmp_path / f".step-{step:08d}.tmp"
        written.mkdir()
        (written / "state.pt").write_text(str(step))
        checkpoint.publish_folder(written, tmp_path / f"step-{step:08d}", names, keep_last=2)

    publish(1, ("last", "best"))
    publish(2, ("last",))
    publish(3, ("last",))
    publish(3, ("last",))  # the same step again (a stop right after a step's save): replaced, not duplicated
    assert folders(tmp_path) == ["best->step-00000001", "last->step-00000003", "step-00000001"] + [
        "step-00000002", "step-00000003"
    ]  # fmt: skip
    publish(4, ("last", "best"))
    assert folders(tmp_path) == ["best->step-00000004", "last->step-00000004", "step-00000003", "step-00000004"]


def test_a_save_that_moves_last_while_it_is_read_never_mixes_two_saves(tmp_path, monkeypatch):
    # Read through the link file by file, last gave one save's state.pt and another save's shards (evaluate,
    # consolidate and a resume alike) in 58 of 300 reads of a live run.
    assert main([*RUN, "trainer.epochs=1", f"output_dir={tmp_path}"]) == 0
    saved = tmp_path / "checkpoints"
    newest, older = sorted(saved.glob("step-*"), reverse=True)[:2]
    expected, real_read_state = checkpoint.load(newest), checkpoint.read_state

    def read_state_as_a_save_moves_last(path):
        state = real_read_state(path)
        os.symlink(older.name, saved / ".last.tmp")
        os.replace(saved / ".last.tmp", saved / "last")  # as publish_folder points it at the next save
        return state

    monkeypatch.setattr(checkpoint, "read_state", read_state_as_a_save_moves_last)
    loaded = checkpoint.load(saved / "last")
    assert loaded["step"] == expected["step"] and os.readlink(saved / "last") == older.name
    for name, value in expected["model"].items():
        assert torch.equal(loaded["model"][name], value), name


def test_a_shard_damaged_inside_is_named_unreadable_and_the_run_goes_on_from_the_folder_before(tmp_path, capsys):
    args = [*RUN, "trainer.epochs=2", f"output_dir={tmp_path}"]
    assert main(args) == 0
    last = (tmp_path / "checkpoints" / "last").resolve()
    with open(next(last.glob("*.distcp")), "r+b") as shard:  # same size: only reading it finds the damage
        shard.write(b"\0" * 64)
    before = max(path for path in (tmp_path / "checkpoints").glob("step-*") if path != last)
    named = [*RUN, f"trainer.resume={last}", f"output_dir={tmp_path / 'from_it'}"]
    assert main(named) == 2  # named by trainer.resume: nothing older to take instead
    assert capsys.readouterr().err.endswith(f"checkpoint {last} is unreadable (not a torch checkpoint file)\n")
    more = [*args, "trainer.epochs=3", "trainer.allow_changes=[trainer.epochs]"]
    assert main(more) == 0
    out = capsys.readouterr().out
    # The shards are read only once the state file and .metadata have passed: the run goes on from the folder before.
    assert f"checkpoint {last} is unreadable (not a torch checkpoint file); trying" in out  # the folder `last` named
    assert f"resumed from {before}: step 80, epochs done: 1" in out  # mid-epoch 2: checkpoint.every_n_steps=20
    assert [line["epoch"] for line in read_metrics(tmp_path)] == [1, 2, 3]


def test_a_rank_lost_in_a_sharded_writes_collectives_is_not_called_a_failed_write(tmp_path):
    # Rank 0 killed while the ranks saved: the others said "could not write checkpoint" and exited 1, not 4.
    folder = tmp_path / "step-00000026"
    lost = dist.DistNetworkError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:39211")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # ranks meet only in a group
    try:
        with pytest.raises(dist.DistNetworkError, match="Connection closed by peer"), saving.failures_named(folder):
            raise CheckpointException("save failed", {1: (lost, None)})
    finally:
        dist.destroy_process_group()
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(CheckpointWriteFailed, match=f"^could not write checkpoint {folder} \\(OSError: .*No space"):
        with saving.failures_named(folder):
            raise CheckpointException("save failed", {0: (full, None)})


def test_a_crash_while_a_step_is_saved_again_leaves_its_checkpoint_in_place(tmp_path):
    # Saved again at its step, a folder is set aside before its successor is renamed in: a crash between the two
    # renames leaves `last` pointing at nothing, and both copies under temporary names.
    final, written = tmp_path / "step-00000045", tmp_path / ".step-00000045.tmp"
    for folder, text in ((tmp_path / f".step-00000045{checkpoint.REPLACED}", "first"), (written, "second")):
        folder.mkdir()
        (folder / "state.pt").write_text(text)
    (tmp_path / "last").symlink_to(final.name)
    assert checkpoint.remove_unfinished_writes(tmp_path) == [written]
    assert (tmp_path / "last" / "state.pt").read_text() == "first"
    assert folders(tmp_path) == ["last->step-00000045", "step-00000045"]


def test_every_rank_resumes_the_checkpoint_a_crash_left_set_aside(tmp_path):
    # The crash above, in a real run; rank 0 puts the folder back late. No rank may take the older step-40 instead.
    args = [*RUN, "trainer.epochs=1", f"output_dir={tmp_path}"]
    assert main(args) == 0
    folder = tmp_path / "checkpoints"
    last = (folder / "last").resolve()
    last.rename(folder / f".{last.name}{checkpoint.REPLACED}")
    spawn(2, record_resume_choice, args, str(tmp_path))
    assert [(tmp_path / f"resumed_rank{rank}.txt").read_text() for rank in (0, 1)] == [last.name, last.name]


@pytest.mark.parametrize("keeps_buffers", [False, True])
def test_async_sharded_saves_go_on_whether_or_not_torch_spends_the_stager(tmp_path, monkeypatch, keeps_buffers):
    # torch 2.11's DefaultStager frees its buffers and tables after each stage (the GPU machine's torch); 2.13 on
    # keeps them for the next save. Here a stager of either kind, and the saver told which torch it runs on.
    if keeps_buffers and not saving.STAGER_KEEPS_BUFFERS:
        pytest.skip(f"torch {torch.__version__}'s stager spends itself after each stage")
    if not keeps_buffers:
        stage = DefaultStager.stage

        def stage_then_spend(self, state_dict, **kwargs):
            staged = stage(self, state_dict, **kwargs)
            self.close()
            return staged

        monkeypatch.setattr(DefaultStager, "stage", stage_then_spend)
    monkeypatch.setattr(saving, "STAGER_KEEPS_BUFFERS", keeps_buffers)
    stagers, async_save = [], dcp.async_save

    def recording_async_save(*args, async_stager, **kwargs):
        stagers.append(async_stager)
        return async_save(*args, async_stager=async_stager, **kwargs)

    monkeypatch.setattr(dcp, "async_save", recording_async_save)
    assert main([*RUN, "trainer.epochs=1", "checkpoint.async_save=true", f"output_dir={tmp_path}"]) == 0
    saved = tmp_path / "checkpoints"
    assert folders(saved) == ["best->step-00000045", "last->step-00000045", "step-00000040", "step-00000045"]
    assert checkpoint.load(saved / "last")["step"] == 45
    assert len(stagers) > 1 and len(set(map(id, stagers))) == (1 if keeps_buffers else len(stagers))
