"""Keys of a `_target_` config section: each one reaches the factory, or is refused in one line that names it."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from ddp_trainer.errors import UsageError

if TYPE_CHECKING:  # config imports this module
    from ddp_trainer.config import DataConfig, ModelConfig

# Schema keys the trainer reads itself even when a factory builds the section: the loaders' settings, `download`
# (rank 0 calls the factory first while the others wait) and how the model is wrapped. Every other schema key only
# configures a built-in dataset or model.
LOADER_KEYS = {"batch_size", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor", "per_sample_seed"}
TRAINER_KEYS = {"data": {*LOADER_KEYS, "download"}, "model": {"sync_batchnorm", "channels_last"}}
BUILT_INS = {"data": "datasets", "model": "models"}
# What applies when fit() is given the datasets and the model as objects: given datasets are made, nothing to fetch.
OBJECT_KEYS = {section: sorted(keys - {"download"}) for section, keys in TRAINER_KEYS.items()}


def _parameters(factory: Callable[..., Any]) -> tuple[list[str], list[str], bool]:
    """Keywords `factory` takes (a class: its `__init__`'s), those without a default, whether it takes `**kwargs`."""
    try:
        parameters = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # some builtins have no readable signature: the call itself will judge
        return [], [], True
    keywords = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = [p.name for p in keywords if p.default is p.empty]
    return [p.name for p in keywords], required, any(p.kind is p.VAR_KEYWORD for p in parameters)


def collect(raw: DictConfig, section: str, schema: type) -> None:
    """With `_target_`, keys the schema does not know are the factory's keyword arguments (Hydra style)."""
    node = raw.get(section)
    if not isinstance(node, DictConfig) or node.get("_target_") is None:
        return
    known = {f.name for f in dataclasses.fields(schema)}
    extra = [key for key in node.keys() if key not in known]
    node["kwargs"] = OmegaConf.merge(node.get("kwargs") or {}, {key: node[key] for key in extra})
    for key in extra:
        del node[key]


def route(
    section: str, factory: Callable[..., Any] | None, cfg: DataConfig | ModelConfig, written: Sequence[str]
) -> None:
    """Add each schema key in `written` that `factory` takes to `cfg.kwargs`; refuse a key that would reach nothing."""
    if factory is None:
        if cfg.kwargs:  # the built-in datasets and models take their keys by name
            raise UsageError(
                f"config key '{section}.kwargs.{next(iter(cfg.kwargs))}' does nothing: {section}.kwargs are the "
                f"keyword arguments of a {section}._target_ factory, and none is set"
            )
        return
    names, required, takes_any = _parameters(factory)
    refusal = f"is not a parameter of {cfg._target_} (it takes {', '.join(names) or 'no keyword arguments'})"
    for key in cfg.kwargs:
        if not takes_any and key not in names:
            dotted = f"{section}.{key}" if key in written else f"{section}.kwargs.{key}"
            raise UsageError(f"config key '{dotted}' {refusal}")
    fields = {field.name for field in dataclasses.fields(cfg)} - {"_target_", "kwargs"}
    for key in (key for key in written if key in fields):
        if takes_any or key in names:
            cfg.kwargs[key] = getattr(cfg, key)  # the schema keeps it too: the trainer may read it as well
        elif key not in TRAINER_KEYS[section]:
            built_ins = BUILT_INS[section]
            raise UsageError(f"config key '{section}.{key}' {refusal} and only applies to the built-in {built_ins}")
    missing = [name for name in required if name not in cfg.kwargs]
    if missing:  # the factory is called with keywords only: a TypeError traceback at build time otherwise
        raise UsageError(f"config key '{section}.{missing[0]}' is missing: {cfg._target_} requires it")


def saved(section: str, values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A `_target_` section as saved: only the keys that took effect, so loading it back makes the same call."""
    # kwargs holds every keyword the factory got. A schema key among them is saved beside `_target_` too only where
    # the schema holds the value passed: one written under kwargs alone left the schema's default there, which would
    # replace the kwargs value when the file is loaded again. Other schema keys would have them written then: a
    # built-in-only key refused, a trainer key at its default passed to a factory that never got it.
    passed = {key for key, value in values["kwargs"].items() if key in defaults and values[key] == value}
    kept = {"_target_", "kwargs", *passed}
    return {
        key: value
        for key, value in values.items()
        if key in kept or (key in TRAINER_KEYS[section] and value != defaults[key])
    }
