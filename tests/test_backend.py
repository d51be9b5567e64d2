"""Which device and backends each rank may take: GPUs in turn by local rank, NCCL preferred where they are GPUs."""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist
from dist_helpers import refusals

from ddp_trainer import slurm
from ddp_trainer.distributed import Launch, choose_backends, gpu_id, resolve_device
from ddp_trainer.errors import UsageError
from ddp_trainer.peers import is_peer_failure


def torchrun_rank(local_rank: int, local_world_size: int) -> Launch:
    return Launch("torchrun", local_rank, local_rank, local_world_size, "127.0.0.1", 29500)


@pytest.mark.parametrize(
    ("local_world_size", "gpus", "devices"),
    [
        (2, 1, ["cuda:0", "cuda:0"]),  # the quickstart on a one-GPU machine: rank 0 finds them sharing, takes gloo
        (2, 2, ["cuda:0", "cuda:1"]),
        (4, 2, ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]),
        (2, 8, ["cuda:0", "cuda:1"]),
        (2, 0, ["cpu", "cpu"]),
    ],
)
def test_ranks_take_the_gpus_they_see_in_turn(local_world_size, gpus, devices):
    ranks = [torchrun_rank(local_rank, local_world_size) for local_rank in range(local_world_size)]
    assert [str(resolve_device("auto", rank, gpus)) for rank in ranks] == devices


def test_auto_prefers_nccl_on_gpus_and_a_backend_asked_for_is_the_only_one():
    rank = torchrun_rank(1, 2)
    cuda, cpu = torch.device("cuda", 1), torch.device("cpu")
    assert choose_backends("auto", cuda, rank) == ("nccl", "gloo")  # gloo where two ranks turn out to share a GPU
    assert (choose_backends("nccl", cuda, rank), choose_backends("gloo", cuda, rank)) == (("nccl",), ("gloo",))
    assert choose_backends("auto", cpu, rank) == ("gloo",)
    with pytest.raises(UsageError, match="trainer.dist_backend=nccl needs CUDA GPUs, but this run is on the cpu"):
        choose_backends("nccl", cpu, rank)


def test_an_srun_task_shown_one_gpu_takes_it_whatever_its_local_rank():
    task = Launch("srun", 1, 1, 2, "node01", 20001)  # --gpus-per-task=1, or one GPU the tasks share
    assert str(resolve_device("auto", task, 1)) == "cuda:0"


def test_a_single_process_has_no_backend_and_cuda_needs_a_gpu():
    alone = Launch("single", 0, 0, 1, None, None)
    assert choose_backends("nccl", torch.device("cuda", 0), alone) == ()
    with pytest.raises(UsageError, match="trainer.device=cuda but no CUDA device"):
        resolve_device("cuda", alone, 0)


@pytest.mark.parametrize(("spec", "counts"), [("2(x3),1", [2, 2, 2, 1]), ("4", [4]), ("1,3", [1, 3])])
def test_slurm_tasks_per_node_expand(spec, counts):
    assert slurm.expand_tasks_per_node(spec) == counts


def test_a_requeue_without_scontrol_on_the_path_is_an_outcome_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a container image without SLURM's tools
    said = "scontrol requeue 42 could not run (No such file or directory): requeue the job yourself"
    assert slurm.requeue({"SLURM_JOB_ID": "42"}) == (False, said)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_nccl_on_cpu_ranks_stops_every_rank_in_one_line(tmp_path):
    args = ["data._target_=factories.blobs", "trainer.dist_backend=nccl", f"output_dir={tmp_path}"]
    for rank, error in enumerate(refusals(args)):
        assert error.startswith(f"ddp-train: error (rank {rank}): trainer.dist_backend=nccl needs CUDA GPUs")
    assert not (tmp_path / "checkpoints").exists()


def test_nccl_failures_of_the_rank_itself_are_not_blamed_on_a_lost_peer():
    where = "NCCL error in: ProcessGroupNCCL.cpp:3353, "
    duplicate = f"{where}invalid usage, NCCL version 2.28.9\nLast error:\nDuplicate GPU detected : rank 1 and rank 0"
    memory = f"{where}unhandled cuda error, NCCL version 2.28.9\nLast error:\nCuda failure 'out of memory'"
    lost = f"{where}remote process exited or there was a network error, NCCL version 2.28.9"
    errors = [dist.DistBackendError(text) for text in (duplicate, memory, lost)]
    assert [is_peer_failure(error) for error in errors] == [False, False, True]
    assert is_peer_failure(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"))


def test_a_gpu_whose_driver_gives_no_id_is_not_taken_for_one_that_ranks_share(monkeypatch):
    given = ["GPU-00000000-0000-0000-0000-000000000000", "00000000-0000-0000-0000-000000000000", "GPU-58d9a1c0-7e1f"]
    ids = iter(given)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(uuid=next(ids)))
    assert [gpu_id(torch.device("cuda", 0)) for _ in given] == [None, None, "GPU-58d9a1c0-7e1f"]
    assert gpu_id(torch.device("cpu")) is None
