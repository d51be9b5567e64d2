"""RunLogger in one process: TensorBoard and W&B offline files read back, rank 0 only, lazy imports, the bar."""

from __future__ import annotations

import io
import json
import re
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import tqdm.std
from conftest import REPO_DIR, cli_command, cli_env

from ddp_trainer import atomic, checkpoint
from ddp_trainer.cli.train import main
from ddp_trainer.config import LoggingConfig, WandbConfig
from ddp_trainer.errors import CliError, UsageError
from ddp_trainer.loggers import RunLogger

TENSORBOARD = LoggingConfig(tensorboard=True)
WANDB_OFFLINE = LoggingConfig(wandb=WandbConfig(mode="offline", project="tests"))
RUNNING = [
    (5, {"train/loss": 2.0, "train/accuracy": 0.25, "lr": 0.1}),
    (10, {"train/loss": 1.5, "train/accuracy": 0.5}),
]
EPOCHS = [
    {"epoch": 1, "step": 10, "lr": 0.1, "train/loss": 1.25, "val/loss": 1.75, "val/accuracy": 0.5, "time/epoch_s": 2.0},
    {"epoch": 2, "step": 20, "lr": 0.2, "train/loss": 0.75, "val/loss": 1.5, "val/accuracy": 0.75, "time/epoch_s": 2.0},
]


def log_run(logger: RunLogger, wandb_run_id: str | None = None) -> None:
    """Drive a logger through a two-epoch run with running metrics in the first epoch."""
    logger.start("seed: 0\n", completed_epochs=0, wandb_run_id=wandb_run_id)
    for step, metrics in RUNNING:
        logger.show_running(metrics, step)
    for record in EPOCHS:
        logger.log_epoch(record, epochs=len(EPOCHS))
    logger.finish()


def test_tensorboard_holds_epoch_values_at_their_step_and_running_values_under_step_prefix(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = RunLogger(tmp_path, is_main=True, progress_bar=False, logging_cfg=TENSORBOARD)
    log_run(logger)
    logger.finish()  # a second close, as on an error path after a normal finish, must not fail
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()

    def scalars(tag: str) -> list[tuple[int, float]]:
        return [(event.step, pytest.approx(event.value)) for event in events.Scalars(tag)]

    for name in ("train/loss", "val/loss", "val/accuracy", "lr", "epoch"):
        assert scalars(name) == [(record["step"], record[name]) for record in EPOCHS]
    for name in ("train/loss", "train/accuracy"):
        assert scalars(f"step/{name}") == [(step, metrics[name]) for step, metrics in RUNNING]
    assert scalars("step/lr") == [(5, 0.1)]
    assert "step" not in events.Tags()["scalars"]  # the x axis, not a curve
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == EPOCHS


@pytest.mark.parametrize(
    ("completed", "resumed_step", "running_loss", "val_loss"),
    [
        (1, 10, [(5, 2.0), (10, 1.5), (15, 1.0)], [(10, 1.75), (20, 1.25)]),  # resumed from epoch 1's checkpoint
        (0, 0, [(15, 1.0)], [(20, 1.25)]),  # no checkpoint yet: the run starts over, and so do its curves
        # Stopped at max_steps=20 inside epoch 2, whose part-epoch line goes: so do its points, at the step resumed.
        (1, 20, [(5, 2.0), (10, 1.5), (15, 1.0)], [(10, 1.75), (20, 1.25)]),
    ],
)
def test_tensorboard_of_a_restarted_run_drops_what_the_crashed_attempt_logged_after_the_checkpoint(
    tmp_path, completed, resumed_step, running_loss, val_loss
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_run(RunLogger(tmp_path, is_main=True, progress_bar=False, logging_cfg=TENSORBOARD))  # crashed after step 20
    resumed = RunLogger(tmp_path, is_main=True, progress_bar=False, logging_cfg=TENSORBOARD)
    resumed.start("seed: 0\n", completed_epochs=completed, resumed_step=resumed_step)
    resumed.show_running({"train/loss": 1.0, "train/accuracy": 0.6}, 15)
    resumed.log_epoch({**EPOCHS[1], "val/loss": 1.25}, epochs=2)
    resumed.finish()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("step/train/loss")] == running_loss
    assert [(event.step, event.value) for event in events.Scalars("val/loss")] == val_loss


def read_wandb_records(run_file: Path) -> list:
    """The protobuf records of a .wandb file (LevelDB log format: 32 KiB blocks of CRC, length, type, data)."""
    from wandb.proto import wandb_internal_pb2

    data, block, header_size = run_file.read_bytes(), 32 * 1024, 7
    position, pending, records = header_size, b"", []  # past the file header ":W&B", magic, version
    while position + header_size <= len(data):
        if block - position % block < header_size:
            position += block - position % block  # a block's tail too short for a header is padding
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + header_size])
        if position + header_size + length > len(data):
            break  # a record the writer has not finished yet
        pending += data[position + header_size : position + header_size + length]
        position += header_size + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def finished_run_records(run_file: Path, timeout_s: float = 60.0) -> list:
    """The records of a finished run's .wandb file, once its writer (wandb's service process) has flushed the exit.

    `finish()` can return before the service has written the last records; the exit record comes last.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_records(run_file) if run_file.exists() else []
        if any(record.HasField("exit") for record in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


@pytest.fixture
def wandb_offline_env(tmp_path, monkeypatch):
    """W&B quiet, offline and with its caches in tmp_path: no network, nothing written to the home directory."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb_home"))
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)


