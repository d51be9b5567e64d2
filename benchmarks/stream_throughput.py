"""Records/s of a sharded .npz stream at 0, 1 and 2 DataLoader workers against map-style reading of the same records.

Run: python benchmarks/stream_throughput.py [--records 20000 --shards 16 --repeats 5]
Prints the median over repeated epochs and each stream's ratio to the map-style loader with the same workers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import at_least, median
from torch.utils.data import DataLoader

from ddp_trainer.config import StreamConfig
from ddp_trainer.data.datasets import TensorClassification
from ddp_trainer.data.samplers import ResumableDistributedSampler
from ddp_trainer.data.stream_formats import open_stream


def write_shards(folder: Path, records: int, shards: int, shape: tuple[int, ...]) -> None:
    """Random uint8-valued images as float32 `x` and labels `y`, split into `shards` .npz files."""
    generator = np.random.default_rng(0)
    for number, part in enumerate(np.array_split(np.arange(records), shards)):
        inputs = generator.integers(0, 256, size=(len(part), *shape)).astype(np.float32) / 255
        np.savez(folder / f"shard-{number:05d}.npz", x=inputs, y=(part % 10).astype(np.int64))


def epoch_seconds(loader: DataLoader, set_epoch: Callable[[int], None], epoch: int) -> tuple[float, int]:
    """Wall time and record count of one full pass over `loader`."""
    set_epoch(epoch)
    started, seen = time.perf_counter(), 0
    for inputs, _ in loader:
        seen += len(inputs)
    return time.perf_counter() - started, seen


def measure(loader: DataLoader, set_epoch: Callable[[int], None], repeats: int) -> float:
    """Median records/s over `repeats` epochs, after one warm-up epoch."""
    epoch_seconds(loader, set_epoch, 0)
    rates = []
    for epoch in range(1, repeats + 1):
        seconds, seen = epoch_seconds(loader, set_epoch, epoch)
        rates.append(seen / seconds)
    return median(rates)


def main() -> None:
    """Build both loaders for each worker count, measure them side by side, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=at_least(1), default=20000)
    parser.add_argument("--shards", type=at_least(1), default=16)
    parser.add_argument("--batch-size", type=at_least(1), default=64)
    parser.add_argument("--repeats", type=at_least(1), default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = (1, 28, 28)
    with tempfile.TemporaryDirectory() as folder:
        write_shards(Path(folder), args.records, args.shards, shape)
        options = {"batch_size": args.batch_size, "rank": 0, "world_size": 1, "seed": 0, "shuffle_buffer": 1000}
        stream = open_stream(Path(folder), options, StreamConfig())
        shards = [stream.load_shard(path) for path in stream.shards]  # map-style gets every record in memory
        in_memory = TensorClassification(
            torch.cat([s.inputs for s in shards]), torch.cat([s.labels for s in shards]), []
        )
        sampler = ResumableDistributedSampler(in_memory, args.batch_size, num_replicas=1, rank=0, seed=0)
        print(
            f"{args.records} records of {shape} in {args.shards} .npz shards, batch {args.batch_size}, "
            f"median of {args.repeats} epochs, torch {torch.__version__}, {sys.platform}"
        )
        print(f"{'workers':>8} {'map-style rec/s':>16} {'stream rec/s':>13} {'stream / map':>13}")
        for workers in (0, 1, 2):
            map_loader = DataLoader(in_memory, batch_size=args.batch_size, sampler=sampler, num_workers=workers)
            stream_loader = DataLoader(stream, batch_size=None, num_workers=workers)
            map_rate = measure(map_loader, sampler.set_epoch, args.repeats)
            stream_rate = measure(stream_loader, stream.set_epoch, args.repeats)
            print(f"{workers:>8} {map_rate:>16,.0f} {stream_rate:>13,.0f} {stream_rate / map_rate:>13.2f}")


if __name__ == "__main__":
    main()
