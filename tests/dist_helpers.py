"""Real ranks for tests: the CLI or a function on ranks forked from a fork server, and the CLI as plain ranks."""

from __future__ import annotations

import contextlib
import errno
import gc
import io
import json
import multiprocessing
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch._dynamo
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO_DIR, cli_env
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from ddp_trainer import assembly, atomic, checkpoint, claim, distributed, saving
from ddp_trainer.cli import doctor, train


def free_port() -> int:
    """A TCP port nobody listens on right now (tests must not hard-code ports)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def plain_ranks(
    args: list[str], world_size: int = 2, started: Sequence[int] | None = None, port: int = 0
) -> list[subprocess.Popen]:
    """The CLI in plain processes with the rank variables set, as srun would start them: the ranks `started` (all
    by default) of `world_size`, meeting at `port` (a free one by default).

    Not torchrun: torchrun ends the other ranks as soon as one exits, which would hide what each rank does alone.
    """
    port = str(port or free_port())
    return [
        subprocess.Popen(
            [sys.executable, "-m", "ddp_trainer.train", *args],
            env={
                **cli_env(),
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_DIR,
        )  # fmt: skip
        for rank in (range(world_size) if started is None else started)
    ]


def refusals(args: list[str], world_size: int = 2) -> list[str]:
    """Each plain rank's error output, once every rank has exited 2 (a refusal) on its own, without the others."""
    errors = []
    for process in plain_ranks(args, world_size):
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 2, stderr
        errors.append(stderr.strip())
    return errors


# Ranks fork from one server that imported torch and the trainer once: each spawn then skips ~5 s of imports per rank.
# The server has run no torch op, so no thread pool is copied into a child half-alive (the trouble with plain fork).
mp.set_forkserver_preload(["torch", "torch._dynamo", "dist_helpers"])


def spawn(world_size: int, function: Callable, *args: object) -> None:
    """Run function(rank, world_size, port, *args) in `world_size` fresh processes; re-raise their errors."""
    mp.start_processes(
        function, args=(world_size, free_port(), *args), nprocs=world_size, join=True, start_method="forkserver"
    )


