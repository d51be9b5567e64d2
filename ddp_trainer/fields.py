"""The kinds of config field: each checks its value on construction and names the key in one line when it fails."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import field
from typing import Any, ClassVar

from ddp_trainer.errors import UsageError


def invalid(key: str, value: Any, expected: str) -> UsageError:
    """The one-line error for a key whose value is not what `expected` says."""
    return UsageError(f"config key '{key}' has invalid value {value!r}: expected {expected}")


def checked(default: Any, valid: Callable[[Any], bool], expected: str, most: int | None = None) -> Any:
    """A field whose value must pass `valid`, checked by `Section.__post_init__`; `expected` says what passes."""
    metadata = {"valid": valid, "expected": expected, "most": most}
    initial = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(**initial, metadata=metadata)


def path_field(default: str, expected: str) -> Any:
    """A path field: `~` expanded (no shell does it in YAML or after key=), and never empty: Path('') is this folder."""
    return field(default=default, metadata={"expand_home": True, "valid": str.strip, "expected": expected})


def one_of(default: str, choices: tuple[str, ...]) -> Any:
    """A field whose value must be one of `choices`."""
    return checked(default, lambda value: value in choices, f"one of {', '.join(choices)}")


def positive(default: float, expected: str = "a positive integer") -> Any:
    """A field above 0 and finite (an int one also no larger than sys.maxsize)."""
    return _number(default, lambda value: value > 0, expected)


def not_negative(default: float, expected: str) -> Any:
    """A field of 0 or more, finite (an int one also no larger than sys.maxsize)."""
    return _number(default, lambda value: value >= 0, expected)


def _number(default: float, valid: Callable[[Any], bool], expected: str) -> Any:
    # An int past sys.maxsize passed the schema, then broke islice() or len() deep in the loader with a traceback.
    most = sys.maxsize if isinstance(default, int) else None
    above = float("inf") if most is None else most + 1
    return checked(default, lambda value: valid(value) and value < above, expected, most)


SHAPE = f"a list of positive sizes, each at most {sys.maxsize}"


def is_size(value: Any) -> bool:
    """Whether `value` is a positive integer torch can take as a size (past sys.maxsize, its C++ cannot unpack it)."""
    return is_count(value) and 0 < value <= sys.maxsize


def is_shape(value: Any) -> bool:
    """Whether `value` is a tensor shape a config or index.json may give: a non-empty list of sizes."""
    return isinstance(value, list | tuple) and len(value) > 0 and all(is_size(size) for size in value)


def of_kind(value: Any, kind: type | tuple[type, ...]) -> bool:
    """isinstance, where a `kind` of int itself is a count (a checkpoint's epoch, step): never below 0."""
    return isinstance(value, kind) and not (kind is int and value < 0)


def is_count(value: Any) -> bool:
    """Whether `value` is an integer that is not a bool (JSON's true would pass isinstance(value, int))."""
    return isinstance(value, int) and not isinstance(value, bool)


# About 31 years: far larger values overflow the timedelta torch's process groups take; below a millisecond, torch's
# timeouts (whole milliseconds) are 0, and every collective fails at once. The text is for messages.
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 1e-3, 1e9
TIMEOUT_RANGE = "seconds, at least 0.001 and at most 1e9"


def timeout_ok(seconds: float) -> bool:
    """Whether `seconds` is a timeout torch can hold: from MIN_TIMEOUT_S to MAX_TIMEOUT_S (NaN is not)."""
    return MIN_TIMEOUT_S <= seconds <= MAX_TIMEOUT_S


def timeout(default: float) -> Any:
    """A field of seconds that torch can hold as a timeout."""
    return checked(default, timeout_ok, TIMEOUT_RANGE)


class Section:
    """A config section whose fields made by `checked` are checked on construction, naming the key that fails."""

    section: ClassVar[str]

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if spec.metadata.get("expand_home"):
                setattr(self, spec.name, value := os.path.expanduser(value))
            if "valid" in spec.metadata and not spec.metadata["valid"](value):
                most = spec.metadata.get("most")
                expected = f"at most {most}" if most is not None and value > most else spec.metadata["expected"]
                raise invalid(".".join(filter(None, (self.section, spec.name))), value, expected)
