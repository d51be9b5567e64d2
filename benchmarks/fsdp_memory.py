"""FSDP against DDP on CPU: the memory each rank holds and the steps/s, for a 100M-parameter MLP trained by ddp-trainer.

Run: python benchmarks/fsdp_memory.py [--quick] [--repeats 1]
About 5 minutes on 2 CPU cores (--quick, a 0.3M-parameter model at 2 ranks: about 20 s).
Four 5,000 x 5,000 Linear blocks with AdamW train through `ddp_trainer.fit` under torchrun (gloo, one thread per rank)
with trainer.strategy=ddp and trainer.strategy=fsdp (trainer.fsdp_wrap=[Block]), at 2 and 4 ranks, one run after the
other, the same global batch in each. An optimizer-step hook on every rank stamps each step's end; after the last step
it counts the parameter, gradient and AdamW-state bytes the rank holds (its local shards under FSDP) and reads the
process's peak RSS (Linux), so the end-of-run checkpoint, however it is saved, is counted in neither.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from common import Report, add_common_arguments, launch, markdown_table, median, read_json, repeats_for, spread
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import TensorDataset

import ddp_trainer

WIDTH, LAYERS, CLASSES = 5000, 4, 10  # 4 x 25M weights: 100M parameters, 1.6 GB with their gradients and AdamW state
GLOBAL_BATCH, STEPS = 16, 8  # small batches keep compute cheap; the first step is warm-up (AdamW state, FSDP set-up)
QUICK_WIDTH, QUICK_STEPS = 256, 3
STRATEGIES = ("ddp", "fsdp")
MB = 1e6


class Block(nn.Module):
    """One FSDP unit (`trainer.fsdp_wrap=[Block]`): a width x width Linear and its ReLU."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """ReLU(Linear(inputs)); the last block's outputs are the logits (labels use the first CLASSES of them)."""
        return torch.relu(self.linear(inputs))


@dataclasses.dataclass(frozen=True)
class Run:
    """One launch: a strategy at a world size; each rank writes its measurements into `folder`."""

    strategy: str
    world_size: int
    width: int
    steps: int
    folder: str


def current_rss() -> int:
    """Bytes this process holds in memory now (Linux: /proc/self/statm)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    """Bytes of the process's peak resident set so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Lower the peak resident set to the current one (Linux >= 4.0), so the next peak covers what follows only."""
    Path("/proc/self/clear_refs").write_text("5")


