"""Where ranks meet: in keys of the store that no earlier attempt wrote, whatever it left behind, at a named master."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import torch.distributed as dist

from ddp_trainer import rendezvous
from ddp_trainer.cli.train import main

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
