"""Keys of a `_target_` config section: each one reaches the factory, or is refused in one line that names it."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from ddp_trainer import config_sources as sources
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


def _parameters(factory: Callable[..., Any], target: str) -> tuple[list[str], list[str], bool]:
    """Keywords `factory` takes (a class: its `__init__`'s), those without a default, whether it takes `**kwargs`."""
    try:
        parameters = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # some builtins have no readable signature: the call itself will judge
        return [], [], True
    by_position = [p.name for p in parameters if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
    if by_position:  # the factory is called with keywords alone
        raise UsageError(
            f"{target} takes {by_position[0]} by position only, which no config key can give: give it a default, "
            "or let it be given by name"
        )
    keywords = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = [p.name for p in keywords if p.default is p.empty]
    return [p.name for p in keywords], required, any(p.kind is p.VAR_KEYWORD for p in parameters)


def collect(raw: DictConfig, section: str, schema: type) -> None:
    """With `_target_`, keys the schema does not know are the factory's keyword arguments (Hydra style)."""
    node = raw.get(section)
    if not isinstance(node, DictConfig) or node.get("_target_") is None:
        return
    if not isinstance(node.get("kwargs"), DictConfig | None):
        raise UsageError(f"config key '{section}.kwargs' is a section of keys, not {node.get('kwargs')!r}")
    known = {f.name for f in dataclasses.fields(schema)}
    extra = [key for key in node.keys() if key not in known]
    kwargs = node.get("kwargs") or {}
    # A section given both ways is merged key by key, as layers are: only a value given twice with two values clashes.
    sections = [key for key in extra if isinstance(node[key], DictConfig) and isinstance(kwargs.get(key), DictConfig)]
    for key in (key for key in extra if key in kwargs and kwargs[key] != node[key] and key not in sections):
        raise _given_twice(section, key, node[key], kwargs[key], node["_target_"])
    node["kwargs"] = OmegaConf.merge(kwargs, {key: node[key] for key in extra})
    for key in extra:
        del node[key]


def layered(base: DictConfig, layer: DictConfig) -> DictConfig:
    """`layer` merged over `base`; a factory argument's two spellings count as one key, so the later layer's wins."""
    # A file's `model.dropout` loses to an override's `model.kwargs.dropout`, and the other way round: what a layer
    # gives in one spelling replaces the base's value in the other too.
    for section in ("data", "model"):
        old, new = base.get(section), layer.get(section)
        if not (isinstance(old, DictConfig) and isinstance(new, DictConfig)):
            continue
        given = OmegaConf.to_container(new, resolve=False)  # interpolations kept as written: this layer may not hold
        beside = {key: value for key, value in given.items() if key not in ("_target_", "kwargs")}
        pairs = ((old.get("kwargs"), beside), (old, given.get("kwargs")))  # (where base has it, what layer gives)
        for held, values in pairs:
            if isinstance(held, DictConfig) and isinstance(values, dict):
                for key in values.keys() & set(held.keys()) - {"_target_", "kwargs"}:
                    OmegaConf.update(held, key, values[key], merge=True)  # a section: its other keys stay
    return sources.merge(base, layer)


def _given_twice(section: str, key: str, beside: Any, under: Any, target: str) -> UsageError:
    return UsageError(
        f"config keys '{section}.{key}' ({beside!r}) and '{section}.kwargs.{key}' ({under!r}) both give {target} its "
        f"{key}: set one"
    )


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
    names, required, takes_any = _parameters(factory, cfg._target_)
    refusal = f"is not a parameter of {cfg._target_} (it takes {', '.join(names) or 'no keyword arguments'})"
    for key in cfg.kwargs:
        if not takes_any and key not in names:
            dotted = f"{section}.{key}" if key in written else f"{section}.kwargs.{key}"
            raise UsageError(f"config key '{dotted}' {refusal}")
    fields = {field.name for field in dataclasses.fields(cfg)} - {"_target_", "kwargs"}
    for key in (key for key in written if key in fields):
        if key in cfg.kwargs and cfg.kwargs[key] != getattr(cfg, key):  # one of the two would be dropped
            raise _given_twice(section, key, getattr(cfg, key), cfg.kwargs[key], cfg._target_)
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
