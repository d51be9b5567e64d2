"""Loader workers forked while gloo's threads free the tensors of finished collectives, at 2 ranks on CPU.

On CPython 3.8 to 3.11 before their fix for gh-112275, some of those workers stop inside the fork for good; the
loader notices and starts its workers again. This prints, per rank, how many epochs were loaded whole and how many
times workers had to be started again: `python scripts/fork_race.py [EPOCHS]`.
"""

from __future__ import annotations

import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddp_trainer import workers
from ddp_trainer.workers import StopProofLoader

SAMPLES = list(range(16))


def race(rank: int, port: int, epochs: int) -> None:
    """Before each epoch, 20 all_reduces whose tensors only gloo's threads still hold, then a loader's fork."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    workers.WORKER_START_S = 2.0
    restarts, abandon = [0], workers._abandon

    def counted(*args: object) -> None:
        restarts[0] += 1
        abandon(*args)

    workers._abandon = counted
    whole = 0
    for _ in range(epochs):
        finished = [dist.all_reduce(torch.ones(4), async_op=True) for _ in range(20)]
        finished[-1].wait()
        del finished  # the last references to the tensors are now gloo's
        # Forked as under torchrun: a process that mp.spawn started would spawn its workers too.
        loader = StopProofLoader(SAMPLES, batch_size=4, num_workers=2, multiprocessing_context="fork")
        loaded = [int(sample) for batch in loader for sample in batch]
        whole += sorted(loaded) == SAMPLES
    print(
        f"rank {rank}: {whole} of {epochs} epochs loaded whole; workers started again {restarts[0]} times", flush=True
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    mp.spawn(race, args=(free_port, int(sys.argv[1]) if len(sys.argv) > 1 else 1000), nprocs=2)
