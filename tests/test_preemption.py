"""Stop-signal handlers: the first signal is only noted, a second one is not waited for; loader workers that ignore
stop signals are still stopped."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_DIR, cli_command, cli_env, read_metrics
from torch.utils.data import Dataset
from torch.utils.data._utils import signal_handling

from ddp_trainer import checkpoint
from ddp_trainer.cli.train import main
from ddp_trainer.preemption import StopSignals
from ddp_trainer.workers import StopProofLoader, stop_loader_workers


def test_first_signal_is_noted_and_handlers_are_restored():
    previous = signal.getsignal(signal.SIGUSR2)
    stop = StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.received == signal.SIGUSR2
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR2) is previous


def test_a_signal_watched_later_is_noted_from_then_and_restored_with_the_others():
    previous = signal.getsignal(signal.SIGTERM)
    stop = StopSignals((signal.SIGUSR2,))
    try:
        assert signal.getsignal(signal.SIGTERM) is previous  # a rank still in the rendezvous ends on SIGTERM
        stop.watch(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is previous


class Blocking(Dataset):
    """Serves `ready` samples in each worker, then blocks for an hour (a dead filesystem)."""

    def __init__(self, ready: int) -> None:
        self.ready, self.served = ready, 0

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> torch.Tensor:
        self.served += 1
        if self.served > self.ready:
            time.sleep(3600)
        return torch.zeros(2)


@pytest.mark.parametrize("ready", [64, 2], ids=["idle", "stuck"])
def test_loader_workers_that_ignore_sigterm_are_stopped(ready):
    before = set(multiprocessing.active_children())
    batches = iter(StopProofLoader(Blocking(ready), batch_size=2, num_workers=1, persistent_workers=True))
    next(batches)
    (worker,) = set(multiprocessing.active_children()) - before
    os.kill(worker.pid, signal.SIGTERM)  # what multiprocessing sends its daemonic children when the process exits
    worker.join(timeout=1)
    assert worker.is_alive()
    stop_loader_workers()
    worker.join(timeout=10)
    assert not worker.is_alive()


class ParentSignalledAtStart(multiprocessing.context.ForkProcess):
    """A loader worker whose start may send its parent SIGTERM: torchrun's killpg, landing as the loader forks."""

    signals_parent = False

    def start(self) -> None:
        super().start()
        if self.signals_parent:
            os.kill(os.getpid(), signal.SIGTERM)


class ParentSignalledAtStartContext(multiprocessing.context.ForkContext):
    """The fork context, its first worker's start signalling the parent (one killpg, one signal to it)."""

    def __init__(self) -> None:
        super().__init__()
        self.started = 0

    def Process(self, *args: object, **kwargs: object) -> ParentSignalledAtStart:
        """A worker process; the first one signals the parent as it starts."""
        self.started += 1
        process = ParentSignalledAtStart(*args, **kwargs)
        process.signals_parent = self.started == 1
        return process


def test_a_stop_signal_as_the_workers_start_neither_kills_them_nor_is_lost(monkeypatch):
    # A stream's loader forks its workers every epoch, its validation loader at every evaluation: a killpg lands
    # there often. torch's worker handler (SIGTERM from any process but the parent re-raised, fatal) is installed
    # before worker_init_fn sets the signal aside, so a worker signalled in between died.
    set_handlers = signal_handling._set_worker_signal_handlers

    def then_signalled(*args: object) -> None:
        set_handlers(*args)
        os.kill(os.getpid(), signal.SIGTERM)  # the killpg's signal, landing in the worker's window

    monkeypatch.setattr(signal_handling, "_set_worker_signal_handlers", then_signalled)  # fork copies it to workers
    stop = StopSignals()
    try:
        context = ParentSignalledAtStartContext()
        loader = StopProofLoader(list(range(8)), batch_size=2, num_workers=2, multiprocessing_context=context)
        # Before: "DataLoader worker (pid N) is killed by signal: Terminated", and no stop checkpoint
        assert [batch.tolist() for batch in loader] == [[0, 1], [2, 3], [4, 5], [6, 7]]
        assert stop.received == signal.SIGTERM  # the loader's own process still stops at the next step
    finally:
        stop.restore()


SIGNALS_TWICE = (
    "import os, signal, time\n"
    "from ddp_trainer.preemption import StopSignals\n"
    "stop = StopSignals()\n"
    "os.kill(os.getpid(), signal.{first})\n"
    "print('noted', stop.received, flush=True)\n"
    "time.sleep({pause})\n"
    "for signum in ({again}):\n"
    "    os.kill(os.getpid(), signum)\n"
    "time.sleep(3)\n"
    "print('still alive', stop.received, flush=True)\n"
)


@pytest.mark.parametrize(
    ("first", "pause", "again", "survives"),
    [
        ("SIGTERM", 1.5, "signal.SIGTERM,", False),  # someone insists: not waited for
        ("SIGUSR2", 0, "signal.SIGTERM,", False),
        ("SIGTERM", 0, "signal.SIGCONT, signal.SIGTERM", True),  # slurmd at the time limit: one stop
        ("SIGUSR2", 1.5, "signal.SIGUSR2,", True),  # only the warning again
    ],
)
def test_a_second_signal_ends_the_process_unless_it_is_the_same_stop(first, pause, again, survives):
    code = SIGNALS_TWICE.format(first=first, pause=pause, again=again)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    noted = int(getattr(signal, first))
    assert result.stdout.split("\n")[0] == f"noted {noted}"
    if survives:
        assert result.stdout.split("\n")[1] == f"still alive {noted}"
        assert result.returncode == 0
    else:
        assert "still alive" not in result.stdout
        assert result.returncode == -signal.SIGTERM


