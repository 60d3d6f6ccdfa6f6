"""What every route answers with, and how it reads what it is sent: JSON
answers and errors, pages of a list, a transfer's 202, and the request's
JSON body, parsed once (its schema is checked before the handler runs:
``middleware.py``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from quart import Response, g, request

from ..errors import MeshError

__all__ = [
    "JOBS_PAGE_DEFAULT", "JSON_DEPTH_MAX", "PAGE_DEFAULT", "PAGE_MAX", "PUBLIC_BODY_MAX", "body_json",
    "error_response", "json_response", "paged", "remote", "started",
]

PUBLIC_BODY_MAX = 1024 * 1024
JSON_DEPTH_MAX = 32
PAGE_DEFAULT = 1000  # items of a list a page holds unless ?limit= says fewer
PAGE_MAX = 1000
JOBS_PAGE_DEFAULT = 100


def json_response(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), status=status, mimetype="application/json")


def error_response(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> Response:
    return json_response({"error": {"code": code, "message": message, **(details or {})}}, status)


def remote() -> str:
    addr = request.remote_addr or "?"
    return str(addr)


def started(out: dict[str, Any]) -> Response:
    """202 for a transfer under way, with where to follow it."""
    r = json_response(out, 202)
    tid = out.get("transfer_id")
    if isinstance(tid, str) and tid:
        r.headers["Location"] = f"/transfers/{tid}"
    return r


def _page(default: int) -> tuple[int, int]:
    try:
        limit = int(request.args.get("limit", str(default)))
        offset = int(request.args.get("offset", "0"))
    except ValueError:
        raise MeshError("INVALID_REQUEST", "limit and offset are integers") from None
    if not 1 <= limit <= PAGE_MAX or offset < 0:
        raise MeshError("INVALID_REQUEST", f"limit is 1 to {PAGE_MAX}, offset 0 or more")
    return limit, offset


def paged(key: str, items: Sequence[Any], default: int = PAGE_DEFAULT, **extra: Any) -> Response:
    """One page of a list, in the list's own stable order, with where it is."""
    limit, offset = _page(default)
    return json_response({**extra, key: list(items[offset:offset + limit]), "total_count": len(items), "limit": limit,
                          "offset": offset})


def _depth_over(value: Any, limit: int) -> bool:
    """Whether ``value`` nests deeper than ``limit`` (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            if d > limit:
                return True
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


async def body_json() -> Any:
    """The request's JSON body (None when it has none), parsed once: the
    schema check reads it first, then the handler."""
    if "body_json" in g:
        return g.body_json
    g.body_json = value = await _parse_body()
    return value


async def _parse_body() -> Any:
    data = await request.get_data(cache=True)  # a peer route's was read to check its MAC
    if len(data) > PUBLIC_BODY_MAX:
        raise MeshError("TOO_LARGE", f"request body over {PUBLIC_BODY_MAX} bytes")
    if not data.strip():
        return None
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise MeshError("INVALID_JSON", f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise MeshError("INVALID_JSON", f"request body nests deeper than {JSON_DEPTH_MAX} levels") from None
    if _depth_over(value, JSON_DEPTH_MAX):
        raise MeshError("INVALID_JSON", f"request body nests deeper than {JSON_DEPTH_MAX} levels")
    return value
