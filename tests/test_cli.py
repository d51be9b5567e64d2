"""The command line: one-line errors with exit code 2, user factories, help."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import socket
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
from conftest import REPO_DIR, cli_env, read_metrics
from dist_helpers import spawn, train_waiting_briefly_for_the_folder

from ddp_trainer import claim
from ddp_trainer.cli.train import main
from ddp_trainer.errors import UsageError, say


@pytest.mark.parametrize("command", ["evaluate", "predict", "consolidate", "plot"])
def test_each_command_runs_as_its_own_module_too(command, tmp_path):
    # `python -m ddp_trainer.cli.evaluate` imported the module, did nothing and exited 0.
    missing = tmp_path / "missing.pt"
    args = {"evaluate": ["--checkpoint", str(missing)], "predict": ["--checkpoint", str(missing), "--split", "val"]}
    args["consolidate"] = ["--checkpoint", str(missing), "--output", str(tmp_path / "out.pt")]
    args["plot"] = [str(missing)]
    module = [sys.executable, "-m", f"ddp_trainer.cli.{command}", *args[command]]
    result = subprocess.run(module, capture_output=True, text=True, timeout=60, env=cli_env(), cwd=REPO_DIR)
    assert result.returncode == 2
    assert result.stderr.startswith(f"ddp-train {command}: error: ") and str(missing) in result.stderr
    assert result.stderr.count("\n") == 1


def test_misspelt_key_exits_2_with_one_line_naming_it(tmp_path, capsys):
    assert main(["--config", "configs/digits_mlp.yaml", f"output_dir={tmp_path}", "trainer.epochz=3"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "'trainer.epochz'" in error
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize("word", ["evalute", "doctor"])
def test_a_word_that_is_no_command_is_named_with_the_commands(capsys, word):
    # It was read as an override: "override 'doctor' is not of the form key=value".
    assert main([word, "--checkpoint", "x.pt"]) == 2
    said = f"ddp-train: error: {word!r} is neither a command (evaluate, predict, plot, consolidate) nor a key=value"
    assert capsys.readouterr().err == f"{said} override\n"


def test_missing_config_file_exits_2(capsys):
    assert main(["--config", "configs/nope.yaml"]) == 2
    assert "configs/nope.yaml does not exist" in capsys.readouterr().err


def test_a_config_from_a_pipe_is_read_and_a_second_config_flag_is_refused(tmp_path, capsys):
    # `--config <(...)`: a pipe was "does not exist"; a second --config silently replaced the first.
    read_end, write_end = os.pipe()
    os.write(write_end, b"trainer:\n  epochs: 0\n")
    os.close(write_end)
    try:
        assert main(["--config", f"/dev/fd/{read_end}", f"output_dir={tmp_path}"]) == 2
    finally:
        os.close(read_end)
    assert capsys.readouterr().err.startswith("ddp-train: error: config key 'trainer.epochs' has invalid value 0")
    with pytest.raises(SystemExit) as refused:
        main(["--config", "configs/digits_mlp.yaml", "--config", "configs/fashion_mnist_mlp.yaml"])
    assert refused.value.code == 2
    assert capsys.readouterr().err.endswith(
        "error: --config given 2 times (configs/digits_mlp.yaml, configs/fashion_mnist_mlp.yaml): give one recipe, "
        "changes as key=value\n"
    )


def test_an_output_dir_that_cannot_be_looked_up_is_one_line(tmp_path, capsys):
    named = tmp_path / ("a" * 300)  # longer than a file name may be: a traceback, exit 1
    assert main(["trainer.device=cpu", f"output_dir={named}"]) == 2
    assert capsys.readouterr().err == f"ddp-train: error: output_dir={named} cannot be written: File name too long\n"


def test_user_dataset_and_model_factories_train(tmp_path):
    args = ["data._target_=factories.blobs", "data.val_size=41", "model._target_=factories.small_net", "model.hidden=4"]
    options = ["trainer.epochs=3", "trainer.device=cpu", "data.batch_size=8", "optim.lr=0.02"]
    assert main([*args, *options, f"output_dir={tmp_path}"]) == 0
    lines = read_metrics(tmp_path)
    assert [line["val/samples"] for line in lines] == [41, 41, 41]
    assert lines[-1]["val/accuracy"] > 0.8


def test_factory_returning_the_wrong_thing_is_named(tmp_path, capsys):
    assert main(["model._target_=factories.blobs", f"output_dir={tmp_path}", "trainer.device=cpu"]) == 2
    assert "model._target_=factories.blobs returned tuple, not an nn.Module" in capsys.readouterr().err


def test_module_entry_point_prints_help():
    result = subprocess.run(
        [sys.executable, "-m", "ddp_trainer.train", "--help"],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO_DIR,
    )
    assert result.returncode == 0
    assert "key=value" in result.stdout


def run_with_terminal_stderr(args: list[str]) -> str:
    """Run the CLI with stderr on a pseudo-terminal, as a person at a shell sees it; return what it drew."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a fresh pty is 0 columns wide
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO once the child has closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    command = [sys.executable, "-m", "ddp_trainer.train", *args]
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=terminal, env=cli_env(), cwd=REPO_DIR)
    os.close(terminal)
    reader.join(timeout=10)
    os.close(controller)
    assert result.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def test_a_python_without_torch_is_one_line_naming_it_not_a_traceback():
    # A batch script's PYTHON that finds ddp_trainer (srun's working directory) but not its dependencies: -S leaves
    # site-packages, and torch with them, out.
    command = [sys.executable, "-S", "-m", "ddp_trainer.train", "--config", "configs/digits_mlp.yaml"]
    result = subprocess.run(command, capture_output=True, text=True, env=cli_env(), cwd=REPO_DIR, timeout=60)
    assert result.returncode == 2
    assert result.stderr == (
        f"ddp-train: error: {sys.executable} cannot import torch: run the Python that has ddp-trainer's dependencies "
        "(the sbatch scripts take it from PYTHON, e.g. PYTHON=.venv/bin/python)\n"
    )


