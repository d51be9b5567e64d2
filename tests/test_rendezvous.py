"""Where ranks meet: in keys of the store that no earlier attempt wrote, whatever it left behind, at a named master."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch.distributed as dist
from dist_helpers import free_port

from ddp_trainer import distributed, rendezvous
from ddp_trainer.cli.train import main
from ddp_trainer.errors import UsageError

TIMEOUT = timedelta(seconds=30)


def in_threads(rank_main: Callable[[int], None], world_size: int) -> None:
    """rank_main(rank) for every rank at once, each in a thread of its own, until all ended (60 s at most)."""
    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)


def attempt(port: int, start_delays_s: list[float]) -> list[int]:
    """One attempt of len(start_delays_s) ranks (threads) in the agent's store: the members each rank counts there."""
    members: list[int] = [0] * len(start_delays_s)

    def rank_main(rank: int) -> None:
        time.sleep(start_delays_s[rank])
        store = rendezvous.open_store("127.0.0.1", port, len(start_delays_s), rank, agent_hosts=True, timeout=TIMEOUT)
        store.add("members", 1)
        store.set(f"joined_{rank}", "1")
        store.wait([f"joined_{other}" for other in range(len(start_delays_s))])
        members[rank] = store.add("members", 0)

    in_threads(rank_main, len(start_delays_s))
    return members


def test_a_restarted_attempt_meets_in_new_keys_though_a_late_rank_left_its_old_token():
    agent_store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=TIMEOUT)  # outlives the attempts, as torchrun's does
    assert attempt(agent_store.port, [0.0, 0.0, 0.0]) == [3, 3, 3]
    # Rank 2 starts late: rank 0 first finds the token rank 2 drew in the first attempt, which rank 2 must refuse.
    assert attempt(agent_store.port, [0.0, 0.0, 1.5]) == [3, 3, 3]
    assert attempt(agent_store.port, [0.8, 0.0]) == [2, 2]  # fewer ranks, and rank 0 the last to start


