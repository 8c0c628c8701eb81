"""Keyword arguments deltatune does not implement are refused by name, never ignored."""

from __future__ import annotations

from typing import Any

from deltatune.errors import UnsupportedArgumentError


def refuse_unknown(where: str, kwargs: dict[str, Any], accepted: dict[str, tuple[Any, ...]]) -> None:
    """Refuse keyword arguments a method does not implement, by name: peft's arguments are accepted only at the
    values that mean what deltatune does anyway (`accepted`: name -> allowed values)."""
    for name, value in kwargs.items():
        if name in accepted and value in accepted[name]:
            continue
        allowed = f" (accepted only as {' or '.join(map(repr, accepted[name]))})" if name in accepted else ""
        raise UnsupportedArgumentError(f"{where}() does not support {name}={value!r}{allowed}; remove it.")
