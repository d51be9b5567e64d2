"""`ddp-train consolidate`: a sharded (FSDP) checkpoint folder as one plain checkpoint file, read with weights_only."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from ddp_trainer import atomic, checkpoint, distributed
from ddp_trainer.cli import run_as
from ddp_trainer.errors import UsageError


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """`ddp-train consolidate --checkpoint FOLDER --output FILE`."""
    parser = argparse.ArgumentParser(
        prog="ddp-train consolidate",
        description="Gather a sharded checkpoint (trainer.strategy=fsdp) into one file in this process: the whole "
        "model and optimizer state, keyed by parameter name, with the run's progress and config. evaluate, predict, "
        "trainer.resume and torch.load(..., weights_only=True) read it; any world size can resume from either.",
        epilog="example: ddp-train consolidate --checkpoint runs/big/checkpoints/best --output runs/big/best.pt",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="a sharded checkpoint folder (last, best)")
    parser.add_argument("--output", required=True, type=Path, help="the file to write; must not exist yet")
    return parser.parse_args(argv)


def _exists(output: Path) -> UsageError:
    return UsageError(f"--output {output} exists; consolidate never overwrites a file")


def main(argv: Sequence[str]) -> int:
    """Entry point of `ddp-train consolidate`; returns 0 (errors are raised as UsageError to the caller)."""
    args = parse_args(argv)
    if distributed.detect_launcher().world_size > 1:  # every rank would write the file
        raise UsageError("ddp-train consolidate runs in one process: start it without torchrun or srun")
    if not args.checkpoint.exists():
        raise UsageError(f"--checkpoint {args.checkpoint} does not exist")
    if not args.checkpoint.is_dir():
        raise UsageError(f"--checkpoint {args.checkpoint} is not a sharded checkpoint folder (a file is one already)")
    if args.output.exists():
        raise _exists(args.output)
    if any((args.output.parent / name).exists() for name in ("last", "best")):  # a run's checkpoints folder
        raise UsageError(
            f"--output {args.output} is inside a run's checkpoints folder, where its resume would read the file as "
            "one of the run's own saves; write it elsewhere"
        )
    state = checkpoint.load(args.checkpoint)
    try:
        atomic.save_atomic(state, args.output, exclusive=True)
    except OSError as error:
        if isinstance(error, FileExistsError) and args.output.exists():  # it appeared as the checkpoint was read
            raise _exists(args.output) from None
        raise UsageError(f"cannot write --output {args.output}: {error.strerror or error}") from None
    tensors = [value for value in state["model"].values() if isinstance(value, torch.Tensor)]
    size = sum(tensor.numel() for tensor in tensors)
    print(
        f"wrote {args.output}: epoch {state['epoch']}, step {state['step']}, {size:,} model values (weights, buffers) "
        f"in {len(tensors)} tensors, with the optimizer state ({args.output.stat().st_size / 2**20:.1f} MiB)"
    )
    return 0


if __name__ == "__main__":
    run_as("consolidate")
