"""Shard formats read from a folder: JSON Lines (one sample per line) and .npz arrays, described by index.json."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddp_trainer.config import StreamConfig
from ddp_trainer.data.datasets import TensorClassification
from ddp_trainer.data.streaming import ShardedIterableDataset
from ddp_trainer.errors import UsageError
from ddp_trainer.fields import SHAPE, is_count, is_shape

INDEX_FILE = "index.json"
FORMATS = {".jsonl": "jsonl", ".npz": "npz"}


class JsonlShards(ShardedIterableDataset):
    """One JSON object per line; `input_field` holds the (nested) numbers, `label_field` the class index."""

    def __init__(
        self, *args: Any, input_field: str, label_field: str, input_shape: list[int] | None, **kw: Any
    ) -> None:
        self.input_field, self.label_field, self.input_shape = input_field, label_field, input_shape
        super().__init__(*args, **kw)

    def count_records(self, path: Path) -> int:
        """Non-blank lines, without parsing them."""
        with path.open("rb") as file:
            return sum(1 for line in file if line.strip())

    def load_shard(self, path: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Parse every line of the shard into (input, label) tensors."""
        samples, shape = [], tuple(self.input_shape or ())
        with path.open() as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    inputs, label = record[self.input_field], record[self.label_field]
                    inputs = torch.as_tensor(np.asarray(inputs, dtype=np.float32))
                    if shape:
                        inputs = inputs.reshape(_fitting(shape, tuple(inputs.shape), f"{path}:{number}"))
                    samples.append((inputs, torch.as_tensor(int(label))))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as error:
                    raise UsageError(
                        f"{path}:{number}: not a record with fields {self.input_field!r} and "
                        f"{self.label_field!r} ({type(error).__name__}: {error})"
                    ) from error
        return samples


class NpzShards(ShardedIterableDataset):
    """`np.savez` files holding arrays `x` (inputs) and `y` (labels) of equal length."""

    def __init__(self, *args: Any, input_shape: list[int] | None, **kw: Any) -> None:
        self.input_shape = input_shape
        super().__init__(*args, **kw)

    def count_records(self, path: Path) -> int:
        """Length of `y`; np.load reads only that array."""
        return len(_arrays(path, "y")[0])

    def load_shard(self, path: Path) -> TensorClassification:
        """The shard's arrays as tensors, indexable per record."""
        inputs, labels = _arrays(path, "x", "y")
        inputs, labels = inputs.astype(np.float32, copy=False), labels.astype(np.int64, copy=False)
        shape = _fitting(tuple(self.input_shape), inputs.shape[1:], str(path)) if self.input_shape else inputs.shape[1:]
        return TensorClassification(torch.from_numpy(inputs).reshape(-1, *shape), torch.from_numpy(labels), [])


def _fitting(shape: tuple[int, ...], found: tuple[int, ...], where: str) -> tuple[int, ...]:
    """`shape`, when a record of shape `found` can take it; UsageError naming the key otherwise."""
    if math.prod(shape) != math.prod(found):
        raise UsageError(
            f"{where}: a record of shape {list(found)} does not fit data.stream.input_shape (or the index's "
            f"input_shape) {list(shape)}"
        )
    return shape


def _arrays(path: Path, *names: str) -> list[np.ndarray]:
    try:
        with np.load(path) as arrays:
            return [arrays[name] for name in names]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:  # truncated, not a zip, an array missing
        reason = f"{type(error).__name__}: {error}"
        raise UsageError(f"{path}: not an .npz shard with arrays 'x' and 'y' ({reason})") from None


def read_index(folder: Path) -> dict[str, Any]:
    """index.json of a shard folder, or one made by listing the folder's .jsonl / .npz files."""
    index_file = folder / INDEX_FILE
    if index_file.is_file():
        try:
            raw = index_file.read_bytes()
        except OSError as error:
            raise UsageError(f"{index_file} cannot be read ({error.strerror})") from None
        try:
            index = json.loads(raw)
        except (ValueError, RecursionError) as error:  # not JSON, not text; nested past the parser's depth to fail
            raise UsageError(f"{index_file} is not valid JSON: {error}") from None
        return _checked_index(index, index_file)
    files = sorted(path for path in folder.iterdir() if path.suffix in FORMATS) if folder.is_dir() else []
    if not files:
        raise UsageError(
            f"data.root: {folder} holds no {INDEX_FILE}, .jsonl or .npz shards (write them with "
            f"python -m ddp_trainer.cli.shard)"
        )
    formats = {FORMATS[path.suffix] for path in files}
    if len(formats) > 1:
        raise UsageError(f"data.root: {folder} mixes .jsonl and .npz shards; keep one format per folder")
    return {"format": formats.pop(), "shards": [{"file": path.name} for path in files]}


def _checked_index(index: Any, index_file: Path) -> dict[str, Any]:
    """index.json as open_stream reads it, its format taken from the files' suffixes when it names none."""

    def refuse(problem: str) -> UsageError:
        return UsageError(f"{index_file}: {problem} (python -m ddp_trainer.cli.shard writes a valid one)")

    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list) or not all(
        isinstance(entry, dict) and isinstance(entry.get("file"), str) for entry in shards
    ):
        raise refuse('expected an object whose "shards" lists objects with a "file" name')
    for entry in shards:
        if Path(entry["file"]).name != entry["file"] or entry["file"] in ("", ".", ".."):  # `../x`, `/etc/x`
            raise refuse(f'"file" {entry["file"]!r} is not the name of a file in this folder')
        records = entry.get("records", 0)
        if not is_count(records) or records < 0:
            raise refuse(f'"records" of {entry["file"]} is {records!r}, not a count')
    shape, classes = index.get("input_shape"), index.get("classes")
    if shape is not None and not is_shape(shape):
        raise refuse(f'"input_shape" is {shape!r}, not {SHAPE}')
    if classes is not None and not (isinstance(classes, list) and all(isinstance(name, str) for name in classes)):
        raise refuse(f'"classes" is {classes!r}, not a list of names')
    formats = {FORMATS.get(Path(entry["file"]).suffix) for entry in shards}
    named = index.get("format", formats.pop() if len(formats) == 1 else None)
    if named not in FORMATS.values():
        raise refuse(
            f'"format" is {named!r}: expected {" or ".join(FORMATS.values())}, or none for shards of one format'
        )
    return {**index, "format": named}


def open_stream(folder: Path, options: dict[str, Any], stream_cfg: StreamConfig) -> ShardedIterableDataset:
    """The sharded dataset stored in `folder`; `options` are ShardedIterableDataset's keyword arguments."""
    index = read_index(folder)
    shards = [folder / entry["file"] for entry in index["shards"]]
    missing = [path for path in shards if not path.is_file()]
    if missing:
        raise UsageError(f"data.root: shard {missing[0]} listed in {folder / INDEX_FILE} does not exist")
    counts = [entry["records"] for entry in index["shards"]] if all("records" in e for e in index["shards"]) else None
    input_shape = stream_cfg.input_shape or index.get("input_shape")
    if index["format"] == "jsonl":
        fields = {"input_field": stream_cfg.input_field, "label_field": stream_cfg.label_field}
        dataset = JsonlShards(shards, counts=counts, input_shape=input_shape, **fields, **options)
    else:
        dataset = NpzShards(shards, counts=counts, input_shape=input_shape, **options)
    dataset.classes = index.get("classes")
    return dataset