def test_wandb_offline_run_records_config_and_epoch_metrics_at_their_step(tmp_path, wandb_offline_env):
    run_config = {"optim": {"lr": 0.1}, "seed": 0}
    logger = RunLogger(tmp_path, is_main=True, progress_bar=False, logging_cfg=WANDB_OFFLINE, run_config=run_config)
    log_run(logger)

    (run_file,) = (tmp_path / "wandb").glob(f"offline-run-*-{logger.wandb_run_id}/run-{logger.wandb_run_id}.wandb")
    records = finished_run_records(run_file)
    (run,) = [record.run for record in records if record.HasField("run")]
    assert {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"} == run_config
    assert run.project == "tests"
    history = [record.history for record in records if record.HasField("history")]
    rows = [{"/".join(item.nested_key): json.loads(item.value_json) for item in row.item} for row in history]
    epoch_rows = [{key: row[key] for key in EPOCHS[0]} for row in rows if "val/loss" in row]
    assert epoch_rows == EPOCHS
    running_rows = [(row["step"], row["step/train/loss"]) for row in rows if "step/train/loss" in row]
    assert running_rows == [(step, metrics["train/loss"]) for step, metrics in RUNNING]


def test_wandb_run_that_failed_is_marked_with_its_exit_code(tmp_path, wandb_offline_env):
    logger = RunLogger(tmp_path, is_main=True, progress_bar=False, logging_cfg=WANDB_OFFLINE)
    logger.start("seed: 0\n", completed_epochs=0)
    logger.finish(exit_code=3)
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert [record.exit.exit_code for record in finished_run_records(run_file) if record.HasField("exit")] == [3]


def test_wandb_restart_after_an_attempt_that_crashed_before_its_first_checkpoint_continues_its_run(
    tmp_path, wandb_offline_env
):
    # The attempt's id was only ever stored in checkpoints: the restart began a second run, which `wandb sync` uploads.
    crashed = RunLogger(tmp_path, is_main=True, progress_bar=False, logging_cfg=WANDB_OFFLINE)
    crashed.start("seed: 0\n", completed_epochs=0)
    crashed.finish(exit_code=1)
    restarted = RunLogger(tmp_path, is_main=True, progress_bar=False, logging_cfg=WANDB_OFFLINE)
    log_run(restarted)
    assert crashed.wandb_run_id and restarted.wandb_run_id == crashed.wandb_run_id
    assert {path.name for path in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")} == {
        f"run-{crashed.wandb_run_id}.wandb"
    }


def test_wandb_run_started_afresh_where_one_finished_is_a_run_of_its_own(tmp_path, wandb_offline_env):
    # Its checkpoints deleted, or trainer.resume=none: the new training was appended to the finished one.
    finished = RunLogger(tmp_path, is_main=True, progress_bar=False, logging_cfg=WANDB_OFFLINE)
    log_run(finished)
    fresh = RunLogger(tmp_path, is_main=True, progress_bar=False, logging_cfg=WANDB_OFFLINE)
    log_run(fresh)
    assert fresh.wandb_run_id not in (None, finished.wandb_run_id)


def test_a_finished_run_run_again_adds_no_file(tmp_path, wandb_offline_env):
    args = ["--config", "configs/digits_mlp.yaml", "trainer.device=cpu", "trainer.epochs=1", f"output_dir={tmp_path}"]
    args += ["logging.tensorboard=true", "logging.wandb.mode=offline"]
    assert main(args) == 0
    files = set(tmp_path.rglob("*"))
    assert main(args) == 0  # nothing to train: it said so, and opened no logger (an empty event file, W&B run part)
    assert set(tmp_path.rglob("*")) == files


def test_wandb_restart_with_the_stored_id_continues_the_same_run(tmp_path, wandb_offline_env):
    first = RunLogger(tmp_path, is_main=True, progress_bar=False, logging_cfg=WANDB_OFFLINE)
    log_run(first)
    resumed = RunLogger(tmp_path, is_main=True, progress_bar=False, logging_cfg=WANDB_OFFLINE)
    log_run(resumed, wandb_run_id=first.wandb_run_id)

    assert first.wandb_run_id and resumed.wandb_run_id == first.wandb_run_id
    run_files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [path.name for path in run_files] == [f"run-{first.wandb_run_id}.wandb"] * 2
    # `wandb sync` accepts the run folder as written and finds both pieces of the one run.
    sync = subprocess.run(
        [sys.executable, "-m", "wandb", "sync", "--dry-run", str(tmp_path / "wandb")],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
    )
    assert sync.returncode == 0, sync.stderr
    assert (sync.stdout + sync.stderr).count(f"run-{first.wandb_run_id}.wandb") == 2


def test_the_config_keys_turn_the_loggers_on_and_the_bar_off_for_a_run(tmp_path, wandb_offline_env, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    keys = ["logging.tensorboard=true", "logging.wandb.mode=offline", "logging.wandb.project=keys"]
    keys += ["logging.wandb.name=digits-1", "logging.wandb.entity=team", "trainer.progress_bar=false"]
    args = ["--config", "configs/digits_mlp.yaml", "trainer.device=cpu", "trainer.epochs=1", *keys]
    assert main([*args, f"output_dir={tmp_path}"]) == 0
    assert "/45 [" not in terminal.getvalue()  # on a terminal, where the bar is drawn by default
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("val/accuracy")] == [45]
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    (run,) = [record.run for record in finished_run_records(run_file) if record.HasField("run")]
    assert (run.project, run.display_name, run.entity) == ("keys", "digits-1", "team")


def test_the_bar_of_a_resumed_epoch_starts_at_the_batches_it_had_trained(tmp_path, monkeypatch):
    args = ["--config", "configs/digits_mlp.yaml", "trainer.device=cpu", "trainer.epochs=1", f"output_dir={tmp_path}"]
    assert main([*args, "trainer.max_steps=20"]) == 0  # stops 20 batches into the epoch's 45
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main([*args, "trainer.allow_changes=[trainer.max_steps]"]) == 0
    drawn = [int(count) for count in re.findall(r"(\d+)/45 \[", terminal.getvalue())]
    assert drawn[0] == 20 and min(drawn) == 20, drawn


def test_non_main_rank_writes_nothing(tmp_path):
    logging_cfg = LoggingConfig(tensorboard=True, wandb=WandbConfig(mode="offline"))
    logger = RunLogger(tmp_path / "run", is_main=False, progress_bar=True, logging_cfg=logging_cfg)
    log_run(logger, wandb_run_id="abc123")
    assert not (tmp_path / "run").exists()
    assert logger.tensorboard is None and logger.wandb_run is None
    assert logger.wandb_run_id == "abc123"  # still handed on, so a checkpoint never loses the run's id


def test_a_folder_that_cannot_be_made_is_one_line_naming_output_dir(tmp_path):
    # The run's up-front check cannot judge every folder (/proc/x passes os.access as root): the write says it.
    (tmp_path / "taken").write_text("a file, not a folder")
    logger = RunLogger(tmp_path / "taken" / "run", is_main=True, progress_bar=False)
    with pytest.raises(UsageError, match=r"^output_dir=.*taken/run cannot be written: Not a directory$"):
        logger.start("seed: 0\n", completed_epochs=0)


def test_a_full_disk_refuses_the_run_before_it_trains_and_leaves_no_folder(tmp_path, full_mount, capsys):
    # Neither the up-front check nor os.access can see a full disk: the claim's write met it, in a traceback, and
    # left the folder with its .lock.
    full_mount()
    output_dir = tmp_path / "disk" / "run"
    assert main(["trainer.device=cpu", f"output_dir={output_dir}"]) == 2
    said = f"ddp-train: error: output_dir={output_dir} cannot be written: No space left on device\n"
    assert capsys.readouterr().err == said
    assert not output_dir.exists()


def test_an_epoch_line_a_full_disk_refuses_ends_the_run_in_one_line_naming_metrics(tmp_path, full_mount):
    logger = RunLogger(tmp_path / "disk" / "run", is_main=True, progress_bar=False)
    logger.start("seed: 0\n", completed_epochs=0)
    full_mount()  # a traceback came from the append: after it, neither the epoch's line nor its checkpoint
    with pytest.raises(CliError) as raised:
        logger.log_epoch({"epoch": 1, "step": 4, "train/loss": 0.5, "time/epoch_s": 1.0} | {"pad": "x" * 9000}, 1)
    path = tmp_path / "disk" / "run" / "metrics.jsonl"
    assert str(raised.value) == f"could not write {path} (No space left on device); every earlier checkpoint is intact"
    assert type(raised.value).exit_code == 1


def test_a_line_said_while_the_bar_is_drawn_comes_above_it_not_after_it(tmp_path, monkeypatch):
    # Printed as is, "skipped 9 optimizer step(s)..." started where the bar's text ended, on a terminal.
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(sys, "stdout", terminal)
    logger = RunLogger(tmp_path, is_main=True, progress_bar=True)
    for batch in logger.progress(range(3), 3, "epoch 1/1"):
        if batch == 1:
            logger.info("skipped 1 optimizer step(s)")
    drawn = terminal.getvalue()
    before = drawn[: drawn.index("skipped")]
    assert before.endswith("\r") or before.endswith("\n")


def test_progress_bar_stays_quiet_when_stderr_is_not_a_terminal(tmp_path, capsys):
    logger = RunLogger(tmp_path, is_main=True, progress_bar=True)
    batches = list(logger.progress(range(4), 4, "epoch 1/1", samples_per_batch=64))
    logger.show_running(RUNNING[0][1], step=5)
    assert batches == [0, 1, 2, 3]
    assert capsys.readouterr().err == ""


class Terminal(io.StringIO):
    """Stands in for stderr attached to a terminal, so the bar draws into a string the test can read."""

    def isatty(self) -> bool:
        return True


class StoppedClock:
    """tqdm's clock, moved on only by the batches: rates without the wall clock's jitter."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def batches(self, count: int, seconds: float) -> Iterator[int]:
        """Batches that take `seconds` each on this clock."""
        for batch in range(count):
            self.now += seconds
            yield batch


def test_progress_bar_on_a_terminal_shows_loss_and_global_throughput(tmp_path, monkeypatch):
    terminal, clock = Terminal(), StoppedClock()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(tqdm.std, "time", clock)
    logger = RunLogger(tmp_path, is_main=True, progress_bar=True)
    global_batch, batch_s = 64, 0.125  # above tqdm's 0.1 s between measurements; exact in binary
    for batch in logger.progress(clock.batches(3, batch_s), 3, "epoch 1/1", samples_per_batch=global_batch):
        if batch == 2:
            logger.show_running({"train/loss": 0.5, "train/accuracy": 0.75}, step=2)
    drawn = terminal.getvalue()
    assert "epoch 1/1" in drawn and "loss=0.5000" in drawn and "accuracy=75.0%" in drawn
    assert "samples/s=512" in drawn  # samples, not batches: 64 per batch, 8 batches per second


def test_importing_the_loggers_and_a_run_without_them_loads_neither_wandb_nor_tensorboard(tmp_path):
    script = (
        "import sys; from pathlib import Path; from ddp_trainer.loggers import RunLogger\n"
        f"logger = RunLogger(Path({str(tmp_path)!r}), True, False); logger.start('seed: 0\\n', 0); logger.finish()\n"
        "print([name for name in sys.modules if name.split('.')[0] in ('wandb', 'tensorboard', 'tensorboardX')"
        " or name.startswith('torch.utils.tensorboard')])"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=cli_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("logging_cfg", "module", "key"),
    [
        (TENSORBOARD, "torch.utils.tensorboard", "logging.tensorboard=true"),
        (WANDB_OFFLINE, "wandb", "logging.wandb.mode=offline"),
    ],
)
def test_missing_logger_package_is_a_usage_error_naming_the_setting(tmp_path, monkeypatch, logging_cfg, module, key):
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without the package looks like to import
    logger = RunLogger(tmp_path, is_main=True, progress_bar=False, logging_cfg=logging_cfg)
    with pytest.raises(UsageError, match=rf"{key} needs a package .*ddp-trainer\[logging\]"):
        logger.start("seed: 0\n", completed_epochs=0)


def test_start_keeps_only_the_metrics_lines_of_completed_epochs(tmp_path):
    lines = [json.dumps(record) for record in EPOCHS] + ['{"epoch": 3, "st', "5"]  # cut short by a crash; not ours
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    RunLogger(tmp_path, is_main=True, progress_bar=False).start("seed: 0\n", completed_epochs=1)
    assert (tmp_path / "metrics.jsonl").read_text() == lines[0] + "\n"
    assert (tmp_path / "config.yaml").read_text() == "seed: 0\n"


def test_a_restart_never_truncates_metrics_in_place(tmp_path, monkeypatch):
    # Each restart rewrote metrics.jsonl with write_text: a reader (plot, tail) found it empty, and a kill between
    # the truncation and the write lost every epoch's line for good.
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(record) + "\n" for record in EPOCHS))
    before = (metrics.stat().st_ino, metrics.read_text())
    RunLogger(tmp_path, is_main=True, progress_bar=False).start("seed: 0\n", completed_epochs=len(EPOCHS))
    assert (metrics.stat().st_ino, metrics.read_text()) == before  # every line kept: the file is left alone
    real_write = atomic.write_atomic

    def killed_while_replacing_metrics(path: Path, write) -> None:
        if path == metrics:
            raise KeyboardInterrupt  # the kill, as the file with fewer lines is written
        real_write(path, write)

    monkeypatch.setattr(atomic, "write_atomic", killed_while_replacing_metrics)
    with pytest.raises(KeyboardInterrupt):
        RunLogger(tmp_path, is_main=True, progress_bar=False).start("seed: 0\n", completed_epochs=1)
    assert metrics.read_text() == before[1]  # every line, to be dropped by the next start


def test_a_run_branched_into_a_folder_keeps_none_of_the_lines_a_crashed_attempt_left_there_and_has_its_best(tmp_path):
    # The attempt's line is not the history of the run now resumed from elsewhere, whatever its epoch number.
    args = ["--config", "configs/digits_mlp.yaml", "trainer.device=cpu", "logging.tensorboard=true"]
    args += ["checkpoint.monitor=val/loss", "checkpoint.mode=max"]  # the loss falls: the source's first epoch is best
    source, branch = tmp_path / "source", tmp_path / "branch"
    assert main([*args, "trainer.epochs=2", f"output_dir={source}"]) == 0
    crashed = {"epoch": 1, "step": 45, "lr": 0.05, "train/loss": 9.0}  # a branch attempt, killed before its checkpoint
    branch.mkdir()
    (branch / "metrics.jsonl").write_text(json.dumps(crashed) + "\n")
    resume = [f"trainer.resume={source / 'checkpoints' / 'last.pt'}", "trainer.allow_changes=[trainer.epochs]"]
    assert main([*args, "trainer.epochs=3", *resume, f"output_dir={branch}"]) == 0
    per_epoch = json.loads((source / "metrics.jsonl").read_text().splitlines()[0])["step"]
    expected = [(3, 3 * per_epoch)]
    assert [(line["epoch"], line["step"]) for line in map(json.loads, (branch / "metrics.jsonl").open())] == expected
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(branch / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [3 * per_epoch]
    # Its own best epoch, not the source's: the folder had no best.pt, though the last line named one.
    assert checkpoint.load(branch / "checkpoints" / "best.pt")["step"] == 3 * per_epoch


def test_settings_wandb_refuses_end_every_rank_in_one_line_naming_them(tmp_path):
    # Only rank 0 starts W&B: its refusal used to leave rank 1 saying rank 0 had stopped answering.
    env = {**cli_env(), "WANDB_SILENT": "true", "WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path / "home")}
    args = ["--config", "configs/digits_mlp.yaml", "trainer.device=cpu", "logging.wandb.mode=offline"]
    command = cli_command([*args, "logging.wandb.project=team/digits", f"output_dir={tmp_path / 'run'}"], nproc=2)
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=REPO_DIR)
    said = "logging.wandb (mode='offline', project='team/digits'): W&B refused to start: Invalid project name"
    errors = sorted(line for line in result.stderr.splitlines() if line.startswith("ddp-train: error"))
    assert [line.split(":", 2)[1] for line in errors] == [" error (rank 0)", " error (rank 1)"], result.stderr
    assert all(said in line for line in errors), errors
    assert "]: Traceback" not in result.stderr  # no rank's (torchrun's own, of its failed workers, is not ours)
    assert not (tmp_path / "run").exists()  # config.yaml came before W&B's refusal, and kept the folder


def test_a_run_resumed_in_its_folder_continues_its_wandb_run_and_one_branched_off_it_starts_its_own(
    tmp_path, wandb_offline_env
):
    args = ["--config", "configs/digits_mlp.yaml", "trainer.device=cpu", "logging.wandb.mode=offline"]
    source, branch = tmp_path / "source", tmp_path / "branch"
    longer = ["trainer.allow_changes=[trainer.epochs]", f"trainer.resume={source / 'checkpoints' / 'last.pt'}"]
    assert main([*args, "trainer.epochs=1", f"output_dir={source}"]) == 0
    assert main([*args, "trainer.epochs=2", *longer, f"output_dir={source}"]) == 0  # the same run, one epoch longer
    assert main([*args, "trainer.epochs=3", *longer, f"output_dir={branch}"]) == 0  # another run, from its checkpoint

    def run_ids(output_dir: Path) -> list[str]:  # a folder's name may end in "-1": two starts in the same second
        return [path.stem.removeprefix("run-") for path in sorted((output_dir / "wandb").glob("offline-run-*/run-*"))]

    (source_id, resumed_id), (branch_id,) = run_ids(source), run_ids(branch)
    assert resumed_id == source_id != branch_id
    assert torch.load(branch / "checkpoints" / "last.pt", weights_only=True)["wandb_run_id"] == branch_id


def test_a_closed_stdout_pipe_does_not_stop_the_run_before_its_checkpoints(tmp_path):
    args = ["--config", "configs/digits_mlp.yaml", "trainer.device=cpu", "trainer.max_steps=5"]
    process = subprocess.Popen(
        [sys.executable, "-m", "ddp_trainer.train", *args, f"output_dir={tmp_path}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO_DIR,
    )  # fmt: skip
    assert process.stdout.readline().startswith("training ")  # as `| head -1` reads its line and goes
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr  # was a BrokenPipeError traceback at the epoch's line, before any save
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == 5
