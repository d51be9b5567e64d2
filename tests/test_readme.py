"""The README's promises that code can check: CI runs its test command, its key table matches the schema."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ddp_trainer.config import Config

REPO = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command.endswith("-m pytest")
    assert ci_command in (REPO / "README.md").read_text().splitlines()


def documented_keys(schema: type, prefix: str = "") -> list[str]:
    """Dotted keys of the schema, with nested sections expanded; `kwargs` and `synthetic.*` have their own rows."""
    keys = []
    for field in dataclasses.fields(schema):
        value = getattr(schema(), field.name)
        if field.name == "synthetic" or field.name == "kwargs":
            continue
        if dataclasses.is_dataclass(value):
            keys += documented_keys(type(value), f"{prefix}{field.name}.")
        else:
            keys.append(prefix + field.name)
    return keys


def test_every_config_key_is_documented():
    readme = (REPO / "README.md").read_text()
    assert [key for key in documented_keys(Config) if f"`{key}`" not in readme] == []
