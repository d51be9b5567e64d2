"""`ddp-train evaluate`: a checkpoint's progress and config, and its exact validation metrics measured now."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ddp_trainer import changes, checkpoint, claim, config, data, distributed, models, peers, task_checks
from ddp_trainer.cli import loaded_before_meeting, run_as
from ddp_trainer.config import Config
from ddp_trainer.data import DataBundle
from ddp_trainer.distributed import DistEnv
from ddp_trainer.errors import UsageError, first_line
from ddp_trainer.evaluation import evaluate_model
from ddp_trainer.loggers import format_metrics
from ddp_trainer.precision import MixedPrecision
from ddp_trainer.tasks import Task


@dataclass
class Restored:
    """A checkpoint brought back for inference: its config (with overrides), task, model and data."""

    cfg: Config
    task: Task
    model: nn.Module
    data: DataBundle


# Where a checkpoint was trained says nothing about where it is read: a GPU run's file evaluates on a CPU machine.
PORTABLE = ("trainer.device=auto", "trainer.dist_backend=auto")
# A GPU run's file holds CUDA tensors: without map_location, a CPU-only machine could not read it.
LOAD_WEIGHTS = "model.load_state_dict(torch.load(path, map_location='cpu', weights_only=True)['model'])"


def load_config(path: Path, overrides: Sequence[str]) -> tuple[dict[str, Any], Config]:
    """A checkpoint's state (read with weights_only: never runs code) and its saved config with overrides on top."""
    state = checkpoint.load(path)
    _refuse_untrusted(path, state["config"], overrides)
    if state["config"]["model"].get("name") == config.GIVEN:
        raise UsageError(
            f"checkpoint {path} was saved by fit() with a model given as a Python object, which no config key "
            f"rebuilds: load its weights into your model, {LOAD_WEIGHTS} (a sharded folder: ddp-train consolidate "
            "it into a file first)"
        )
    return state, config.from_container(state["config"], [*PORTABLE, *overrides])


def _refuse_untrusted(path: Path, saved: dict[str, Any], overrides: Sequence[str]) -> None:
    """Refuse a saved config that would run code from the file: a factory the user did not name.

    Its interpolations stay text: `config.from_container` escapes them, so `${oc.env:...}` reads no environment.
    """
    if not all(isinstance(saved.get(section), dict) for section in ("model", "data", "trainer")):
        raise UsageError(f"checkpoint {path} is not a ddp-trainer checkpoint (its config lacks model, data or trainer)")
    nodes, depth = list(saved.values()), 0
    while nodes:
        depth += 1
        if depth > 32:  # a saved config is a few levels deep; a file made to exhaust the stack is not
            raise UsageError(f"checkpoint {path}: its config is nested more than 32 levels deep, refused")
        nodes = [child for node in nodes for child in _children(node)]
    # The file chose the functions: evaluating a checkpoint from elsewhere must not call what it names. Any name the
    # user gives is the user's choice (a factory that moved since).
    named = {item.split("=", 1)[0] for item in overrides if "=" in item}
    unnamed = {
        section: saved[section]["_target_"]
        for section in ("model", "data")
        if saved[section].get("_target_") is not None and f"{section}._target_" not in named
    }
    if unnamed:
        built = " and its ".join(f"{section} with {target}" for section, target in unnamed.items())
        named_again = " ".join(f"{section}._target_={target}" for section, target in unnamed.items())
        raise UsageError(
            f"checkpoint {path} builds its {built}: a factory a file names is imported and called only when you name "
            f"it (or where it moved): add {named_again}"
        )


