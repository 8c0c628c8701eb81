"""Every config field checked against its annotation before a method looks at it.

A JSON file or a keyword argument can hold anything: a string where a rank belongs, a list of dicts for
`target_modules`, NaN for a dropout. Without this check such a value reaches arithmetic or a comparison deep in a
method and surfaces as a bare `TypeError` far from its cause. The annotations are checked with pydantic in strict
mode (no "3" -> 3 coercion: a value is what it says or it is refused), tuples and sets are accepted where a list is
declared (peft's users pass them), and floats must be finite.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from typing import Any

from pydantic import TypeAdapter, ValidationError

from deltatune.errors import ConfigError


@functools.cache
def _field_adapters(cls: type) -> dict[str, tuple[TypeAdapter, str]]:
    """(validator, readable annotation) per dataclass field of `cls`, built once per class."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        out[f.name] = (TypeAdapter(hint), str(hint).replace("typing.", "").replace("<class '", "").replace("'>", ""))
    return out


def _as_lists(value: Any) -> Any:
    """Tuples and sets as lists (sets sorted when they can be), recursively through lists and dict values."""
    if isinstance(value, (set, frozenset)):
        try:
            return sorted(value)
        except TypeError:
            return list(value)
    if isinstance(value, (list, tuple)):
        return [_as_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_lists(v) for k, v in value.items()}
    return value


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


def check_field_types(config: Any) -> None:
    """Refuse (ConfigError naming the field, its type and the value) any field of dataclass `config` whose value is
    not of the annotated type; tuples and sets given for list fields are stored as lists."""
    cls = type(config)
    for name, (adapter, expected) in _field_adapters(cls).items():
        value = getattr(config, name)
        plain = _as_lists(value)
        if isinstance(value, (set, frozenset, tuple)):
            value = plain
            object.__setattr__(config, name, value)
        try:
            adapter.validate_python(plain, strict=True)
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"]
            raise ConfigError(
                f"{cls.__name__}.{name} must be {expected}; got {value!r} ({type(value).__name__}): {problem}. "
                "Fix the value in the config (JSON numbers unquoted, lists in brackets)."
            ) from None
        if _non_finite(value):
            raise ConfigError(f"{cls.__name__}.{name} holds a non-finite number ({value!r}); give a finite value.")


def check_regex(config: Any, name: str) -> None:
    """A string-valued module-name field is a regular expression: refuse (ConfigError) one that does not compile."""
    value = getattr(config, name)
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(
                f"{type(config).__name__}.{name}={value!r} is a string, so a regular expression over module names, "
                f"and it does not compile ({exc}); fix it, or give a list of module-name suffixes."
            ) from None