def test_a_warning_after_a_command_s_run_ended_leaves_its_exit_code_alone():
    # The last seconds of a job that finished just inside its limit: USR2's default action would turn it FAILED.
    code = (
        "import os, signal, ddp_trainer.cli\n"
        "from ddp_trainer.preemption import StopSignals\n"
        "StopSignals().restore()\n"
        "os.kill(os.getpid(), signal.SIGUSR2)\n"
        "print('exits as it would have')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (0, "exits as it would have\n")


def test_a_warning_while_the_command_still_imports_torch_stops_the_run_at_its_first_steps(tmp_path):
    # SLURM may warn a rank a minute early, seconds after it started: torch's import must not make USR2 fatal.
    args = ["data._target_=factories.blobs", "model._target_=factories.small_net", "trainer.device=cpu"]
    command = cli_command([*args, "data.batch_size=8", f"output_dir={tmp_path}"], nproc=1)
    env = {key: value for key, value in cli_env().items() if key != "SLURM_JOB_ID"}
    process = subprocess.Popen(command, env=env, cwd=REPO_DIR, stdout=subprocess.PIPE, text=True)
    caught_usr2 = 1 << (signal.SIGUSR2 - 1)
    while not int(re.search(r"SigCgt:\s*(\w+)", Path(f"/proc/{process.pid}/status").read_text())[1], 16) & caught_usr2:
        time.sleep(0.002)  # until the first handler is in place: before it, Python itself is still starting
    assert "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text()  # the run's own handler: long after torch
    process.send_signal(signal.SIGUSR2)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGUSR2, output
    last = tmp_path / "checkpoints" / "last.pt"
    # Noted before step 1; the ranks' agreement, read one exchange late, acts on it after step 2, as for any signal.
    assert f"stopped by SIGUSR2 at step 2: {last} saved; not a SLURM job: nothing to requeue" in output
    assert checkpoint.load(last)["step"] == 2


@pytest.mark.parametrize(
    ("fault", "requeue", "strategy", "said"),
    [
        ("usr2", "true", "ddp", "not a SLURM job: nothing to requeue"),
        ("usr2", "false", "fsdp", "not requeued by this run (trainer.requeue=False)"),
        ("term", "true", "ddp", "not requeued by this run (SIGTERM is not SLURM's USR2 warning)"),
    ],
)
def test_a_stop_not_requeued_saves_and_exits_128_plus_the_signal(
    tmp_path, capsys, monkeypatch, fault, requeue, strategy, said
):
    # The signal arrives in the first epoch, outside SLURM (or with requeue off): the job will not run again.
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    data = ["data._target_=factories.faulty_blobs", f"data.fault={fault}", "data.fault_rank=0", "data.after=20"]
    args = [*data, "model._target_=factories.small_net", "trainer.device=cpu", f"trainer.requeue={requeue}"]
    args += [f"trainer.strategy={strategy}"]  # fsdp: the stop's checkpoint is a sharded folder
    signum = signal.SIGUSR2 if fault == "usr2" else signal.SIGTERM
    assert main([*args, "data.batch_size=8", f"output_dir={tmp_path}"]) == 128 + signum
    last = tmp_path / "checkpoints" / ("last" if strategy == "fsdp" else "last.pt")
    assert f"{last} saved; {said}; exit code {128 + signum}" in capsys.readouterr().out
    # Noted while batch 3 loads (samples 17-24), acted on at the next step's agreement: saved after step 4 of 12.
    assert checkpoint.load(last)["step"] == 4


@pytest.mark.parametrize("every_n_steps", [0, 4])
def test_a_stop_at_max_steps_ends_the_part_epoch_as_an_uninterrupted_run_does(tmp_path, monkeypatch, every_n_steps):
    # The signal is acted on at step 4, which is max_steps, of a 12-step epoch (a step's save too, with every_n_steps).
    # Saved there and stopped, the run left no part epoch's line and no best.pt, and resumed it was already finished.
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    data = ["data._target_=factories.faulty_blobs", "data.fault=term", "data.fault_rank=0", "data.after=20"]
    args = [*data, "model._target_=factories.small_net", "trainer.device=cpu", "trainer.max_steps=4"]
    args += [f"checkpoint.every_n_steps={every_n_steps}", "data.batch_size=8", f"output_dir={tmp_path}"]
    assert main(args) == 0  # the signal finds the run ending: nothing is left to stop
    (line,) = read_metrics(tmp_path)
    assert (line["epoch"], line["step"], line["train/samples"], line["val/samples"]) == (1, 4, 32, 37)
    best = checkpoint.load(tmp_path / "checkpoints" / "best.pt")
    assert best["step"] == 4 and best["part_epoch_best"] == line["val/accuracy"]


def test_ranks_agree_on_a_stop_every_stop_check_every_n_steps(tmp_path, monkeypatch):
    # As above, with the flags exchanged at steps 3, 6, ...: sent at step 3, the stop is acted on at step 6, not 4.
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    data = ["data._target_=factories.faulty_blobs", "data.fault=term", "data.fault_rank=0", "data.after=20"]
    args = [*data, "model._target_=factories.small_net", "trainer.device=cpu", "trainer.stop_check_every_n_steps=3"]
    assert main([*args, "data.batch_size=8", f"output_dir={tmp_path}"]) == 128 + signal.SIGTERM
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["step"] == 6