def storage_bytes(tensors: Iterable[torch.Tensor], seen: set[int]) -> int:
    """Bytes of the storages behind `tensors` (a DTensor's local shard), each storage counted once across calls."""
    total = 0
    for tensor in tensors:
        storage = (tensor.to_local() if isinstance(tensor, DTensor) else tensor).untyped_storage()
        if storage.data_ptr() not in seen:  # views of one buffer (FSDP's padded shards) hold its memory once
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state (under FSDP its local shards of them)."""
    seen: set[int] = set()
    parameters = list(model.parameters())
    states = (value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value))
    return {
        "parameters": storage_bytes(parameters, seen),
        "gradients": storage_bytes((p.grad for p in parameters if p.grad is not None), seen),
        "optimizer": storage_bytes(states, seen),
    }


class StepProbe:
    """Optimizer-step hook: stamps every step's end; after the first, the peak so far; after the last, what is held."""

    def __init__(self, model: nn.Module, steps: int) -> None:
        self.model, self.steps, self.stamps = model, steps, []
        self.found: dict[str, object] = {}

    def __call__(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        """Called by torch after every optimizer.step() of the trainer, before it zeroes the gradients."""
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == 1:
            # Start-up (the unsharded model built on every rank) and the first step's lazy set-up peak here; the
            # peak from now on is the steady state of training.
            self.found["peak_to_first_step"] = peak_rss()
            reset_peak_rss()
        if len(self.stamps) == self.steps:
            self.found["peak_later_steps"] = peak_rss()
            self.found["held"] = held_bytes(self.model, optimizer)
            self.found["rank"] = dist.get_rank()


def trainer_overrides(run: Run) -> list[str]:
    """ddp-trainer's config for the run: one epoch of `run.steps` steps, no evaluation, the last checkpoint only."""
    return [
        f"trainer.strategy={run.strategy}",
        "trainer.fsdp_wrap=[Block]",
        f"data.batch_size={GLOBAL_BATCH // run.world_size}",
        "data.num_workers=0",
        "trainer.epochs=1",
        "trainer.device=cpu",
        "trainer.resume=none",
        "trainer.progress_bar=false",
        "trainer.log_every_n_steps=1000",  # no running-metrics sync inside the measured steps
        "optim.name=adamw",
        "optim.lr=1e-4",
        "checkpoint.keep_last=0",
        f"output_dir={Path(run.folder) / 'run'}",
    ]


def measure_rank(run: Run) -> None:
    """One rank of a run (under torchrun): train with `ddp_trainer.fit` and write what the probe found."""
    import torch._dynamo  # noqa: F401 - ddp-trainer's optimizer builder imports it (110 MB): an import, not training

    baseline = current_rss()  # after the imports, before the model and the process group
    torch.manual_seed(0)  # the same initial weights on every rank: FSDP shards each rank's copy without a broadcast
    model = nn.Sequential(*(Block(run.width) for _ in range(LAYERS)))
    samples = GLOBAL_BATCH * run.steps  # exactly `steps` batches per rank
    train_data = TensorDataset(torch.randn(samples, run.width), torch.randint(0, CLASSES, (samples,)))
    probe = StepProbe(model, run.steps)
    hook = register_optimizer_step_post_hook(probe)
    try:
        ddp_trainer.fit(model, train_data, overrides=trainer_overrides(run))
    finally:
        hook.remove()
    units = sum(isinstance(module, FSDPModule) for module in model.modules())
    found = {**probe.found, "baseline": baseline, "stamps": probe.stamps, "fsdp_units": units}
    Path(run.folder, f"rank{found['rank']}.json").write_text(json.dumps(found))


def launch_run(run: Run) -> dict[str, float]:
    """Launch one run and reduce its ranks' files: the largest rank's memory, rank 0's steps/s."""
    Path(run.folder).mkdir(parents=True)
    launch([__file__, "--worker", json.dumps(dataclasses.asdict(run))], run.world_size, timeout_s=600)
    ranks = [read_json(Path(run.folder) / f"rank{rank}.json") for rank in range(run.world_size)]
    stamps = ranks[0]["stamps"]
    return {
        "held": max(sum(rank["held"].values()) for rank in ranks),
        "peak": max(max(r["peak_to_first_step"], r["peak_later_steps"]) - r["baseline"] for r in ranks),
        "steady": max(rank["peak_later_steps"] - rank["baseline"] for rank in ranks),
        "steps_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),  # the steps after the first
        "fsdp_units": ranks[0]["fsdp_units"],
    }


Results = dict[tuple[int, str], list[dict[str, float]]]  # (world size, strategy) -> one entry per repeat


def run(quick: bool, repeats: int) -> Report:
    """Both strategies at each world size, one run at a time, alternating which goes first; medians side by side."""
    width, steps, world_sizes = (QUICK_WIDTH, QUICK_STEPS, (2,)) if quick else (WIDTH, STEPS, (2, 4))
    results: Results = {}
    with tempfile.TemporaryDirectory(prefix="ddp-bench-fsdp-") as temporary:
        for repeat in range(repeats):
            for world_size in world_sizes:
                for strategy in STRATEGIES if repeat % 2 == 0 else STRATEGIES[::-1]:
                    folder = str(Path(temporary) / f"{strategy}-{world_size}-{repeat}")
                    found = launch_run(Run(strategy, world_size, width, steps, folder))
                    results.setdefault((world_size, strategy), []).append(found)
    parameters = LAYERS * (width * width + width)
    title = f"FSDP against DDP: memory per rank and steps/s ({parameters / 1e6:,.1f}M-parameter MLP, AdamW, CPU)"
    return Report(title, _body(results, world_sizes, steps, repeats))


def _medians(results: Results, world_size: int, strategy: str) -> dict[str, float]:
    """Each measurement's median over the repeats of one (world size, strategy)."""
    runs = results[world_size, strategy]
    return {name: median([found[name] for found in runs]) for name in ("held", "peak", "steady", "steps_per_s")}


def _memory_rows(results: Results, world_sizes: tuple[int, ...]) -> list[list[str]]:
    rows = []
    for world_size in world_sizes:
        ddp = _medians(results, world_size, "ddp")
        for strategy in STRATEGIES:
            values = _medians(results, world_size, strategy)
            # The goal, "1/N of DDP's parameter+optimizer memory plus a constant": this is the constant.
            constant = "-" if strategy == "ddp" else f"{(values['peak'] - ddp['held'] / world_size) / MB:+,.0f}"
            rows.append(
                [str(world_size), strategy, f"{values['held'] / MB:,.0f}", f"{values['held'] / ddp['held']:.2f}"]
                + [f"{values['peak'] / MB:,.0f}", f"{values['peak'] / ddp['peak']:.2f}"]
                + [f"{values['steady'] / MB:,.0f}", constant]
            )
    return rows


def _speed_rows(results: Results, world_sizes: tuple[int, ...]) -> list[list[str]]:
    rows = []
    for world_size in world_sizes:
        rates = {strategy: [found["steps_per_s"] for found in results[world_size, strategy]] for strategy in STRATEGIES}
        ddp, fsdp = median(rates["ddp"]), median(rates["fsdp"])
        batch = f"{GLOBAL_BATCH} ({GLOBAL_BATCH // world_size} per rank)"
        rows.append(
            [str(world_size), batch, f"{ddp:.3f}", spread(rates["ddp"]), f"{fsdp:.3f}", spread(rates["fsdp"])]
            + [f"{fsdp / ddp:.2f}"]
        )
    return rows


def _body(results: Results, world_sizes: tuple[int, ...], steps: int, repeats: int) -> str:
    memory_headers = [
        "ranks", "strategy", "params+grads+AdamW, MB", "vs DDP", "peak RSS growth, MB", "vs DDP",
        "peak after step 1, MB", "peak - DDP's tensors/N, MB",
    ]  # fmt: skip
    speed_headers = ["ranks", "global batch", "DDP steps/s", "spread", "FSDP steps/s", "spread", "FSDP vs DDP"]
    units = results[world_sizes[0], "fsdp"][0]["fsdp_units"]
    ratios = {n: _medians(results, n, "fsdp")["held"] / _medians(results, n, "ddp")["held"] for n in world_sizes}
    goals = ", ".join(f"{ratio:.2f} at {n} ranks (1/N = {1 / n:.2f})" for n, ratio in ratios.items())
    return (
        f"{markdown_table(memory_headers, _memory_rows(results, world_sizes))}\n\n"
        f"{markdown_table(speed_headers, _speed_rows(results, world_sizes))}\n\n"
        f"Each rank trains {steps} steps through `ddp_trainer.fit` (FSDP: {units} units, the {LAYERS} blocks and the "
        f"root); the largest rank's memory and rank 0's steps/s, median of {repeats} run(s). Memory is measured at the "
        "end of the last step, before the end-of-run checkpoint. `params+grads+AdamW` counts the storage of the "
        "parameter, gradient and AdamW-state tensors the rank holds (FSDP: the local shards of its DTensors). `peak "
        "RSS growth` is the process's peak resident memory (ru_maxrss) minus its RSS after the imports; `after step "
        "1` is that peak with the high-water mark reset after the first step (it leaves out building the unsharded "
        "model on every rank); `peak - DDP's tensors/N` is the constant in 'FSDP holds 1/N of DDP's parameter and "
        f"optimizer memory plus a constant'. FSDP's tensors against DDP's: {goals}. Steps/s counts the steps after the "
        "first.\n"
    )


def main() -> None:
    """Parse the flags, measure, print the tables; with --worker, be one rank of one run (what `launch_run` starts)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--worker", type=json.loads, help=argparse.SUPPRESS)  # a Run as JSON
    args = parser.parse_args()
    if args.worker is not None:
        measure_rank(Run(**args.worker))
        return
    print(run(args.quick, repeats_for(args.quick, args.repeats, default=1)).markdown())


if __name__ == "__main__":
    main()
