"""Where ranks meet: in keys of the store that no earlier attempt wrote, whatever it left behind, at a named master."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist
from dist_helpers import free_port

from ddp_trainer import rendezvous
from ddp_trainer.cli.train import main
from ddp_trainer.errors import UsageError

TIMEOUT = timedelta(seconds=30)


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

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(len(start_delays_s))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
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

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(stores) == [0, 1]  # the step that holds the port met as ever
    started = time.monotonic()
    with pytest.raises(UsageError) as refused:
        rendezvous.open_store("127.0.0.1", port, 2, 1, agent_hosts=False, timeout=TIMEOUT, job=theirs)
    assert str(refused.value) == (
        f"the rendezvous port 127.0.0.1:{port} is held by SLURM job 7, step 0, not by this one (SLURM job 7, step 1): "
        "set MASTER_PORT to a free port"
    )
    assert time.monotonic() - started < TIMEOUT.total_seconds() / 2  # at once, not at the timeout
