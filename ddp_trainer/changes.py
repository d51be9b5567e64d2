"""What a resumed run may change: its config is compared with the checkpoint's before anything is restored.

Also: what the ranks of one run may set each for themselves.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from ddp_trainer import distributed
from ddp_trainer.config import CONTINUABLE, GIVEN, Config, locate, to_container
from ddp_trainer.distributed import DistEnv
from ddp_trainer.errors import UsageError
from ddp_trainer.optim import set_current_lrs

# How the run reports, saves, waits or where it runs: the weights come out the same.
HARMLESS = (
    "output_dir",  # also output_dir_per_array_task: where the files go
    "logging.",
    "trainer.resume",
    "trainer.progress_bar",
    "trainer.log_every_n_steps",
    "trainer.stop_check_every_n_steps",
    "trainer.dist_timeout_s",
    "trainer.startup_timeout_s",
    "trainer.requeue",
    "trainer.device",
    "trainer.dist_backend",
    "trainer.compile",
    "trainer.find_unused_parameters",
    # Checkpoints hold full state dicts, whatever the FSDP units. trainer.strategy is not here: the optimizer's state
    # is keyed by index under ddp and by name under fsdp.
    "trainer.fsdp_wrap",
    "trainer.activation_checkpointing",
    "checkpoint.every_n_steps",
    "checkpoint.every_n_minutes",
    "checkpoint.keep_last",
    "checkpoint.async_save",
    "data.root",
    "data.download",
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "data.prefetch_factor",
    "model.channels_last",
)
# Read by rank 0 alone (what it logs and shows), or a node's own copy of the data (also as a factory's `root`), which
# the datasets' checks compare.
PER_NODE = ("logging.", "trainer.progress_bar", "data.root", "data.kwargs.root")
# A longer or shorter run continues the same one, unless the schedule is stretched over the run's length.
LENGTH = ("trainer.epochs", "trainer.max_steps")
# What the rate of the next step is computed from: the restored optimizer holds the saved schedule's rate instead.
SCHEDULE = (*LENGTH, "optim.lr", "optim.min_lr")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config sections as dotted keys: {"optim.lr": 0.05, ...}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def across_ranks(cfg: Config) -> dict[str, Any]:
    """The config as dotted keys, less those a node may set for itself: every rank of a run must hold the same."""
    return {key: value for key, value in flatten(to_container(cfg)).items() if not key.startswith(PER_NODE)}


def join_run(cfg: Config, refusal: str | None = None) -> DistEnv:
    """distributed.setup() with `cfg`'s device, backend and start-up timeout: every rank must hold the same `cfg`, and
    a `refusal` (why this rank cannot start) stops every rank."""
    return distributed.setup(
        cfg.trainer.device,
        cfg.trainer.startup_timeout_s,
        cfg.trainer.dist_backend,
        same_on_every_rank=across_ranks(cfg),
        refusal=refusal,
    )


class _Unset:
    """A factory argument one config does not set, and its factory has no default for."""

    def __repr__(self) -> str:
        return "unset"


UNSET = _Unset()
FACTORY_ARGUMENT = re.compile(r"^(model|data)\.kwargs\.")
MONITOR_KEYS = ("checkpoint.monitor", "checkpoint.mode")
PLAIN = (type(None), bool, int, float, str, list, dict)  # what a YAML value can be
Choose = Callable[[str | None, str | None], tuple[str, str]]  # monitor.choice for this run's task and data


def differences(state: dict[str, Any], cfg: Config, facts: dict[str, Any], choose: Choose) -> dict[str, tuple]:
    """{key: (old, new)} for every config key both configs hold with different values, or a factory argument that one
    of them sets to another value than the factory's default, and each of the run's `facts` (world size, data sizes)
    that the checkpoint records otherwise. Each config's monitor and mode are compared as `choose` resolves them for
    this run's task and data (unset: the task's); another task or data is a change of its own."""
    old, new = (flatten(state.get("config") or {}), flatten(to_container(cfg)))
    for flat in (old, new):
        flat.update(zip(MONITOR_KEYS, choose(*(flat.get(key) for key in MONITOR_KEYS)), strict=True))
    # Other keys that one config lacks are those a newer release added.
    left_out = {key: _default(new, key) for key in old.keys() ^ new.keys() if FACTORY_ARGUMENT.match(key)}
    compared = old.keys() & new.keys() | left_out.keys()
    compared -= {"trainer.allow_changes"}  # what this run accepts, not what it trains
    # fit() is handed its data and model: their names say nothing (older fit() checkpoints saved the defaults).
    compared -= {key for key in ("data.name", "model.name") if new.get(key) == GIVEN}
    changed = {key: (old.get(key, left_out.get(key)), new.get(key, left_out.get(key))) for key in compared}
    changed = {key: (before, now) for key, (before, now) in changed.items() if before != now}
    # Another world size changes the global batch and every rank's data order; other data sizes, another dataset
    # (fit() is handed its data, which no config key describes).
    changed.update({key: (state[key], now) for key, now in facts.items() if state.get(key, now) != now})
    return dict(sorted(changed.items()))


def _default(flat: dict[str, Any], key: str) -> Any:
    """The factory's default for its argument `key` (`model.kwargs.width`), which a config leaves out; else UNSET."""
    section, name = key.split(".kwargs.", 1)
    try:
        factory = locate(flat.get(f"{section}._target_") or "", f"{section}._target_")
        default = inspect.signature(factory).parameters[name].default
    except (UsageError, KeyError, TypeError, ValueError):  # no factory, no signature, no such parameter (**kwargs)
        return UNSET
    default = list(default) if isinstance(default, tuple) else default  # as a config holds it
    # A default a config cannot hold (an array, a tensor): unset, never compared with == into an array.
    return default if isinstance(default, PLAIN) else UNSET


