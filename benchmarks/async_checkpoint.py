"""Checkpoint stalls: how long one save blocks training on 2 ranks, for each way ddp-trainer can save.

Run: python benchmarks/async_checkpoint.py [--quick] [--repeats 1]
A 100M-parameter MLP (four 5,000 x 5,000 Linear layers) with AdamW trains on 2 CPU ranks (gloo) in one process group;
every few steps ddp-trainer's own saver writes the model and AdamW moments (1.2 GB), in four modes side by side:
DDP with rank 0's `torch.save` (today's default) and with `checkpoint.async_save`, and FSDP (`trainer.strategy=fsdp`)
writing sharded DCP folders, synchronously and with `checkpoint.async_save`. The stall of a save is what the trainer
waits for: the saver's call plus the barrier after it (DDP's other rank waits there for rank 0's write), the slower
rank's time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import Report, add_common_arguments, filesystem_of, markdown_table, median, repeats_for
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddp_trainer import config, saving
from ddp_trainer.sharding import shard_model

WIDTH, LAYERS, BATCH, RANKS = 5000, 4, 16, 2  # 4 x 25M weights: 100M parameters, 1.2 GB of state with AdamW
QUICK_WIDTH = 256
SAVES, STEPS_BETWEEN_SAVES = 4, 4
GOAL = 0.2  # async sharded stall at most 0.2x today's
MODES = {  # row name -> (trainer.strategy, checkpoint.async_save)
    "DDP, rank-0 `torch.save` (today)": ("ddp", False),
    "DDP, `checkpoint.async_save=true`": ("ddp", True),
    "FSDP, sharded DCP": ("fsdp", False),
    "FSDP, sharded DCP, `checkpoint.async_save=true`": ("fsdp", True),
}
Results = dict[str, dict[str, list[float]]]  # mode -> measurement -> seconds


def build(width: int, strategy: str) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """(bare model, what trains, AdamW) on this rank, sharded by ddp-trainer's own shard_model under fsdp."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(LAYERS)))
    if strategy == "fsdp":
        cfg = config.load(None, ["trainer.strategy=fsdp", "trainer.fsdp_wrap=[Linear]"]).trainer
        shard_model(model, cfg, torch.device("cpu"))
        return model, model, torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, DistributedDataParallel(model), torch.optim.AdamW(model.parameters(), lr=1e-4)


def train_step(trained: nn.Module, optimizer: torch.optim.Optimizer, width: int) -> None:
    """One forward, backward and AdamW step on random data."""
    optimizer.zero_grad(set_to_none=True)
    trained(torch.randn(BATCH, width)).square().mean().backward()
    optimizer.step()


def measure(mode: str, width: int, saves: int, steps: int, folder: Path) -> dict[str, list[float]]:
    """This rank's stall of each save, seconds per step between saves, and the end-of-run wait for the last write."""
    strategy, async_save = MODES[mode]
    model, trained, optimizer = build(width, strategy)
    train_step(trained, optimizer, width)  # AdamW holds its moments from here on
    keys = [f"trainer.strategy={strategy}", "checkpoint.keep_last=1", f"checkpoint.async_save={async_save}"]
    saver = saving.build_saver(config.load(None, keys), folder)  # the trainer's saver for these keys
    stalls, step_seconds = [], []
    for save in range(saves):
        started = time.perf_counter()
        for _ in range(steps):
            train_step(trained, optimizer, width)
        step_seconds.append((time.perf_counter() - started) / steps)
        state = {"epoch": 0, "step": save + 1, "config": {}} if dist.get_rank() == 0 else None
        started = time.perf_counter()
        saver.save_run(model, optimizer, state, ["last"], save + 1)
        dist.barrier()  # as the trainer's save ends: the ranks agree the save was issued
        stalls.append(time.perf_counter() - started)
    started = time.perf_counter()
    saver.close()
    dist.barrier()
    return {"stall": stalls, "step": step_seconds, "end": [time.perf_counter() - started]}


def rank_main(rank: int, port: int, width: int, saves: int, steps: int, repeats: int, folder: str) -> None:
    """One rank: every mode `repeats` times, alternating the order; rank 0 writes the slower rank's figures."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    results: Results = {mode: {} for mode in MODES}
    for repeat in range(repeats):
        for mode in list(MODES) if repeat % 2 == 0 else list(reversed(MODES)):
            measured = measure(mode, width, saves, steps, Path(folder) / f"{MODES[mode][0]}-{MODES[mode][1]}-{repeat}")
            gathered: list[dict[str, list[float]]] = [{} for _ in range(RANKS)]
            dist.all_gather_object(gathered, measured)
            for name in measured:  # per save, the rank that waited longer: training goes on only when both do
                slowest = [max(values) for values in zip(*(ranks[name] for ranks in gathered), strict=True)]
                results[mode].setdefault(name, []).extend(slowest)
            gc.collect()  # the previous mode's model and optimizer go before the next one is built
    if rank == 0:
        (Path(folder) / "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def run(quick: bool, repeats: int) -> Report:
    """All modes on 2 ranks in one process group; medians side by side."""
    width, saves, steps = (QUICK_WIDTH, 2, 2) if quick else (WIDTH, SAVES, STEPS_BETWEEN_SAVES)
    with tempfile.TemporaryDirectory(prefix="ddp-bench-async-") as temporary, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        mp.spawn(rank_main, args=(port, width, saves, steps, repeats, temporary), nprocs=RANKS, join=True)
        results = json.loads((Path(temporary) / "results.json").read_text())
        megabytes = (Path(temporary) / "ddp-False-0" / "last.pt").stat().st_size / 1e6
        filesystem = filesystem_of(Path(temporary))
    parameters = LAYERS * (width * width + width)
    title = f"Checkpoint stalls ({parameters / 1e6:,.1f}M-parameter MLP, AdamW, 2 CPU ranks)"
    return Report(title, _body(results, megabytes, filesystem, saves * repeats, steps))


def _body(results: Results, megabytes: float, filesystem: str, saves: int, steps: int) -> str:
    today = median(results[next(iter(MODES))]["stall"])
    rows = []
    for mode, values in results.items():
        stall = median(values["stall"])
        row = [f"{1000 * stall:,.0f}", f"{stall / today:.2f}x", f"{1000 * median(values['step']):,.0f}"]
        rows.append([mode, *row, f"{1000 * median(values['end']):,.0f}"])
    headers = ["save", "stall per checkpoint, ms", "vs today", "ms per training step", "end-of-run wait, ms"]
    ratio = median(results[list(MODES)[-1]]["stall"]) / today
    verdict = "met" if ratio <= GOAL else "missed"
    return (
        f"{markdown_table(headers, rows)}\n\n"
        f"{megabytes:,.0f} MB of model and AdamW moments per checkpoint (`keep_last=1`, {filesystem}): median of "
        f"{saves} saves per mode, {steps} training steps (batch {BATCH} per rank) before each, all modes in one "
        f"process group. Goal: async sharded stall at most {GOAL}x today's: {ratio:.2f}x, {verdict}. An async stall is "
        "the copy of the rank's tensors into CPU buffers allocated at the first save and reused after: under DDP "
        "rank 0 copies all of them, under FSDP each rank its half. A step time above today's is the background write "
        "competing with training for the cores.\n"
    )


def main() -> None:
    """Parse the flags, measure, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    args = parser.parse_args()
    print(run(args.quick, repeats_for(args.quick, args.repeats, default=1)).markdown())


if __name__ == "__main__":
    main()
