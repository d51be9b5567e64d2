"""`python -m ddp_trainer.cli.shard`: write a config's map-style dataset as stream shards (train/ and val/)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from ddp_trainer import config
from ddp_trainer.cli import with_one_config
from ddp_trainer.data import map_datasets, unaugmented
from ddp_trainer.data.stream_formats import INDEX_FILE
from ddp_trainer.errors import UsageError


def _class_index(label: Any) -> int:
    """A sample's label as the class index shards hold; UsageError for any other label, which int() would cut."""
    try:
        index = int(label)
    except (TypeError, ValueError, RuntimeError):  # a target of several values, or text
        index = None
    if index is None or index != label:
        raise UsageError(f"shard files hold a class index per record, not the label {label!r} this dataset gives")
    return index


Records = tuple[torch.Tensor, np.ndarray, list[str] | None]  # inputs, class indices, class names


def read_records(dataset: Dataset) -> Records:
    """Every sample of `dataset` as stacked inputs and class indices, and its class names if it has them."""
    samples = [dataset[index] for index in range(len(dataset))]  # once: reading a sample may decode a file
    inputs = torch.stack([torch.as_tensor(sample_input) for sample_input, _ in samples])
    labels = np.array([_class_index(label) for _, label in samples], dtype=np.int64)
    return inputs, labels, [str(name) for name in getattr(dataset, "classes", [])] or None


def write_shards(records: Records, folder: Path, shards: int, shard_format: str) -> list[int]:
    """Split `read_records`' records in order into `shards` files of `folder` plus index.json; return the counts."""
    inputs, labels, classes = records
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for number, part in enumerate(np.array_split(np.arange(len(labels)), shards)):
        name = f"shard-{number:05d}.{shard_format}"
        if shard_format == "npz":
            np.savez(folder / name, x=inputs[part].numpy(), y=labels[part])
        else:
            lines = (json.dumps({"x": inputs[i].flatten().tolist(), "y": int(labels[i])}) for i in part)
            (folder / name).write_text("".join(line + "\n" for line in lines))
        entries.append({"file": name, "records": len(part)})
    index = {
        "format": shard_format,
        "input_shape": list(inputs.shape[1:]),
        "classes": classes,
        "shards": entries,
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    return [entry["records"] for entry in entries]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m ddp_trainer.cli.shard", description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="folder to create; gets train/ and val/")
    parser.add_argument("--shards", type=int, default=8, help="training shards (validation gets half, at least 1)")
    parser.add_argument("--format", choices=("npz", "jsonl"), default="npz")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = with_one_config(parser, argv)  # its data section names the map-style dataset
    try:
        if args.shards < 1:
            raise UsageError(f"--shards={args.shards}: need at least 1")
        if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
            raise UsageError(f"--out {args.out} is not an empty folder; shards are never written over existing files")
        # Shards hold the images as they are: a random crop baked in would be the same every epoch, and differ
        # from one shard run to the next. (A stream's augmentation belongs in its reader.)
        train, val = map_datasets(unaugmented(config.load(args.config, args.overrides).data))
        if isinstance(train, IterableDataset) or isinstance(val, IterableDataset):  # counted only as it is read
            raise UsageError("the data is a stream (an IterableDataset): shards are written from map-style datasets")
        if args.shards > len(train):  # every shard holds a record at least: no folder of empty files
            raise UsageError(f"--shards={args.shards}: more than the {len(train)} training records")
        if val is None:  # before train/ is written: a refused run leaves --out empty, to be run again
            raise UsageError("the data has no validation split: a stream's val/ folder needs a record at least")
        train_records, val_records = read_records(train), read_records(val)  # both refused before a file is written
        try:
            train_counts = write_shards(train_records, args.out / "train", args.shards, args.format)
            val_shards = max(1, min(args.shards // 2, len(val)))
            val_counts = write_shards(val_records, args.out / "val", val_shards, args.format)
        except OSError as error:
            raise UsageError(f"cannot write shards to --out {args.out}: {error.strerror or error}") from None
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)  # as argparse words its own errors
        return 2
    print(
        f"wrote {sum(train_counts)} train records in {len(train_counts)} shards and {sum(val_counts)} val records "
        f"in {len(val_counts)} shards to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