def changes_result(key: str, cfg: Config) -> bool:
    """Whether a different value of `key` makes the resumed run end elsewhere than the saved run would."""
    if key in LENGTH:
        return cfg.optim.scheduler == "cosine"
    # A schema key the factory takes (data.root as its root) is routed to its arguments: judged as the key it was.
    return not FACTORY_ARGUMENT.sub(r"\1.", key).startswith(HARMLESS)


def check(
    state: dict[str, Any],
    cfg: Config,
    facts: dict[str, Any],
    path: Path,
    report: Callable[[str], None],
    choose: Choose,
) -> list[str]:
    """Refuse a resume whose config changes the result unless trainer.allow_changes accepts it; returns those keys.

    Differences that leave the result as it was go to `report`; `choose` as in `differences`. Every rank reads the
    same file and config, so every rank raises the same one-line error, before any collective.
    """
    changed = differences(state, cfg, facts, choose)
    refused = {key: values for key, values in changed.items() if changes_result(key, cfg)}
    unasked = [key for key in refused if key not in cfg.trainer.allow_changes]
    if unasked:
        listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in refused.items())
        forward = "to train anew, use another output_dir"
        fixed = [key for key in unasked if key not in CONTINUABLE]
        if fixed:
            forward += f"; {', '.join(fixed)} cannot change within one run"
        else:
            keys = ",".join(refused)
            forward += f"; to go on from step {state['step']} with the new values: trainer.allow_changes=[{keys}]"
        raise UsageError(f"checkpoint {path} was saved with another config: {listed}; {forward}")
    harmless = [f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items() if key not in refused]
    if harmless:
        report(f"resuming with changes that leave the result as it was: {', '.join(harmless)}")
    if refused:
        report(f"resuming with the changes trainer.allow_changes accepts: {', '.join(refused)}")
    return list(refused)


def apply(accepted: list[str], cfg: Config, optimizer: torch.optim.Optimizer, scheduler: LambdaLR) -> None:
    """Put accepted optimizer changes into the restored optimizer and schedule, which hold the saved values."""
    changed = [name for name in ("weight_decay", "momentum") if f"optim.{name}" in accepted]
    for group in optimizer.param_groups:  # an optimizer without momentum (AdamW) has no such key to set
        group.update({name: getattr(cfg.optim, name) for name in changed if name in group})
    if "optim.lr" in accepted:
        scheduler.base_lrs = [cfg.optim.lr] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = cfg.optim.lr
    if any(key in accepted for key in SCHEDULE):
        set_current_lrs(scheduler)