def test_ranks_started_by_hand_without_a_master_are_told_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert main(["trainer.device=cpu", f"output_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == (
        "ddp-train: error (rank 1): RANK and WORLD_SIZE are set, MASTER_ADDR or MASTER_PORT is not: set both, "
        "or use torchrun\n"
    )


def test_a_rank_refuses_the_store_that_another_srun_step_holds_its_port_with():
    # Two steps of a job side by side, told the same MASTER_PORT: step 1's rank 0 could not bind it, so its rank 1
    # found step 0's store. It wrote its token there and waited out the timeout, or took a place in step 0's round.
    port, ours, theirs = free_port(), "SLURM job 7, step 0", "SLURM job 7, step 1"
    stores: dict[int, dist.Store] = {}

    def rank_main(rank: int) -> None:
        stores[rank] = rendezvous.open_store("127.0.0.1", port, 2, rank, agent_hosts=False, timeout=TIMEOUT, job=ours)

    in_threads(rank_main, 2)
    assert sorted(stores) == [0, 1]  # the step that holds the port met as ever
    started = time.monotonic()
    with pytest.raises(UsageError) as refused:
        rendezvous.open_store("127.0.0.1", port, 2, 1, agent_hosts=False, timeout=TIMEOUT, job=theirs)
    assert str(refused.value) == (
        f"the rendezvous port 127.0.0.1:{port} is held by SLURM job 7, step 0, not by this one (SLURM job 7, step 1): "
        "set MASTER_PORT to a free port"
    )
    assert time.monotonic() - started < TIMEOUT.total_seconds() / 2  # at once, not at the timeout


def meet(facts: list[dict], gpus: list[str | None] | None = None) -> list[tuple[str, str]]:
    """Each rank (a thread, rank 0 hosting the store) tells its `facts` and GPU id: what each was told ("" where it
    went on), and the backend it was given."""
    port, told, stores = free_port(), [("", "")] * len(facts), [None] * len(facts)

    def rank_main(rank: int) -> None:
        # Kept: rank 0's store must outlive the others' reading, as it does in a run that goes on to train.
        stores[rank] = rendezvous.open_store("127.0.0.1", port, len(facts), rank, agent_hosts=False, timeout=TIMEOUT)
        said, backend = rendezvous.agree(stores[rank], rank, len(facts), facts[rank], gpu=gpus[rank] if gpus else None)
        told[rank] = (said or "", backend)

    in_threads(rank_main, len(facts))
    return told


def meet_and_compare(facts: list[dict]) -> list[str]:
    """Each rank (a thread, rank 0 hosting the store) compares its `facts`: what each was told, "" where it went on."""
    return [said for said, _ in meet(facts)]


def test_ranks_sharing_a_gpu_take_gloo_and_are_refused_nccl_and_ranks_on_gpus_of_their_own_take_nccl():
    auto, nccl, host = {"backends": ["nccl", "gloo"]}, {"backends": ["nccl"]}, socket.gethostname()
    assert meet(3 * [auto], ["GPU-a", "GPU-b", "GPU-c"]) == 3 * [("", "nccl")]
    # srun tasks shown one GPU each cannot tell whether it is the same one: only the ids can.
    assert meet(3 * [auto], ["GPU-a", "GPU-b", "GPU-a"]) == 3 * [("", "gloo")]
    assert meet(3 * [nccl], ["GPU-a", "GPU-b", "GPU-b"]) == 3 * [
        (
            f"trainer.dist_backend=nccl needs a GPU per rank, but ranks 1 and 2 (on {host}) share one; start one "
            "process per GPU, or set trainer.dist_backend=auto (or gloo) to let ranks share GPUs",
            "",
        )
    ]
    assert meet(2 * [{"backends": ["gloo"]}], [None, None]) == 2 * [("", "gloo")]  # CPU ranks


def test_ranks_that_run_the_same_go_on_and_every_rank_refuses_when_one_differs():
    same = {"torch": "2.14.1", "backend": "gloo", "optim.lr": 0.001, "data.hidden": [16]}
    assert meet_and_compare([same, dict(same), dict(same)]) == ["", "", ""]
    other_torch = {**same, "torch": "2.11.0"}
    said = meet_and_compare([same, same, other_torch])
    host = socket.gethostname()
    assert said == 3 * [  # rank 1, which runs what rank 0 does, refuses too: the others would wait for it forever
        f"the ranks do not run the same: rank 2 (on {host}) has torch=2.11.0 where rank 0 (on {host}) has "
        "torch=2.14.1; give every node the same config, overrides and packages"
    ]


def test_a_refusal_names_the_first_differing_rank_a_few_of_its_keys_and_how_many_ranks_differ():
    first = {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "backend": "gloo"}
    said = meet_and_compare([first, {**first, "backend": "nccl"}, {"a": 0, "b": 0, "c": 0, "f": 6, "backend": "gloo"}])
    host = socket.gethostname()
    assert set(said) == {
        f"the ranks do not run the same: rank 1 (on {host}) has backend=nccl where rank 0 (on {host}) has "
        "backend=gloo (2 of 3 ranks differ); give every node the same config, overrides and packages"
    }
    said = meet_and_compare([first, {"a": 0, "b": 0, "c": 0, "f": 6, "backend": "gloo"}])
    assert set(said) == {
        f"the ranks do not run the same: rank 1 (on {host}) has a=0, b=0, c=0, d=absent (and 2 more) where rank 0 (on "
        f"{host}) has a=1, b=2, c=3, d=4; give every node the same config, overrides and packages"
    }


def test_a_nan_both_ranks_hold_is_the_same_value_not_a_difference():
    first = {"model.kwargs.scale": float("nan"), "optim.lr": 0.001}
    assert meet_and_compare([first, {**first}]) == ["", ""]
    said = meet_and_compare([first, {**first, "optim.lr": 0.5}])
    assert set(said) == {
        f"the ranks do not run the same: rank 1 (on {socket.gethostname()}) has optim.lr=0.5 where rank 0 (on "
        f"{socket.gethostname()}) has optim.lr=0.001; give every node the same config, overrides and packages"
    }


def test_a_store_gone_under_torchrun_is_blamed_on_its_agent_not_rank_0(monkeypatch):
    # Under torchrun the agent on the rendezvous endpoint's node hosts the store: rank 0 may run on another node.
    gone = dist.DistNetworkError("Connection reset by peer")
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(name, value)
    launch = distributed.detect_launcher()
    said = str(rendezvous.named_failure(gone, "node07:29500", "trainer.startup_timeout_s=60", launch.agent_store))
    assert said.endswith("its host (the torchrun agent on the rendezvous endpoint's node) stopped; see its output")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")
    launch = distributed.detect_launcher()
    said = str(rendezvous.named_failure(gone, "node07:29500", "trainer.startup_timeout_s=60", launch.agent_store))
    assert said.endswith("its host (rank 0) stopped; see its output")


def test_a_rank_whose_rank_0_never_listened_is_not_told_another_program_holds_the_port(monkeypatch):
    # TCPStore's client retries past its timeout where nothing listens (a 5 s timeout gave up after 8 to 13 s): the
    # wait for its answer ended first, and a rank whose rank 0 never started was told another program held the port.
    monkeypatch.setattr(rendezvous, "_ANSWER_GRACE_S", 0.0)
    port = free_port()
    with pytest.raises(dist.DistNetworkError) as raised:
        rendezvous.open_store("127.0.0.1", port, 2, 1, agent_hosts=False, timeout=timedelta(seconds=1))
    for thread in rendezvous._STRANDED:  # still connecting: alive at exit, its TCPStore would abort the process
        thread.join(timeout=30)
    said = str(rendezvous.named_failure(raised.value, f"127.0.0.1:{port}", "trainer.startup_timeout_s=1", False))
    assert said == (
        f"rank 0 never opened the rendezvous at 127.0.0.1:{port} (trainer.startup_timeout_s=1): Nothing took a "
        f"connection at (127.0.0.1, {port}): timed out after 1 s. See rank 0's output"
    )
