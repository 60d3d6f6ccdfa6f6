"""The field checks every typed record uses to read a catalog value.

A record's ``from_value(raw)`` reads a plain value (a peer's, or an older
version's) with these, so that any malformed field is one error,
``RecordError``, with a message that names the field.  Record families
live in their own modules (``keys``, ``gpus``, ``serving``, ...); the
checks live here, public, so that no module parses a value by hand or
reaches into another's private helpers.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from .errors import RemoteProtocolError
from .hlc import Stamp

__all__ = [
    "INT_MAX",
    "STR_MAX",
    "RecordError",
    "field_enum",
    "field_int",
    "field_list",
    "field_map",
    "field_stamp",
    "field_str",
]

STR_MAX = 4096  # characters of a string field, unless its record says less
INT_MAX = 2**63 - 1  # an integer field fits a signed 64-bit int (msgpack, SQLite)


class RecordError(RemoteProtocolError):
    """A catalog value does not have the shape of its key's record."""


def field_map(raw: Any, what: str) -> Mapping[str, Any]:
    """``raw`` as a map, or ``RecordError``."""
    if not isinstance(raw, dict):
        raise RecordError(f"{what}: expected a map")
    return raw


def field_str(raw: Any, what: str, *, optional: bool = False, max_chars: int = STR_MAX) -> Any:
    """A string of at most ``max_chars`` (``optional``: or None)."""
    if raw is None and optional:
        return None
    if not isinstance(raw, str) or len(raw) > max_chars:
        raise RecordError(f"{what}: expected a string of at most {max_chars} characters")
    return raw


def field_int(raw: Any, what: str, *, optional: bool = False, lo: int = 0, hi: int = INT_MAX) -> Any:
    """An integer (not a bool) from ``lo`` to ``hi`` (``optional``: or None)."""
    if raw is None and optional:
        return None
    if not isinstance(raw, int) or isinstance(raw, bool) or not lo <= raw <= hi:
        raise RecordError(f"{what}: expected an integer from {lo} to {hi}" if hi < INT_MAX
                          else f"{what}: expected an integer of at least {lo}")
    return raw


def field_list(raw: Any, what: str, limit: int) -> list[Any]:
    """A list of at most ``limit`` items (each checked by the caller)."""
    if not isinstance(raw, list) or len(raw) > limit:
        raise RecordError(f"{what}: expected a list of at most {limit}")
    return raw


def field_stamp(raw: Any, what: str) -> Stamp:
    """An HLC stamp in its wire form."""
    try:
        return Stamp.from_wire(raw)
    except RemoteProtocolError:
        raise RecordError(f"{what}: expected an HLC stamp") from None


def field_enum(cls: type[enum.Enum], raw: Any, what: str) -> Any:
    """A member of ``cls`` by its value."""
    try:
        return cls(raw)
    except ValueError:
        raise RecordError(f"{what}: expected one of {', '.join(str(m.value) for m in cls)}") from None
