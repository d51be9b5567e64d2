"""Process-group plumbing: the only module that reads launcher environment variables; it offers the backends that
rendezvous.py picks from once every rank has said which GPU it holds."""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ddp_trainer import rendezvous, slurm
from ddp_trainer.errors import UsageError


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job: rank, local rank, world size, device and backend."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group connects more than one rank."""
        return self.world_size > 1


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError as error:
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from error


@dataclass(frozen=True)
class Launch:
    """How this process was started: by torchrun (or any RANK/WORLD_SIZE setter), by srun, or alone."""

    launcher: str
    rank: int
    local_rank: int
    world_size: int
    master_addr: str | None
    master_port: int | None
    job: str | None = None  # the srun step ("SLURM job 42, step 1"): a store another step opened is refused
    agent_store: bool = False  # torchrun's agent hosts the job's store (an elastic launch), not rank 0


def detect_launcher() -> Launch:
    """Read the launcher's variables: torchrun's first, then an srun step's, else a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = _int_env("RANK"), _int_env("WORLD_SIZE")
        local_rank = _int_env("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "env"
        port = _int_env("MASTER_PORT") if "MASTER_PORT" in os.environ else None
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        return Launch(launcher, rank, local_rank, world_size, os.environ.get("MASTER_ADDR"), port, None, agent_store)
    # A batch script alone has SLURM_NTASKS=N too and must not wait for N-1 ranks that were never started.
    if slurm.in_srun_step(os.environ):
        nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "localhost")
        # The master is the first host of the node list, where SLURM puts task 0; the port, from the job and step ids.
        master_addr = os.environ.get("MASTER_ADDR") or slurm.expand_nodelist(nodes)[0]
        port = _int_env("MASTER_PORT") if "MASTER_PORT" in os.environ else slurm.step_port(os.environ)
        world_size, rank = _int_env("SLURM_STEP_NUM_TASKS"), _int_env("SLURM_PROCID")
        local_rank = _int_env("SLURM_LOCALID") if "SLURM_LOCALID" in os.environ else 0
        return Launch("srun", rank, local_rank, world_size, master_addr, port, slurm.step_name(os.environ))
    return Launch("single", 0, 0, 1, None, None)


def slurm_array_task() -> int | None:
    """This job's index in a SLURM job array (SLURM_ARRAY_TASK_ID); None outside an array."""
    return _int_env("SLURM_ARRAY_TASK_ID") if "SLURM_ARRAY_TASK_ID" in os.environ else None


def visible_gpus() -> int:
    """How many CUDA devices this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(requested: str, launch: Launch, gpu_count: int) -> torch.device:
    """Map trainer.device (auto|cpu|cuda) to this rank's device: GPUs in turn by local rank, shared when too few."""
    if requested == "cpu" or (requested == "auto" and gpu_count == 0):
        return torch.device("cpu")
    if gpu_count == 0:
        raise UsageError("trainer.device=cuda but no CUDA device is available (use trainer.device=cpu or auto)")
    return torch.device("cuda", launch.local_rank % gpu_count)


def choose_backends(requested: str, device: torch.device, launch: Launch) -> tuple[str, ...]:
    """The backends trainer.dist_backend (auto|nccl|gloo) lets this rank take, preferred first; () for one process.

    NCCL refuses two ranks on one GPU, and only the GPUs' ids tell whether ranks share one (srun may show each task
    its own GPU, or one to all): rank 0 takes the first backend that suits every rank once they met.
    """
    if launch.world_size == 1:
        return ()
    if device.type != "cuda":
        if requested == "nccl":
            raise UsageError(f"trainer.dist_backend=nccl needs CUDA GPUs, but this run is on the {device}; use gloo")
        return ("gloo",)
    return ("nccl", "gloo") if requested == "auto" else (requested,)


def gpu_id(device: torch.device) -> str | None:
    """The id of the GPU `device` is, unique across hosts; None for a CPU, or a GPU whose driver gives none."""
    if device.type != "cuda":
        return None
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    # All zeros is no id: it would make every GPU look like one.
    return uuid if uuid.removeprefix("GPU-").strip("0-") else None


def setup(
    requested_device: str,
    timeout_s: float,
    requested_backend: str = "auto",
    timeout_name: str = "trainer.startup_timeout_s",
    same_on_every_rank: dict[str, Any] | None = None,
    refusal: str | None = None,
) -> DistEnv:
    """Join the process group when launched with more than one rank; return this rank's DistEnv.

    `timeout_name` is what the user set `timeout_s` with, for the line a rendezvous that times out ends with. Every
    rank must run the same packages, backend and `same_on_every_rank` (a run's config), and none may bring a
    `refusal` (why it cannot start): all refuse otherwise, once they met.
    """
    launch = detect_launcher()
    try:
        device = resolve_device(requested_device, launch, visible_gpus())
        backends = choose_backends(requested_backend, device, launch)
    except UsageError as error:  # this node's GPUs, which the others do not know of
        error.before_meeting = True
        raise
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = None
    if backends:
        timeout = (timeout_name, timeout_s)
        backend = rendezvous.join(launch, backends, gpu_id(device), timeout, same_on_every_rank or {}, refusal)
    elif refusal is not None:
        raise UsageError(refusal)
    return DistEnv(launch.rank, launch.local_rank, launch.world_size, device, backend)