def test_progress_bar_is_drawn_on_a_terminal_and_not_in_logs(tmp_path):
    args = ["--config", "configs/digits_mlp.yaml", "trainer.epochs=2", "trainer.device=cpu"]
    drawn = run_with_terminal_stderr([*args, f"output_dir={tmp_path / 'tty'}"])
    assert "epoch 1/2" in drawn and "epoch 2/2" in drawn and "/45 [" in drawn and "loss=" in drawn
    logged = subprocess.run(
        [sys.executable, "-m", "ddp_trainer.train", *args, f"output_dir={tmp_path / 'log'}"],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO_DIR,
    )
    assert logged.returncode == 0
    assert "/45 [" not in logged.stderr and "epoch 2/2 step 90" in logged.stdout


def test_overrides_may_stand_on_both_sides_of_the_config_flag(tmp_path):
    args = ["trainer.epochs=1", "--config", "configs/digits_mlp.yaml", "trainer.device=cpu", f"output_dir={tmp_path}"]
    assert main(args) == 0
    assert len(read_metrics(tmp_path)) == 1


class RecordingRaw(io.RawIOBase):
    """A raw stream that keeps each write it receives: one write is one system call on a real pipe."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.writes.append(bytes(data))
        return len(data)


def test_a_rank_line_reaches_an_unbuffered_pipe_in_one_write():
    # What `python -u` / PYTHONUNBUFFERED gives every rank: print() would send the newline separately,
    # letting another rank's line land in between (seen from --doctor on 2 ranks).
    raw = RecordingRaw()
    say("doctor rank 1/2 (local 1)", io.TextIOWrapper(raw, write_through=True))
    assert raw.writes == [b"doctor rank 1/2 (local 1)\n"]


def test_a_second_run_into_a_folder_in_use_is_refused_and_leaves_the_first_runs_files_alone(
    tmp_path, monkeypatch, capsys
):
    # Two sweep trials given one output_dir used to train side by side: one metrics.jsonl of both, checkpoints
    # overwriting each other. The first run here is another process holding the folder as a run does.
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", CLAIM_AND_WAIT, str(run_dir)], stdout=subprocess.PIPE, text=True, env=cli_env()
    )
    try:
        assert holder.stdout.readline() == "claimed\n"
        (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
        monkeypatch.setattr(claim, "WAIT_S", 0.5)
        assert main(["trainer.device=cpu", "trainer.epochs=1", f"output_dir={run_dir}"]) == 2
        error, holder_name = capsys.readouterr().err.splitlines(), f"pid {holder.pid} on {socket.gethostname()}"
        assert error[0] == f"output_dir {run_dir} is in use by {holder_name}: waiting up to 0.5 s"
        assert error[1:] == [
            f"ddp-train: error: output_dir {run_dir} is in use by another run ({holder_name}); wait for it to end or "
            "use another output_dir"
        ]
        assert sorted(path.name for path in run_dir.iterdir()) == [".lock", "metrics.jsonl"]
        assert (run_dir / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    finally:
        holder.kill()
        holder.wait()
    (run_dir / "metrics.jsonl").unlink()  # the holder was killed: the kernel let its lock go with it
    assert main(["trainer.device=cpu", "trainer.epochs=1", "trainer.progress_bar=false", f"output_dir={run_dir}"]) == 0
    assert [line["epoch"] for line in read_metrics(run_dir)] == [1]
    first = claim.FolderClaim(run_dir)
    try:
        with pytest.raises(UsageError, match="in use by another run in this process"):  # lockf would grant it again
            claim.FolderClaim(run_dir)
    finally:
        first.release()


def test_a_folder_in_use_is_refused_on_every_rank_in_the_same_words(tmp_path):
    # Rank 0 alone holds the folder: it was refused, and rank 1 said "rank 0 ... stopped answering", exit 4.
    run_dir = tmp_path / "run"
    held = claim.FolderClaim(run_dir)  # this process's hold: the ranks are others
    try:
        args = ["trainer.device=cpu", "trainer.epochs=1", f"output_dir={run_dir}"]
        spawn(2, train_waiting_briefly_for_the_folder, args, 0.5, str(tmp_path))
    finally:
        held.release()
    said = f"output_dir {run_dir} is in use by another run (pid {os.getpid()} on {socket.gethostname()}); wait for it"
    for rank in (0, 1):
        code, *lines = (tmp_path / f"rank{rank}").read_text().splitlines()
        assert code == "2" and lines[-1].startswith(f"ddp-train: error (rank {rank}): {said}"), lines
    assert not run_dir.exists()  # the hold made it; released with nothing else inside, it is gone


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl"])
def test_a_link_left_in_the_output_dir_is_refused_never_written_through(tmp_path, capsys, name):
    # Another user's link in a shared folder: the run truncated .lock's target and appended its epochs to metrics'.
    run_dir, victim = tmp_path / "shared", tmp_path / "victim"
    run_dir.mkdir()
    victim.write_text("keep me\n")
    (run_dir / name).symlink_to(victim)
    assert main(["trainer.device=cpu", "trainer.epochs=1", f"output_dir={run_dir}"]) == 2
    assert f"{run_dir / name} is a symbolic link, which a run never writes through" in capsys.readouterr().err
    assert victim.read_text() == "keep me\n" and sorted(path.name for path in run_dir.iterdir()) == [name]


CLAIM_AND_WAIT = (
    "import sys, time; from pathlib import Path; from ddp_trainer.claim import FolderClaim; "
    "held = FolderClaim(Path(sys.argv[1])); print('claimed', flush=True); time.sleep(60)"
)


@pytest.fixture
def read_only_mount():
    """Makes a file or folder a read-only bind mount of itself (root alone may, else it skips); unmounted after."""
    mounted = []

    def mount(path: Path) -> None:
        bound = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
        if bound.returncode != 0:
            pytest.skip(f"cannot mount here: {bound.stderr.strip()}")
        mounted.append(path)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path), str(path)], check=True)

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("name", ["checkpoints", "metrics.jsonl"])
def test_a_read_only_output_is_refused_before_training(tmp_path, capsys, read_only_mount, name):
    # Root writes through any mode bits, not through a read-only mount: the first save or line failed, an epoch in.
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "metrics.jsonl").write_text("")
    read_only_mount(tmp_path / name)
    assert main(["trainer.device=cpu", f"output_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == (
        f"ddp-train: error: output_dir={tmp_path} cannot be written: {tmp_path / name} is not writable\n"
    )
    assert not any((tmp_path / "checkpoints").iterdir()) and (tmp_path / "metrics.jsonl").read_text() == ""


@pytest.mark.parametrize(("name", "folder"), [("metrics.jsonl", True), ("checkpoints", False), ("tensorboard", False)])
def test_an_output_of_the_wrong_kind_in_output_dir_is_one_line_before_training(tmp_path, capsys, name, folder):
    if folder:
        (tmp_path / name).mkdir()
    else:
        (tmp_path / name).write_text("mine")
    assert main(["trainer.device=cpu", "logging.tensorboard=true", f"output_dir={tmp_path}"]) == 2
    kind = "a folder" if folder else "a file"
    assert (
        capsys.readouterr().err
        == f"ddp-train: error: output_dir={tmp_path} cannot be written: {tmp_path / name} is {kind}\n"
    )
