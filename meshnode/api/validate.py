"""Request bodies checked against the schemas ``/openapi.json`` publishes
(``schemas.ROUTE_DOCS``), with jsonschema: one compiled validator a route.

A ``pattern`` is read as JSON Schema reads it, an ECMA-262 regular
expression, whose ``$`` is the end of the string (Python's ``$`` also
matches before a final newline), so that the node takes exactly what the
document says.  A problem under a schema that names its error code
(``schemas.ERROR_CODE``: a device's INVALID_DEVICE, a serve config's
INVALID_CONFIG) is answered with that code, the one the handler behind it
would give."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError, best_match

from ..errors import MeshError
from .schemas import ERROR_CODE, ROUTE_DOCS

__all__ = ["Validator", "body_problem", "ecma_pattern", "whole_numbers"]

MESSAGE_MAX = 300


@functools.lru_cache(maxsize=256)
def ecma_pattern(pattern: str) -> re.Pattern[str]:
    """``pattern`` compiled to match as ECMA-262 does: each ``$`` outside a
    character class is the end of the string (``\\Z``)."""
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "$":
            c = "\\Z"
        out.append(c)
        i += 1
    return re.compile("".join(out))


def _pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not ecma_pattern(pattern).search(instance):
        what = schema.get("description")
        yield ValidationError(f"{instance[:80]!r}: expected {what}" if isinstance(what, str)
                              else f"{instance[:80]!r} does not match {pattern!r}")


Validator = validators.extend(Draft202012Validator, {"pattern": _pattern})


@functools.lru_cache(maxsize=256)
def _validator(method: str, rule: str) -> Any:
    doc = ROUTE_DOCS.get((method, rule))
    if doc is None or doc.request is None:
        return None
    return Validator(doc.request)


def _code(schema: Any, path: Iterable[Any]) -> str | None:
    """The error code of the innermost schema on ``path`` (from ``schema``) that names one."""
    code = None
    node = schema
    for step in path:
        if isinstance(node, dict) and isinstance(node.get(ERROR_CODE), str):
            code = node[ERROR_CODE]
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return code
    if isinstance(node, dict) and isinstance(node.get(ERROR_CODE), str):
        code = node[ERROR_CODE]
    return code


def _integer_only(schema: Any) -> bool:
    t = schema.get("type") if isinstance(schema, dict) else None
    types = {t} if isinstance(t, str) else set(t) if isinstance(t, list) else set()
    return "integer" in types and "number" not in types


def whole_numbers(schema: Any, value: Any) -> Any:
    """``value`` with each whole number written as a float (``2.0``) where
    ``schema`` takes an integer made that integer, in place in its objects
    and lists: JSON Schema's integers are numbers without a fraction, the
    handlers' are ``int``.  Follows ``properties``, ``additionalProperties``
    and ``items``."""
    if isinstance(value, float):
        return int(value) if value.is_integer() and _integer_only(schema) else value
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        props = schema.get("properties")
        for k, v in value.items():
            sub = props.get(k) if isinstance(props, dict) and k in props else schema.get("additionalProperties")
            value[k] = whole_numbers(sub, v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            value[i] = whole_numbers(schema.get("items"), v)
    return value


def body_problem(method: str, rule: str, value: Any) -> str | None:
    """What is wrong with ``value`` as the body of that route, in one line
    (the caller answers it as INVALID_REQUEST); None when nothing, and then
    ``value`` is made what the handler reads (``whole_numbers``).  Raises
    ``MeshError`` with the code of the schema the problem is under, when
    that schema names one."""
    v = _validator(method, rule)
    if v is None:
        return None
    err = best_match(v.iter_errors(value))
    if err is None:
        whole_numbers(v.schema, value)
        return None
    where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
    text = f"request body{where}: {err.message}"
    text = text if len(text) <= MESSAGE_MAX else text[: MESSAGE_MAX - 3] + "..."
    code = _code(v.schema, err.absolute_schema_path)
    if code is not None:
        raise MeshError(code, text)
    return text
