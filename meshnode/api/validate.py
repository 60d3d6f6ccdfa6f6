"""Request bodies checked against the schemas ``/openapi.json`` publishes
(``schemas.ROUTE_DOCS``), with jsonschema: one compiled validator a route."""

from __future__ import annotations

import functools
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from .schemas import ROUTE_DOCS

__all__ = ["body_problem"]

MESSAGE_MAX = 300


@functools.lru_cache(maxsize=256)
def _validator(method: str, rule: str) -> Draft202012Validator | None:
    doc = ROUTE_DOCS.get((method, rule))
    if doc is None or doc.request is None:
        return None
    return Draft202012Validator(doc.request)


def body_problem(method: str, rule: str, value: Any) -> str | None:
    """What is wrong with ``value`` as the body of that route, in one line; None when nothing."""
    v = _validator(method, rule)
    if v is None:
        return None
    err = best_match(v.iter_errors(value))
    if err is None:
        return None
    where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
    text = f"request body{where}: {err.message}"
    return text if len(text) <= MESSAGE_MAX else text[: MESSAGE_MAX - 3] + "..."
