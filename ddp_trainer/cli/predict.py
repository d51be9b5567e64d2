"""`ddp-train predict`: top-k classes with probabilities for image files or a dataset split, from a checkpoint."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, NoReturn

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ddp_trainer import changes, data, distributed
from ddp_trainer.atomic import chmod_as_open
from ddp_trainer.cli import run_as
from ddp_trainer.cli.evaluate import Restored, checkpoint_command, load_config, restore
from ddp_trainer.data import to_device
from ddp_trainer.errors import UsageError
from ddp_trainer.precision import MixedPrecision
from ddp_trainer.tasks import inputs_and_targets

Prediction = list[tuple[str, float]]
ClassNames = Callable[[int], str]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """`ddp-train predict --checkpoint PATH (--images FILE ... | --split val|train) [--top-k K] [key=value ...]`."""
    parser = checkpoint_command(
        "predict",
        "Top-k classes and probabilities from a checkpoint's model (eval mode, no gradients, the validation "
        "preprocessing), for image files or for every sample of a dataset split.",
        "ddp-train predict --checkpoint runs/fashion/checkpoints/best.pt --images shoe.png --top-k 3",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", type=Path, metavar="FILE", help="image files (PNG, JPEG, ...)")
    source.add_argument("--split", choices=("val", "train"), help="every sample of this split, in order")
    parser.add_argument("--top-k", type=int, default=5, help="how many classes per input (default 5)")
    parser.add_argument("--output", type=Path, help="JSON lines for --split (default predictions-<split>.jsonl)")
    parser.add_argument("--batch-size", type=int, default=256, help="inputs per forward pass (default 256)")
    args = parser.parse_intermixed_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be positive")
    if args.images and args.output:
        parser.error("--output goes with --split; --images prints a line per image")
    if args.split:
        args.output = args.output or Path(f"predictions-{args.split}.jsonl")
        if args.output.exists():  # say, a run's metrics.jsonl: nothing saved is overwritten
            raise _output_exists(args.output)
    return args


def image_preprocessing(val_set: Dataset, input_shape: tuple[int, ...]) -> Callable[[Path], torch.Tensor]:
    """Image file -> model input, as the validation split prepares its samples (mode, size, normalisation)."""
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise UsageError(f"--images needs a model of 1- or 3-channel images; this one takes inputs of {input_shape}")
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional

    channels, height, width = input_shape
    # torchvision datasets normalise PIL images with their own transform; in-memory tensors (digits) are in [0, 1].
    transform = getattr(val_set, "transform", None) or functional.to_tensor

    def prepare(path: Path) -> torch.Tensor:
        try:
            with Image.open(path) as image:
                converted = image.convert("L" if channels == 1 else "RGB").resize((width, height))
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:  # a bomb's size is refused
            raise UsageError(f"image {path} cannot be read: {error}") from error
        return transform(converted)

    return prepare


@torch.inference_mode()
def top_k(
    model: nn.Module, inputs: torch.Tensor, k: int, precision: MixedPrecision, class_names: ClassNames
) -> list[Prediction]:
    """The k most probable classes of each input with their softmax probabilities, most probable first."""
    with precision.autocast():
        logits = model(inputs)
    probabilities = logits.float().softmax(dim=1)
    values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
    return [
        [(class_names(index), value) for index, value in zip(row_indices, row_values, strict=True)]
        for row_indices, row_values in zip(indices.tolist(), values.tolist(), strict=True)
    ]


def _class_names(dataset: Dataset) -> ClassNames:
    names = getattr(dataset, "classes", None)
    return (lambda index: str(names[index])) if names is not None else str


def _split_batches(restored: Restored, split: str, batch_size: int) -> tuple[Dataset, Iterator]:
    if split == "val":
        dataset = restored.data.val_loader.dataset
        if isinstance(dataset, IterableDataset):  # a stream: it yields whole batches, as its own loader reads them
            return dataset, iter(restored.data.val_loader)
    else:
        dataset = _training_set(restored, "--split train")
    return dataset, iter(DataLoader(dataset, batch_size=batch_size, shuffle=False))


def _training_set(restored: Restored, asked: str) -> Dataset:
    """The train split again, without augmentation: predictions use the validation preprocessing."""
    if isinstance(restored.data.train_loader.dataset, IterableDataset):
        raise UsageError(f"{asked}: this run's training data is a stream, which predict reads as a validation split")
    return data.map_datasets(data.unaugmented(restored.cfg.data))[0]


def _output_exists(output: Path) -> UsageError:
    return UsageError(f"--output {output} exists; predict never overwrites a file")


def _unwritable(output: Path, error: OSError) -> UsageError:
    return UsageError(f"--output {output} cannot be written: {error.strerror or error}")


@contextlib.contextmanager
def _whole_file(output: Path) -> Iterator[Callable[[str], None]]:
    """A `write(text)` into a temporary file beside `output`, linked to that name once complete: never a partial file.

    An OSError on the way (a full disk) is a UsageError naming --output; the temporary file is removed on every path.
    """
    try:
        handle, name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    except OSError as error:
        raise _unwritable(output, error) from None
    temporary, file = Path(name), os.fdopen(handle, "w")

    def write(text: str) -> None:
        try:
            file.write(text)
        except OSError as error:  # only the file's own errors: a dataset's OSError is not about --output
            raise _unwritable(output, error) from None

    try:
        yield write
        _link_complete(file, temporary, output)
    finally:
        with contextlib.suppress(OSError):  # after a failed write, closing would flush into the same full disk
            file.close()
        temporary.unlink(missing_ok=True)


def _link_complete(file: IO[str], temporary: Path, output: Path) -> None:
    try:
        file.flush()
        os.fsync(file.fileno())  # some filesystems (NFS) report a full disk only here or at close
        file.close()
        chmod_as_open(temporary)
        os.link(temporary, output)  # unlike a rename, it refuses a name that appeared since parse_args looked
    except FileExistsError:
        raise _output_exists(output) from None
    except OSError as error:
        raise _unwritable(output, error) from None


def _write_lines(
    write: Callable[[str], None], first_index: int, predictions: list[Prediction], targets: list[str]
) -> tuple[int, int]:
    """One JSON line per sample from `first_index` on; returns the (top-1, top-k) hits among them."""
    top1 = topk = 0
    for index, (prediction, target) in enumerate(zip(predictions, targets, strict=True), start=first_index):
        classes = [name for name, _ in prediction]
        top1, topk = top1 + (classes[0] == target), topk + (target in classes)
        write(json.dumps({"index": index, "target": target, "top_k": prediction}) + "\n")
    return top1, topk


def predict_split(restored: Restored, args: argparse.Namespace, env: distributed.DistEnv) -> str:
    """Write one JSON line per sample of the split; returns the summary line with top-1 and top-k accuracy."""
    precision = MixedPrecision(restored.cfg.trainer.precision, env.device)
    dataset, batches = _split_batches(restored, args.split, args.batch_size)
    output, names = args.output, _class_names(dataset)
    index, top1, topk, shown = 0, 0, 0, args.top_k
    with _whole_file(output) as write:  # a partial file would only block the rerun: predict never overwrites
        for batch in batches:
            inputs, targets = inputs_and_targets(batch)  # a pair, or a dict with "inputs" and "targets"
            inputs = to_device(inputs, env.device, restored.cfg.model.channels_last)
            predictions = top_k(restored.model, inputs, args.top_k, precision, names)
            hits = _write_lines(write, index, predictions, [names(target) for target in targets.tolist()])
            index, top1, topk, shown = index + len(predictions), top1 + hits[0], topk + hits[1], len(predictions[0])
    every = f" (every class: --top-k {args.top_k} is more than the model has)" if shown < args.top_k else ""
    return (
        f"wrote {index} predictions to {output}: top-1 accuracy {100 * top1 / max(index, 1):.2f}%, "
        f"top-{shown} accuracy {100 * topk / max(index, 1):.2f}%{every}"
    )


def predict_images(restored: Restored, args: argparse.Namespace, env: distributed.DistEnv) -> str:
    """One line per image file: its top-k classes with probabilities."""
    precision = MixedPrecision(restored.cfg.trainer.precision, env.device)
    # The validation split says how its samples are prepared; a run without one, its training split unaugmented.
    loader = restored.data.val_loader  # a DataLoader's truth is its len(), which a stream's has not
    val_set = loader.dataset if loader is not None else _training_set(restored, "--images")
    if isinstance(val_set, IterableDataset):  # shards hold samples already transformed; a user's stream its own
        raise UsageError(
            "--images: this run read a stream (data.name=stream, or an IterableDataset), so how to prepare an image "
            "for its model is not known here; use --split val"
        )
    prepare = image_preprocessing(val_set, data.sample_shape(val_set))
    names = _class_names(val_set)
    lines = []
    for start in range(0, len(args.images), args.batch_size):
        files = args.images[start : start + args.batch_size]
        inputs = torch.stack([prepare(path) for path in files])
        inputs = to_device(inputs, env.device, restored.cfg.model.channels_last)
        for path, prediction in zip(files, top_k(restored.model, inputs, args.top_k, precision, names), strict=True):
            lines.append(f"{path}: " + ", ".join(f"{name} ({probability:.4f})" for name, probability in prediction))
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """Entry point of `ddp-train predict`, in one process; returns 0 (errors are raised as UsageError)."""
    args = parse_args(argv)
    state, cfg = load_config(args.checkpoint, args.overrides)
    # One reader: a user's stream split over workers would come back in their round-robin order, not its own. A
    # stream's batches come from its loader: --batch-size sets theirs too. Set here, not as overrides: written keys
    # reach a data factory that takes **kwargs.
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0, batch_size=args.batch_size))
    env = changes.join_run(cfg)
    # SIGTERM (kill, a SLURM time limit) ends it as Ctrl-C does: through the cleanup that removes its temporary file.
    # Only the main thread may set a handler (predict called from another thread keeps the one in place).
    main_thread = threading.current_thread() is threading.main_thread()
    terminated = signal.signal(signal.SIGTERM, _exit_on_signal) if main_thread else None
    try:
        if env.distributed:
            raise UsageError("ddp-train predict runs in one process: start it without torchrun or srun")
        if cfg.task != "classification":
            raise UsageError(
                f"ddp-train predict gives top-k classes of a classification run; {args.checkpoint} is task={cfg.task}"
            )
        restored = restore(args.checkpoint, state, cfg, env, needs_val=args.split == "val")
        summary = predict_split(restored, args, env) if args.split else predict_images(restored, args, env)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, terminated)
        distributed.teardown()
    print(summary, flush=True)
    return 0


def _exit_on_signal(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    run_as("predict")
