"""Which device and backend each rank takes: GPUs shared under gloo, NCCL only with one GPU per process."""

from __future__ import annotations

import pytest
import torch
from dist_helpers import refusals

from ddp_trainer import slurm
from ddp_trainer.distributed import Launch, choose_backend, resolve_device
from ddp_trainer.errors import UsageError


def torchrun_rank(local_rank: int, local_world_size: int, nodes: int = 1) -> Launch:
    world_size = local_world_size * nodes
    return Launch("torchrun", local_rank, local_rank, world_size, "127.0.0.1", 29500, local_world_size)


@pytest.mark.parametrize(
    ("local_world_size", "gpus", "devices", "backend"),
    [
        (2, 1, ["cuda:0", "cuda:0"], "gloo"),  # the quickstart on a one-GPU machine
        (2, 2, ["cuda:0", "cuda:1"], "nccl"),
        (4, 2, ["cuda:0", "cuda:1", "cuda:0", "cuda:1"], "gloo"),
        (2, 8, ["cuda:0", "cuda:1"], "nccl"),
        (2, 0, ["cpu", "cpu"], "gloo"),
    ],
)
def test_auto_shares_gpus_over_gloo_only_when_a_node_has_too_few(local_world_size, gpus, devices, backend):
    ranks = [torchrun_rank(local_rank, local_world_size) for local_rank in range(local_world_size)]
    chosen = [resolve_device("auto", rank, gpus) for rank in ranks]
    assert [str(device) for device in chosen] == devices
    assert {choose_backend("auto", device, rank, gpus) for device, rank in zip(chosen, ranks, strict=True)} == {backend}


def test_nccl_on_too_few_gpus_says_how_many_it_needs_on_every_rank():
    for local_rank in (0, 1, 2):  # rank 0 has a GPU of its own, yet must refuse like the others
        rank = torchrun_rank(local_rank, 3)
        with pytest.raises(UsageError, match="nccl needs 3 GPUs per node, one per process, but 2 are visible"):
            choose_backend("nccl", resolve_device("cuda", rank, 2), rank, 2)


def test_gloo_on_enough_gpus_still_gives_each_rank_its_own():
    ranks = [torchrun_rank(local_rank, 2) for local_rank in (0, 1)]
    assert [str(resolve_device("cuda", rank, 2)) for rank in ranks] == ["cuda:0", "cuda:1"]
    assert choose_backend("gloo", torch.device("cuda", 1), ranks[1], 2) == "gloo"


def test_srun_tasks_bound_to_one_gpu_each_use_nccl():
    task = Launch("srun", 1, 1, 2, "node01", 20001, 2)  # --gpus-per-task=1: each task sees only its own GPU
    device = resolve_device("auto", task, 1)
    assert (str(device), choose_backend("auto", device, task, 1)) == ("cuda:0", "nccl")


def test_a_single_process_has_no_backend_and_cuda_needs_a_gpu():
    alone = Launch("single", 0, 0, 1, None, None, 1)
    assert choose_backend("nccl", torch.device("cuda", 0), alone, 1) is None
    with pytest.raises(UsageError, match="trainer.device=cuda but no CUDA device"):
        resolve_device("cuda", alone, 0)


@pytest.mark.parametrize(("spec", "counts"), [("2(x3),1", [2, 2, 2, 1]), ("4", [4]), ("1,3", [1, 3])])
def test_slurm_tasks_per_node_expand(spec, counts):
    assert slurm.expand_tasks_per_node(spec) == counts


def test_srun_ranks_judge_by_the_busiest_node(monkeypatch):
    variables = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "3"}
    variables |= {"SLURM_STEP_TASKS_PER_NODE": "1,2", "SLURM_STEP_NODELIST": "n[1-2]"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    from ddp_trainer.distributed import detect_launcher

    assert detect_launcher().local_world_size == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_nccl_on_cpu_ranks_stops_every_rank_in_one_line(tmp_path):
    args = ["data._target_=factories.blobs", "trainer.dist_backend=nccl", f"output_dir={tmp_path}"]
    for rank, error in enumerate(refusals(args)):
        assert error.startswith(f"ddp-train: error (rank {rank}): trainer.dist_backend=nccl needs CUDA GPUs")
    assert not (tmp_path / "checkpoints").exists()
