"""Keyword arguments deltatune does not implement are refused by name, never ignored."""

from __future__ import annotations

from typing import Any

from deltatune.errors import ConfigError, UnsupportedArgumentError


def refuse_unknown(where: str, kwargs: dict[str, Any], accepted: dict[str, tuple[Any, ...]]) -> None:
    """Refuse keyword arguments a method does not implement, by name: peft's arguments are accepted only at the
    values that mean what deltatune does anyway (`accepted`: name -> allowed values)."""
    for name, value in kwargs.items():
        if name in accepted and value in accepted[name]:
            continue
        allowed = f" (accepted only as {' or '.join(map(repr, accepted[name]))})" if name in accepted else ""
        raise UnsupportedArgumentError(f"{where}() does not support {name}={value!r}{allowed}; remove it.")


def flag(where: str, name: str, value: Any) -> bool:
    """A True/False keyword argument, else a ConfigError naming it (a string "False" or a 0 would otherwise be
    read as whatever its truth value is)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where}(): {name} must be True or False, got {value!r}.")
    return value
