"""Loader workers: one stuck inside its fork (CPython gh-112275: a runtime lock held by another thread) is replaced,
and the epoch loads every sample once, with the worker seeds of a start that went well."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import threading

import pytest
from conftest import REPO_DIR, cli_env, run_script

from ddp_trainer import workers
from ddp_trainer.workers import StopProofLoader

# A child that stalls in an after-fork hook never reaches worker_init_fn, as one stuck on the lock does. The stalled
# children write their pids first, so the test can see that none is left running.
STALLS = """
import os, sys, time, torch
from ddp_trainer import workers
from ddp_trainer.workers import StopProofLoader

workers.WORKER_START_S = 3.0
stall = {"left": int(sys.argv[1])}

def stall_in_child():
    if stall["left"] > 0:
        with open(f"stalled-{os.getpid()}", "w"):
            pass
        time.sleep(600)  # killed long before, unless the loader waits for ever

def after_a_fork():
    stall["left"] -= 1

class Seeds(torch.utils.data.Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, index):
        return torch.tensor([index, torch.initial_seed()])  # a worker's seed: base seed + its id

def epoch(stalls, own_generator):
    stall["left"] = stalls
    torch.manual_seed(7)  # without a generator of its own, a loader draws from the global one
    generator = torch.Generator().manual_seed(7) if own_generator else None
    loader = StopProofLoader(
        Seeds(), batch_size=3, num_workers=2, shuffle=True, generator=generator, multiprocessing_context="fork"
    )
    return [sample.tolist() for batch in loader for sample in batch]  # in the order loaded: the shuffle's

os.register_at_fork(after_in_child=stall_in_child, after_in_parent=after_a_fork)
for own_generator in (True, False):
    went_well = epoch(0, own_generator)
    assert epoch(int(sys.argv[1]), own_generator) == went_well, "the new workers loaded other samples or seeds"
print("samples", sorted(index for index, _ in went_well))
"""


def run_stalls(tmp_path, stalls: int) -> subprocess.CompletedProcess:
    """The script above, its first `stalls` forked children stalled, in `tmp_path`."""
    command = [sys.executable, "-c", STALLS, str(stalls)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=cli_env())


def assert_none_left_running(tmp_path) -> None:
    """Every stalled child was killed and reaped: a stuck worker must not outlive its loader."""
    stalled = [int(path.name.split("-")[1]) for path in tmp_path.glob("stalled-*")]
    left = []
    for pid in stalled:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # the test's own cleanup; a child it finds means the loader left it
            left.append(pid)
    assert stalled and not left


def test_a_worker_stuck_in_its_fork_is_replaced_and_the_epoch_loads_every_sample_once(tmp_path):
    # Before: the loader waited for the stuck worker's first batch for ever (a rank hung in evaluation).
    result = run_stalls(tmp_path, stalls=1)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == f"samples {list(range(12))}"
    said = [line for line in result.stderr.splitlines() if line.startswith("ddp-trainer:")]
    assert said == 2 * ["ddp-trainer: 1 of 2 DataLoader workers did not start within 3 s (stuck in their fork): "
                        "starting the workers again"]  # fmt: skip
    assert_none_left_running(tmp_path)


def test_workers_that_never_start_end_the_run_in_an_error_that_says_so(tmp_path):
    result = run_stalls(tmp_path, stalls=1000)
    assert result.returncode == 1
    assert result.stderr.count("did not start within 3 s (stuck in their fork): starting the workers again") == 3
    assert result.stderr.splitlines()[-1] == (
        "RuntimeError: DataLoader workers did not start within 3 s, 3 times: each stopped inside its fork (a lock "
        "another thread held); data.num_workers=0 loads without forking"
    )
    assert_none_left_running(tmp_path)


def test_workers_started_without_a_fork_are_not_waited_for(monkeypatch, capfd):
    # A spawned worker copies none of this process's locks, and has no pipe to report on: waiting would fail it.
    monkeypatch.setattr(workers, "WORKER_START_S", 0.001)
    loader = StopProofLoader(list(range(6)), batch_size=2, num_workers=1, multiprocessing_context="spawn")
    assert [batch.tolist() for batch in loader] == [[0, 1], [2, 3], [4, 5]]
    assert "did not start" not in capfd.readouterr().err


def test_the_fork_race_script_loads_every_epoch_whole_on_two_ranks():
    # Keeps scripts/fork_race.py (the race that reproduces the stuck fork) running; restarts are left to chance.
    result = run_script(REPO_DIR / "scripts" / "fork_race.py", ["10"], timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = sorted(line.split(";")[0] for line in result.stdout.splitlines())
    assert loaded == ["rank 0: 10 of 10 epochs loaded whole", "rank 1: 10 of 10 epochs loaded whole"]


def test_workers_are_stopped_on_the_way_out_when_waiting_for_their_reports_is_interrupted(monkeypatch):
    # They ignore SIGTERM: unless this process stops them, Python's exit waits for them for ever.
    def interrupted(read_end: int, count: int) -> set[int]:
        raise KeyboardInterrupt

    monkeypatch.setattr(workers, "_unreported", interrupted)
    before = set(multiprocessing.active_children())
    with pytest.raises(KeyboardInterrupt) as raised:
        iter(StopProofLoader(list(range(4)), batch_size=2, num_workers=2, multiprocessing_context="fork"))
    started = set(multiprocessing.active_children()) - before
    assert len(started) == 2
    workers.stop_loader_workers()  # what fit() and the exit run, while the traceback still holds the iterator
    for worker in started:
        worker.join(timeout=10)
        assert not worker.is_alive()
    del raised


def test_a_rank_holding_more_than_1024_descriptors_waits_for_its_workers(tmp_path):
    # select() refuses descriptors past 1,023, and many files and sockets are open in a large job.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.skip(f"this machine allows {hard} open descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 2048), hard), hard))
    held = [os.open(tmp_path, os.O_RDONLY) for _ in range(1100)]
    try:
        loader = StopProofLoader(list(range(4)), batch_size=2, num_workers=2, multiprocessing_context="fork")
        assert [batch.tolist() for batch in loader] == [[0, 1], [2, 3]]
    finally:
        for descriptor in held:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_loaders_started_from_two_threads_at_once_each_load_their_own_samples():
    # fit() runs once per process, but a user's threads may each iterate loaders: their workers' pipes must not mix.
    loaded, failed = [], []

    def load(first: int) -> None:
        try:
            for _ in range(10):
                loader = StopProofLoader(
                    list(range(first, first + 4)), batch_size=2, num_workers=2, multiprocessing_context="fork"
                )
                loaded.append([int(sample) for batch in loader for sample in batch])
        except Exception as error:  # reported below, with the samples
            failed.append(error)

    threads = [threading.Thread(target=load, args=(first,)) for first in (0, 100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failed == []
    assert sorted(loaded) == [[0, 1, 2, 3]] * 10 + [[100, 101, 102, 103]] * 10


def test_a_loader_without_workers_leaves_the_start_method_unset():
    code = (
        "import multiprocessing\n"
        "from ddp_trainer.workers import StopProofLoader\n"
        "assert [batch.tolist() for batch in StopProofLoader([1, 2], batch_size=2)] == [[1, 2]]\n"
        "multiprocessing.set_start_method('spawn')\n"
        "print(multiprocessing.get_start_method())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=cli_env())
    assert (result.returncode, result.stdout) == (0, "spawn\n"), result.stderr
