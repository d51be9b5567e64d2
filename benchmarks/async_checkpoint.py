"""Async checkpoints: how long one save blocks training, `checkpoint.async_save` against today's rank-0 torch.save.

Run: python benchmarks/async_checkpoint.py [--quick] [--repeats 3]
A 100M-parameter MLP (four 5,000 x 5,000 Linear layers) with AdamW trains on CPU in this process; every few steps
ddp-trainer's `saving.Saver` writes `last.pt` (model + AdamW moments, 1.2 GB), once synchronously and once with
async_save, side by side. The stall of a save is the wall time the training loop spends in `Saver.save`: the whole
write when synchronous; waiting for the previous write (if still running) and the copy to CPU memory when async.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import Report, add_common_arguments, filesystem_of, markdown_table, median, repeats_for
from torch import nn

from ddp_trainer import saving

WIDTH, LAYERS, BATCH = 5000, 4, 16  # 4 x 25M weights: 100M parameters, 1.2 GB of checkpoint with AdamW's moments
QUICK_WIDTH = 256
SAVES, STEPS_BETWEEN_SAVES = 4, 8
GOAL = 0.2  # async stall at most 0.2x the synchronous one
Results = dict[bool, dict[str, list[float]]]  # async_save -> measurement -> seconds


def build(width: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The MLP and its AdamW, with one step taken so the optimizer holds its moments."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(LAYERS)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_step(model, optimizer, width)
    return model, optimizer


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, width: int) -> None:
    """One forward, backward and AdamW step on random data."""
    optimizer.zero_grad(set_to_none=True)
    model(torch.randn(BATCH, width)).square().mean().backward()
    optimizer.step()


def measure(async_save: bool, width: int, saves: int, steps: int, folder: Path) -> dict[str, list[float]]:
    """Stall of each save, seconds per training step between saves, and the end-of-run wait for the last write."""
    model, optimizer = build(width)
    saver = saving.Saver(folder, keep_last=2, async_save=async_save)
    stalls, step_seconds = [], []
    for save in range(saves):
        started = time.perf_counter()
        for _ in range(steps):
            train_step(model, optimizer, width)
        step_seconds.append((time.perf_counter() - started) / steps)
        state = {**saving.model_state(model, optimizer), "epoch": 0, "step": save + 1, "config": {}}
        started = time.perf_counter()
        saver.save(state, ["last"])
        stalls.append(time.perf_counter() - started)
    started = time.perf_counter()
    saver.close()
    return {"stall": stalls, "step": step_seconds, "end": [time.perf_counter() - started]}


def run(quick: bool, repeats: int) -> Report:
    """Both modes, alternating which goes first, `repeats` times; medians side by side."""
    width, saves, steps = (QUICK_WIDTH, 2, 2) if quick else (WIDTH, SAVES, STEPS_BETWEEN_SAVES)
    results: Results = {False: {}, True: {}}
    with tempfile.TemporaryDirectory(prefix="ddp-bench-async-") as temporary:
        for repeat in range(repeats):
            for async_save in (False, True) if repeat % 2 == 0 else (True, False):
                folder = Path(temporary) / f"{'async' if async_save else 'sync'}-{repeat}"
                for name, values in measure(async_save, width, saves, steps, folder).items():
                    results[async_save].setdefault(name, []).extend(values)
        megabytes = (Path(temporary) / "sync-0" / "last.pt").stat().st_size / 1e6
        filesystem = filesystem_of(Path(temporary))
    parameters = LAYERS * (width * width + width)
    title = f"Async checkpoints ({parameters / 1e6:,.1f}M-parameter MLP, AdamW, CPU)"
    return Report(title, _body(results, megabytes, filesystem, saves * repeats, steps))


def _body(results: Results, megabytes: float, filesystem: str, saves: int, steps: int) -> str:
    sync_stall = median(results[False]["stall"])
    rows = []
    for async_save, name in ((False, "rank-0 `torch.save` (today)"), (True, "`checkpoint.async_save=true`")):
        values = results[async_save]
        stall = median(values["stall"])
        rows.append(
            [
                name,
                f"{1000 * stall:,.0f}",
                f"{stall / sync_stall:.2f}x",
                f"{1000 * median(values['step']):,.0f}",
                f"{1000 * median(values['end']):,.0f}",
            ]
        )
    headers = ["save", "stall per checkpoint, ms", "vs today", "ms per training step", "end-of-run wait, ms"]
    ratio = median(results[True]["stall"]) / sync_stall
    verdict = "met" if ratio <= GOAL else "missed"
    return (
        f"{markdown_table(headers, rows)}\n\n"
        f"A {megabytes:,.0f} MB `last.pt` (model and AdamW moments) written with `keep_last=2` on {filesystem}: "
        f"median of {saves} saves per mode, {steps} training steps (batch {BATCH}) before each. Goal: async stall at "
        f"most {GOAL}x today's: {ratio:.2f}x, {verdict}. The async stall is the copy of every tensor to fresh CPU "
        "memory; a step time above today's is the background write competing with training for the cores.\n"
    )


def main() -> None:
    """Parse the flags, measure, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    args = parser.parse_args()
    print(run(args.quick, repeats_for(args.quick, args.repeats, default=1)).markdown())


if __name__ == "__main__":
    main()