def _join_as(rank: int, world_size: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ["OMP_NUM_THREADS"] = "1"  # as cli_env gives the CLI's ranks: 2 ranks on 2 cores
    torch.set_num_threads(1)
    os.chdir(REPO_DIR)  # the config paths tests pass are relative to the repo, as for run_cli
    # A child of the fork server defaults to it; DataLoader workers must fork, as they do in a process torchrun starts.
    multiprocessing.set_start_method("fork", force=True)


def _cli_rank(rank: int, world_size: int, port: int, args: list[str], folder: str, script: str | None) -> None:
    """The CLI (or `python SCRIPT`) on this rank, its output and exit code in `folder`."""
    _join_as(rank, world_size, port)
    out = Path(folder)
    for stream, name in ((1, "out"), (2, "err")):
        with open(out / f"{rank}.{name}", "w") as file:
            os.dup2(file.fileno(), stream)  # the file descriptor, so C++ warnings land there too
    code = 1
    try:
        if script is None:
            code = train.main(args)
        else:
            sys.argv = [script, *args]
            runpy.run_path(script, run_name="__main__")
            code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        (out / f"{rank}.code").write_text(str(code))
    if code != 0:
        os._exit(code)  # as a worker that torchrun would see fail


def _wait(processes: list[mp.Process], timeout_s: float, grace_s: float = 10.0) -> None:
    """Until every rank ended; once one failed, the others get `grace_s` to say why on their own, then are killed."""
    deadline, failed_at = time.monotonic() + timeout_s, None
    while any(process.is_alive() for process in processes):
        now = time.monotonic()
        if failed_at is None and any(process.exitcode not in (None, 0) for process in processes):
            failed_at = now
        if now >= deadline or (failed_at is not None and now >= failed_at + grace_s):
            for process in processes:
                process.kill()
                process.join()
            if now >= deadline:
                raise TimeoutError(f"ranks still running after {timeout_s:g} s")
            return
        time.sleep(0.05)


def run_ranks(
    args: list[str], world_size: int = 2, script: Path | None = None, timeout_s: float = 120
) -> subprocess.CompletedProcess:
    """The CLI (or `python SCRIPT`) on ranks forked from the server, as torchrun runs it, ~8 s sooner.

    Output is each rank's in turn; the exit code is the first failed rank's (-9: killed once another failed).
    """
    with tempfile.TemporaryDirectory(prefix="ranks-") as folder:
        rank_args = (world_size, free_port(), args, folder, script and str(script))
        context = mp.start_processes(_cli_rank, rank_args, world_size, join=False, start_method="forkserver")
        _wait(context.processes, timeout_s)
        ranks = range(world_size)
        files = [{name: Path(folder, f"{rank}.{name}") for name in ("code", "out", "err")} for rank in ranks]
        codes = [int(file["code"].read_text()) if file["code"].exists() else -9 for file in files]
        stdout, stderr = (
            "".join(file[name].read_text() for file in files if file[name].exists()) for name in ("out", "err")
        )
    return subprocess.CompletedProcess(args, next((code for code in codes if code), 0), stdout, stderr)


def train_counting_all_reduce(rank: int, world_size: int, port: int, args: list[str], out_dir: str) -> None:
    """Run the CLI on this rank and record how many times torch.distributed.all_reduce was called."""
    _join_as(rank, world_size, port)
    original, calls = dist.all_reduce, []

    def counting(tensor, *call_args, **call_kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - mirrors all_reduce
        if tensor.dtype == torch.float64:  # metric sums; the per-step stop flag is int64
            calls.append(1)
        return original(tensor, *call_args, **call_kwargs)

    dist.all_reduce = counting
    try:
        assert train.main(args) == 0
    finally:
        dist.all_reduce = original
    Path(out_dir, f"all_reduce_rank{rank}.txt").write_text(str(len(calls)))


def train_noting_gpu_memory_at_sharding(rank: int, world_size: int, port: int, args: list[str], out_dir: str) -> None:
    """Run the CLI on this rank; write the model's bytes and the GPU's peak allocation once it is sharded."""
    _join_as(rank, world_size, port)
    original, noted = assembly.shard_model, []

    def noting(model: torch.nn.Module, *shard_args: object) -> list[str]:
        size = sum(tensor.nbytes for tensor in (*model.parameters(), *model.buffers()))
        found = original(model, *shard_args)
        noted.append([size, torch.cuda.max_memory_allocated()])
        return found

    assembly.shard_model = noting
    try:
        assert train.main(args) == 0
    finally:
        assembly.shard_model = original
    Path(out_dir, f"memory_rank{rank}.json").write_text(json.dumps(noted[0]))


def train_noting_ddp_at_teardown(rank: int, world_size: int, port: int, args: list[str], out_dir: str) -> None:
    """Run the CLI on this rank; write how it ended and how many DDP modules lived as the group was destroyed."""
    _join_as(rank, world_size, port)
    original, alive = dist.destroy_process_group, []

    def noting(*call_args, **call_kwargs):  # noqa: ANN002, ANN003, ANN202 - mirrors destroy_process_group
        alive.append(sum(isinstance(thing, DistributedDataParallel) for thing in gc.get_objects()))
        return original(*call_args, **call_kwargs)

    dist.destroy_process_group = noting
    try:
        ended = str(train.main(args))
    except Exception as error:  # noqa: BLE001 - a rank's own failure leaves main() as an exception
        ended = type(error).__name__
    finally:
        dist.destroy_process_group = original
    Path(out_dir, f"teardown_rank{rank}.txt").write_text(f"{ended} {alive}")


def evaluate_checkpoint(rank: int, world_size: int, port: int, path: str, overrides: list[str], out_file: str) -> None:
    """Run `ddp-train evaluate --checkpoint PATH --json` on this rank; rank 0's printed JSON goes to `out_file`."""
    _join_as(rank, world_size, port)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert train.main(["evaluate", "--checkpoint", path, "--json", *overrides]) == 0
    if rank == 0:
        Path(out_file).write_text(printed.getvalue())
    else:
        assert printed.getvalue() == ""  # only rank 0 reports


def train_counting_gradient_allreduces(rank: int, world_size: int, port: int, args: list[str], out_dir: str) -> None:
    """Run the CLI on this rank with a DDP communication hook that counts gradient all-reduces."""
    _join_as(rank, world_size, port)
    calls: list[int] = []

    # No annotations: DDP compares them with dist.GradBucket, and postponed evaluation makes them strings.
    def counting_allreduce(state, bucket):  # noqa: ANN001, ANN202
        calls.append(bucket.index())
        return default_hooks.allreduce_hook(None, bucket)

    class CountingDDP(DistributedDataParallel):
        def __init__(self, *ddp_args: object, **ddp_kwargs: object) -> None:
            super().__init__(*ddp_args, **ddp_kwargs)
            self.register_comm_hook(None, counting_allreduce)

    assembly.DistributedDataParallel = CountingDDP
    assert train.main(args) == 0
    Path(out_dir, f"gradient_allreduces_rank{rank}.txt").write_text(str(len(calls)))


def train_counting_graphs(rank: int, world_size: int, port: int, args: list[str], out_dir: str) -> None:
    """Run the CLI on this rank and record how many graphs torch.compile built in it (a fresh process: none before)."""
    _join_as(rank, world_size, port)
    assert train.main(args) == 0
    Path(out_dir, f"graphs_rank{rank}.txt").write_text(str(torch._dynamo.utils.counters["stats"]["unique_graphs"]))


class ResumeChosen(Exception):
    """Raised once a rank has chosen the checkpoint it resumes from: the test needs the choice, not the run."""


def record_resume_choice(rank: int, world_size: int, port: int, args: list[str], out_dir: str) -> None:
    """Run the CLI on this rank until it has chosen its checkpoint, which it records; rank 0 cleans up late."""
    _join_as(rank, world_size, port)
    clean_up, choose = checkpoint.remove_unfinished_writes, checkpoint.load_for_resume

    def late_clean_up(directory: Path) -> list[Path]:
        time.sleep(2)  # a loaded node, or a shared filesystem slow to show rank 0's renames to the other nodes
        return clean_up(directory)

    def recording(*call_args: object) -> None:
        _, path = choose(*call_args)
        Path(out_dir, f"resumed_rank{rank}.txt").write_text(path.resolve().name)
        raise ResumeChosen

    checkpoint.remove_unfinished_writes, checkpoint.load_for_resume = late_clean_up, recording
    with contextlib.suppress(ResumeChosen):
        train.main(args)


def train_rank(rank: int, world_size: int, port: int, args: list[str]) -> None:
    """Run the CLI on this rank; it must succeed."""
    _join_as(rank, world_size, port)
    assert train.main(args) == 0


def train_with_slow_saves(rank: int, world_size: int, port: int, args: list[str], delay_s: float) -> None:
    """Run the CLI on this rank, rank 0 taking `delay_s` longer for each checkpoint file (a slow shared disk)."""
    _join_as(rank, world_size, port)
    if rank == 0:
        real_save = atomic.save_atomic

        def slow_save(*save_args: object) -> None:
            time.sleep(delay_s)
            real_save(*save_args)

        atomic.save_atomic = slow_save
    assert train.main(args) == 0


def sharded_saver_group_timeout(rank: int, world_size: int, port: int, folder: str, timeout_s: float) -> None:
    """An async ShardedSaver made on this rank: its gloo group must time out after `timeout_s`."""
    _join_as(rank, world_size, port)
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    try:
        saver = saving.ShardedSaver(Path(folder), keep_last=1, async_save=True, timeout=timedelta(seconds=timeout_s))
        assert saver.group._get_backend(torch.device("cpu")).options._timeout == timedelta(seconds=timeout_s)
        saver.close()
    finally:
        dist.destroy_process_group()


def doctor_under_nccl(rank: int, world_size: int, port: int, folder: str) -> None:
    """The doctor's collectives as an NCCL run's would be (gloo standing in for NCCL), its lines to `folder`."""
    _join_as(rank, world_size, port)
    env = distributed.setup("cpu", 60)
    try:
        Path(folder, f"rank{rank}.txt").write_text("\n".join(doctor.check_collectives(replace(env, backend="nccl"))))
    finally:
        distributed.teardown()


def read_while_replaced(
    rank: int, world_size: int, port: int, args: list[str], last: str, other: str, out: str
) -> None:
    """The CLI with `args` on this rank, `last` replaced by `other` after rank 0 read it and before rank 1 does, as a
    live run's save would; each rank's exit code and error lines go to `out`/rank<N>."""
    _join_as(rank, world_size, port)
    rank_0_read, real_read_state = Path(out, "rank0-read"), checkpoint.read_state

    def read_state(path: Path) -> dict:
        if rank == 1 and Path(other).exists():
            deadline = time.monotonic() + 60
            while not rank_0_read.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            os.replace(other, last)
        state = real_read_state(path)
        if rank == 0:
            rank_0_read.touch()
        return state

    checkpoint.read_state = read_state
    _main_captured(rank, args, out)


def train_in_a_folder_per_rank(rank: int, world_size: int, port: int, args: list[str], out: str) -> None:
    """The CLI with `args` on this rank, run from `out`/node<rank>, as on nodes that share no filesystem."""
    _join_as(rank, world_size, port)
    os.chdir(Path(out, f"node{rank}"))
    _main_captured(rank, args, out)


def train_on_a_disk_too_full_for_the_probe(rank: int, world_size: int, port: int, args: list[str], out: str) -> None:
    """The CLI with `args` on this rank, where creating the shared-folder probe fails as on a full disk."""
    _join_as(rank, world_size, port)
    real_touch = Path.touch

    def touch(path: Path, *call_args: object, **call_kwargs: object) -> None:
        if path.name.startswith(".shared-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_touch(path, *call_args, **call_kwargs)

    Path.touch = touch
    _main_captured(rank, args, out)


def train_waiting_briefly_for_the_folder(
    rank: int, world_size: int, port: int, args: list[str], wait_s: float, out: str
) -> None:
    """The CLI with `args` on this rank, waiting `wait_s` for an output_dir in use; exit code and errors to `out`."""
    _join_as(rank, world_size, port)
    claim.WAIT_S = wait_s
    _main_captured(rank, args, out)


def _main_captured(rank: int, args: list[str], out: str) -> None:
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        code = train.main(args)
    Path(out, f"rank{rank}").write_text(f"{code}\n{errors.getvalue()}")
