"""Where a config's keys come from (a YAML file or mapping, `key=value` overrides), merged in layers, and OmegaConf's
errors told in one line that names the key at fault."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, ValueNode
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ddp_trainer.errors import UsageError, first_line


def read(source: str | Path | Mapping[str, Any] | None) -> DictConfig:
    """The keys of a YAML file, of a mapping, or none; UsageError for a missing or unreadable file."""
    if source is None or isinstance(source, Mapping):
        try:
            return OmegaConf.create(dict(source or {}))
        except OmegaConfBaseException as error:  # a value OmegaConf cannot hold: a NumPy float from a sweep, say
            raise UsageError(_message(error)) from None
    file = Path(source)
    if file.is_dir() or not file.exists():  # a pipe (`--config <(...)`) is no regular file, yet reads as one
        raise UsageError(f"config file {file} " + ("is a folder" if file.is_dir() else "does not exist"))
    try:
        loaded = OmegaConf.load(file)
    except OSError as error:  # unreadable, or OmegaConf's word for a file holding one value where keys belong
        held = re.fullmatch(r"Invalid loaded object type: (\w+)", str(error))
        problem = (
            f"must hold a mapping of keys, not one {held[1]} value" if held else f"cannot be read ({first_line(error)})"
        )
        raise UsageError(f"config file {file} {problem}") from None
    except Exception as error:  # YAML errors come in several types; all mean the same to the user
        raise UsageError(f"config file {file} is not valid YAML: {_yaml_problem(error)}") from error
    if not isinstance(loaded, DictConfig):
        raise UsageError(f"config file {file} must hold a mapping of keys, not a list")
    return loaded


def _yaml_problem(error: Exception) -> str:
    """What a YAML error found, and on which line: its first line is only the context ("while constructing...")."""
    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    if problem is None:
        return first_line(error)
    return f"{problem} (line {mark.line + 1})" if mark is not None else problem


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """`key=value` strings as one layer of keys; UsageError for a string of another form."""
    layer = OmegaConf.create()
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UsageError(f"override {item!r} is not of the form key=value")
        key, _, text = item.partition("=")
        if _comment_cut(text):
            scalar = not text.lstrip().startswith(("[", "{"))
            hint = f"the value: {key}='\"{text}\"'" if scalar else "the text that holds it"
            raise UsageError(f"override {item!r}: YAML reads '#' there as a comment and drops the rest; quote {hint}")
        try:  # one at a time, so the error names the override at fault
            layer.merge_with_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as error:  # a value like [1,2 is a YAML error
            detail = getattr(error, "problem", None) or first_line(error)  # YAML's own first line is its context
            raise UsageError(f"override {item!r} could not be parsed: {detail}") from None
    return layer


def _comment_cut(text: str) -> bool:
    """Whether YAML drops part of `text` as a comment: a '#' after its start or a space, outside quotes."""
    if "#" not in text:
        return False
    probe = OmegaConf.create()  # read as the override itself is read
    try:
        probe.merge_with_dotlist([f"value={text}"])
    except (OmegaConfBaseException, yaml.YAMLError):  # the override's own merge says what is wrong with it
        return False
    return text.count("#") > str(OmegaConf.to_container(probe)["value"]).count("#")


def merge(base: DictConfig, layer: DictConfig) -> DictConfig:
    """`layer`'s keys over `base`'s; UsageError naming the key where `layer` does not fit (a list for a section...)."""
    try:
        return OmegaConf.merge(base, layer)
    except (OmegaConfBaseException, TypeError) as error:  # TypeError: a mapping and a list met
        clash = _clash(base, layer)
        if clash is None:
            raise UsageError(_message(error, base)) from None  # the line says it all; OmegaConf's trace is noise
        key, held, value = clash
        if isinstance(held, DictConfig):
            raise UsageError(f"config key '{key}' is a section of keys, not {_plain(value)!r}") from None
        raise UsageError(_a_list(key, _plain(value))) from None


def _a_list(key: str, value: Any) -> str:
    return f"config key '{key}' is a list, not {value!r}: give it whole, {key}=[...]"  # OmegaConf sets no item


def resolved(defaults: Mapping[str, Any], layer: DictConfig) -> DictConfig:
    """`layer`'s keys over `defaults`, interpolations resolved; UsageError naming the key one fails at."""
    merged = merge(OmegaConf.create(dict(defaults)), layer)
    try:
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as error:
        raise UsageError(_message(error)) from None
    return OmegaConf.create(literal(OmegaConf.to_container(merged)))


def literal(value: Any) -> Any:
    """Plain values with each `${` escaped: OmegaConf keeps them as they are instead of resolving them again."""
    if isinstance(value, str):  # `\${x}` resolved to the text `${x}`; taken again, it was looked up as a key
        return re.sub(r"(\\*)\$\{", lambda found: found.group(1) * 2 + "\\${", value)
    if isinstance(value, dict):
        return {key: literal(item) for key, item in value.items()}
    return [literal(item) for item in value] if isinstance(value, list) else value


def to_object(merged: DictConfig) -> Any:
    """The dataclass instance a structured config stands for; UsageError naming the key that does not convert."""
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise UsageError(_message(error)) from None


def _clash(base: DictConfig, layer: DictConfig, prefix: str = "") -> tuple[str, Any, Any] | None:
    # OmegaConf names no key when a scalar or list meets a section, or a mapping a list: (key, held, given).
    for key in layer:
        if key not in base:
            continue
        held, value = base.get(key), layer.get(key)
        if isinstance(held, DictConfig) and isinstance(value, DictConfig):
            inner = _clash(held, value, f"{prefix}{key}.")
            if inner is not None:
                return inner
        elif isinstance(held, DictConfig | ListConfig) and not isinstance(value, type(held)) and value is not None:
            return f"{prefix}{key}", held, value
    return None


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value


def _homes(schema: DictConfig | None, name: str, prefix: str = "") -> list[str]:
    # Where a key of this name lives, at any depth: `project` is logging.wandb's, `seed` the top's.
    homes = [prefix + name] if schema is not None and name in schema else []
    for key, node in (schema or {}).items():
        if isinstance(node, DictConfig):
            homes += _homes(node, name, f"{prefix}{key}.")
    return homes


def _message(error: OmegaConfBaseException, schema: DictConfig | None = None) -> str:
    key = getattr(error, "full_key", None) or "?"
    detail = str(getattr(error, "msg", "") or error).splitlines()[0]
    if isinstance(error, ConfigKeyError):
        # OmegaConf suggests keys of the same level only: `lr=` at the top is optim's (and `mode=` not 'model').
        homes = [f"'{home}'" for home in _homes(schema, key.rpartition(".")[2]) if home != key]
        hint = detail[detail.index("Did you mean") :] if "Did you mean" in detail else ""
        hint = f"Did you mean: {' or '.join(homes)}?" if homes else hint
        return f"unknown config key '{key}'" + (f" ({hint})" if hint else "")
    if "is not a ListConfig" in detail:  # a list key whose default is unset, given one value ("AnyNode is not...")
        return _a_list(key, error.value._value() if isinstance(error.value, ValueNode) else error.value)
    if re.search(r"^Incompatible value 'None'|is not Optional$|NoneType is not a subclass", detail):  # OmegaConf's
        none = ", [] for none" if isinstance(OmegaConf.select(schema or OmegaConf.create(), key), ListConfig) else ""
        return f"config key '{key}' is empty (or null): it needs a value{none}"
    if isinstance(error, ValidationError):
        return f"config key '{key}' has a wrong type: {detail}"
    return f"config key '{key}': {detail}"