def _children(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return list(node.values())
    return node if isinstance(node, list) else []


def restore(path: Path, state: dict[str, Any], cfg: Config, env: DistEnv, needs_val: bool = True) -> Restored:
    """Rebuild the checkpoint's model (eval mode, on `env.device`) and data; UsageError names what does not fit."""
    claim.same_on_every_rank(state, path, env)  # a live run's last.pt may change between two ranks' reads
    train_set, val_set = data.build_datasets(cfg.data, env, cfg.seed)
    task = task_checks.resolve(cfg.task)
    if val_set is None and needs_val:
        raise UsageError(f"checkpoint {path}: its run's data has no validation split to evaluate")
    bundle = data.build_loaders(train_set, val_set, cfg.data, env, cfg.seed, getattr(task, "collate", None))
    model = models.build_for(cfg.model, train_set, val_set)
    try:
        model.load_state_dict(checkpoint.fitted(state["model"], model))
    except RuntimeError as error:
        raise UsageError(f"checkpoint {path} does not fit the model its config builds: {first_line(error)}") from error
    # In eval mode SyncBatchNorm is plain BatchNorm: no conversion, so CPU ranks can evaluate a GPU-trained model.
    model = models.prepare_model(model, dataclasses.replace(cfg.model, sync_batchnorm=False), env)
    return Restored(cfg, task, model.eval(), bundle)


def checkpoint_command(command: str, description: str, example: str) -> argparse.ArgumentParser:
    """The parser of a `ddp-train COMMAND` that reads one checkpoint: `--checkpoint PATH` and config overrides."""
    parser = argparse.ArgumentParser(prog=f"ddp-train {command}", description=description, epilog=f"example: {example}")
    parser.add_argument("--checkpoint", required=True, type=Path, help="last.pt, best.pt, step-*.pt or sharded folder")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override the saved config (data.root=...)")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """`ddp-train evaluate --checkpoint PATH [--json] [key=value ...]`."""
    parser = checkpoint_command(
        "evaluate",
        "Print a checkpoint's epoch, step and config, and its validation metrics (exact at any world size: "
        "run it plainly or under torchrun).",
        "ddp-train evaluate --checkpoint runs/digits_mlp/checkpoints/best.pt trainer.device=cpu",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser.parse_intermixed_args(argv)


def report(path: Path, state: dict[str, Any], cfg: Config, metrics: dict[str, float | int], as_json: bool) -> str:
    """What `ddp-train evaluate` prints: the checkpoint's progress, its config and the metrics just measured."""
    if as_json:
        summary = {"checkpoint": str(path), "epoch": state["epoch"], "step": state["step"]}
        return json.dumps({**summary, "metrics": metrics, "config": config.to_container(cfg)})
    saved_by = state.get("world_size", "?")
    return "\n".join(
        [
            f"checkpoint {path}: epoch {state['epoch']}, step {state['step']} (saved at world size {saved_by})",
            "config:",
            *("  " + line for line in config.to_yaml(cfg).splitlines()),
            f"{format_metrics(metrics)} | val/samples {metrics['val/samples']}",
        ]
    )


def main(argv: Sequence[str]) -> int:
    """Entry point of `ddp-train evaluate`; returns 0 (errors are raised as UsageError to the caller)."""
    args = parse_args(argv)
    # Read before joining the others, so a missing or malicious file fails on every rank alike.
    state, cfg = loaded_before_meeting(lambda: load_config(args.checkpoint, args.overrides))
    env = changes.join_run(cfg)
    # A rank that fails alone (a node without the data) is named on the others, which wait for it in a collective.
    try:
        with peers.naming_lost_ranks(env, cfg.trainer.startup_timeout_s, "while evaluating"):
            restored = restore(args.checkpoint, state, cfg, env)
            precision = MixedPrecision(cfg.trainer.precision, env.device)
            loader, channels_last = restored.data.val_loader, cfg.model.channels_last
            metrics = evaluate_model(restored.model, loader, env, precision, restored.task, channels_last)
    finally:
        distributed.teardown()
    if env.is_main:
        print(report(args.checkpoint, state, cfg, metrics, args.json), flush=True)
    return 0


if __name__ == "__main__":
    run_as("evaluate")