class PhaseTimeouts:
    """Training's short process-group timeout while steps run; start-up's long one while ranks may wait on each other.

    Start-up (rendezvous, a dataset download, the first step's compile) may keep ranks apart for long, and so may
    rank 0's files: an epoch's log lines and a checkpoint on a slow shared disk, which the other ranks wait for at the
    next collective. While steps run, a silent peer is dead or stuck and should become an error soon.
    """

    def __init__(
        self, env: DistEnv, startup_s: float, training_s: float, groups: Sequence[dist.ProcessGroup | None]
    ) -> None:
        self.env, self.startup_s, self.training_s, self.stepping = env, startup_s, training_s, False
        self.groups = {None, *groups}  # None: the default group

    def steps_running(self) -> None:
        """After a step: training's timeout, until the ranks next wait on rank 0's files."""
        if not self.stepping:
            self.stepping = True
            self._apply(self.training_s)

    def waiting_on_rank_zero(self) -> None:
        """Before rank 0 writes what the others will wait for: start-up's timeout, until the next step."""
        if self.stepping:
            self.stepping = False
            self._apply(self.startup_s)

    def _apply(self, seconds: float) -> None:
        if self.env.distributed:
            for group in self.groups:
                _set_timeout(timedelta(seconds=seconds), group)

    def in_force(self) -> tuple[str, float]:
        """(config key, seconds) of the timeout that applies now."""
        if self.stepping:
            return "trainer.dist_timeout_s", self.training_s
        return "trainer.startup_timeout_s", self.startup_s


# torch 2.14 renamed the private `_set_pg_timeout` (torch 2.11 to 2.13, e.g. the GPU image's 2.11) to `set_timeout`.
_set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout


def teardown() -> None:
    """Destroy the process group if one exists; safe to call on every exit path."""
    if dist.is_available() and dist.is_initialized():
        # DDP's reducer sits in reference cycles and keeps the group alive; collected only at interpreter exit,
        # gloo's threads then die mid-finalisation (SIGABRT, "terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """All ranks meet here (e.g. after rank 0 wrote a checkpoint)."""
    if env.distributed:
        dist.barrier(device_ids=[env.device.index] if env.backend == "nccl" else None)


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum `tensor` over all ranks in place and return it; a no-op in a single process."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module, env: DistEnv) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank; a no-op in a single process."""
    if env.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def gather_objects(value: Any, env: DistEnv) -> list[Any]:
    """Every rank's `value`, in rank order (pickled over the process group: for small, trusted objects)."""
    if not env.distributed:
        return [value]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, env: DistEnv) -> Any:
    """Rank 0's `value` on every rank (pickled over the process group: for small, trusted objects)."""
    if not env.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class LaggedAgreement:
    """Element-wise maximum (or sum) of small integers over all ranks, read one exchange after it was sent.

    The all_reduce runs in the background between two steps, so no step waits on it, and every rank reads the
    same answer at the same step. It runs on CPU tensors over gloo (a group of its own beside nccl), so reading
    it never waits for the GPU.
    """

    def __init__(self, env: DistEnv, size: int, op: dist.ReduceOp.RedOpType = dist.ReduceOp.MAX) -> None:
        self.env, self.size, self.op = env, size, op
        self.group = dist.new_group(backend="gloo") if env.backend == "nccl" else None
        self.pending: tuple[Any, torch.Tensor] | None = None
        self.local = [0] * size  # a single process agrees with itself: no tensor, so nothing to read back

    def send(self, flags: list[int]) -> None:
        """Start agreeing on this rank's flags; `receive` at a later step returns the result."""
        if not self.env.distributed:
            self.local = flags
            return
        tensor = torch.tensor(flags, dtype=torch.int64)
        self.pending = (dist.all_reduce(tensor, op=self.op, group=self.group, async_op=True), tensor)

    def receive(self) -> list[int]:
        """The maximum (or sum) over ranks of the flags sent last (zeros if nothing was sent since the last receive)."""
        if not self.env.distributed:
            flags, self.local = self.local, [0] * self.size
            return flags
        if self.pending is None:
            return [0] * self.size
        work, tensor = self.pending
        work.wait()
        self.pending = None
        return tensor.tolist()


def requeue_slurm_job(env: DistEnv) -> tuple[bool, str]:
    """Rank 0 asks SLURM to requeue this job (`scontrol requeue`); every rank learns whether it did, in words too."""
    # SLURM ends a requeued job with SIGTERM at once, which as a second stop signal would kill a rank before it
    # reports; the checkpoint is saved, so every rank lets SIGTERM pass and exits on its own.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return broadcast_object(slurm.requeue(os.environ) if env.is_main else None, env)


def rank_label() -> str:
    """' (rank N)' when several ranks run, for messages that must say which rank failed; '' otherwise."""
    try:
        launch = detect_launcher()
    except UsageError:
        return ""
    return f" (rank {launch.rank})" if launch.world_size > 1 else ""
