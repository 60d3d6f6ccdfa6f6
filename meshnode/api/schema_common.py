"""The building blocks of the API's description (``schemas.py``): a route's
``RouteDoc``, small schema constructors, and the names, devices and ids of
``protocol/names.py`` as patterns.  JSON Schema reads a pattern as an
ECMA-262 regular expression (``$`` is the end of the string), and so does
``validate.py``."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from protocol.actions import TIERS
from protocol.names import (
    DEVICE_KIND_PATTERN,
    GPU_KIND_PATTERN,
    MODEL_NAME_MAX,
    NODE_ID_MAX,
    NODE_ID_PATTERN,
    RESERVED_SEGMENTS,
    SEGMENT_PATTERN,
)

from ..jobs import JOB_ID as JOB_ID_PATTERN

Schema = dict[str, Any]

ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "details": {}},
        }
    },
}


@dataclass(frozen=True)
class RouteDoc:
    """One route: what it does, its body (None: it takes none) and its answers by status."""

    summary: str
    tag: str
    request: Schema | None = None
    responses: dict[int, Schema] = field(default_factory=dict)
    query: dict[str, Schema] = field(default_factory=dict)  # query parameters and their schemas
    open: bool = False  # answered without a token
    content_type: str = "application/json"  # of the request body
    response_type: str = "application/json"  # of its success answers (errors are always JSON)
    required_query: tuple[str, ...] = ()  # the query parameters it cannot do without
    streams: bool = False  # a success answer may be server-sent events instead (the body asks for them)
    other_answers: str | None = None  # what answers with a status not listed are (OpenAPI's "default")
    # Whether the app checks a body against ``request`` before the handler runs.  False where the
    # handler's own check says more than one schema error can (a pipeline: 422 with every problem).
    checked: bool = True


# -- building blocks ---------------------------------------------------------------------------

STR: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
NUM: Schema = {"type": "number"}
BOOL: Schema = {"type": "boolean"}
ANY: Schema = {}
INT63 = 2**63 - 1


def nullable(s: Schema) -> Schema:
    """``s`` or null."""
    t = s.get("type")
    if isinstance(t, str):
        return {**s, "type": [t, "null"]}
    return {"anyOf": [s, {"type": "null"}]}


def array(items: Schema, **bounds: int) -> Schema:
    return {"type": "array", "items": items, **bounds}


def obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None, *,
         closed: bool = False, **more: Any) -> Schema:
    """An object with ``required`` keys always present, ``optional`` ones sometimes;
    ``closed``: no other key (only where the handler refuses unknown keys)."""
    out: Schema = {"type": "object", "properties": {**required, **(optional or {})}}
    if required:
        out["required"] = list(required)
    if closed:
        out["additionalProperties"] = False
    return {**out, **more}


def map_of(values: Schema) -> Schema:
    """An object whose keys are names (nodes, tiers, states) and whose values are ``values``."""
    return {"type": "object", "additionalProperties": values}


def desc(text: str, s: Schema | None = None) -> Schema:
    return {**(s or {}), "description": text}


# The code ``validate.py`` answers a problem found in (or under) a schema with, where the handler
# behind it has its own (a device: INVALID_DEVICE); elsewhere INVALID_REQUEST.
ERROR_CODE = "x-error-code"


def coded(code: str, s: Schema) -> Schema:
    """``s``, a problem under which is answered with ``code``."""
    return {**s, ERROR_CODE: code}


def states(states: Iterable[enum.Enum], s: Schema = STR) -> Schema:
    """A status or state: its values said, not enforced (a newer peer may know one more)."""
    return desc("one of: " + ", ".join(str(x.value) for x in states), s)


def error_answers(*statuses: int) -> dict[int, Schema]:
    return dict.fromkeys(statuses, ERROR)


def written(s: Schema) -> Schema:
    """A write's answer: the app adds the write's causality token (also ``X-Mesh-Token``)."""
    if "anyOf" in s:
        return {**s, "anyOf": [written(x) for x in s["anyOf"]]}
    return {**s, "properties": {**s["properties"], "mesh_token": desc("the write's causality token", STR)}}


# -- names (protocol/names.py), as patterns: JSON Schema reads them as ECMA-262 regular
# expressions (``$`` is the end of the string), and so does ``validate.py``.

NO_DOUBLE_DOT = r"(?!.*\.\.)"  # names.py refuses '..' anywhere in a name or a node id
SEGMENT = f"(?:{SEGMENT_PATTERN})"
NODE_PATTERN = f"(?:{NODE_ID_PATTERN})"
RESERVED = "|".join(sorted(RESERVED_SEGMENTS))
MODEL_NAME: Schema = {
    "type": "string", "minLength": 1, "maxLength": MODEL_NAME_MAX,
    "pattern": f"^{NO_DOUBLE_DOT}{SEGMENT}(?:/(?!(?:{RESERVED})$){SEGMENT})?$", ERROR_CODE: "INVALID_MODEL_NAME",
    "description": f"name or owner/name: letters, digits, '.', '_' and '-', each part starting with a letter or "
                   f"digit, no '..', at most {MODEL_NAME_MAX} characters; the part after '/' is none of "
                   f"{', '.join(sorted(RESERVED_SEGMENTS))}",
}
NODE_ID: Schema = {
    "type": "string", "minLength": 1, "maxLength": NODE_ID_MAX,
    "pattern": f"^{NO_DOUBLE_DOT}(?:{NODE_ID_PATTERN})$",
    "description": f"a node's id: letters, digits, '.', '_' and '-', starting with a letter or digit, no '..', "
                   f"at most {NODE_ID_MAX} characters",
}
KIND_CHARS_MAX = len("gpu999")  # DEVICE_KIND_PATTERN's longest (tests/unit/test_openapi.py checks it)


def _device(kinds: str, description: str, node: str = NODE_PATTERN) -> Schema:
    """``node:kind`` with ``kinds`` a pattern of the kinds taken."""
    return {"type": "string", "maxLength": NODE_ID_MAX + 1 + KIND_CHARS_MAX,
            "pattern": f"^{NO_DOUBLE_DOT}{node}:(?:{kinds})$", "description": description,
            ERROR_CODE: "INVALID_DEVICE"}


DEVICE = _device(DEVICE_KIND_PATTERN, "a device: node:disk, node:dram or node:gpuN")
STORE_DEVICE = _device("|".join(TIERS), "where a copy is stored: node:" + " or node:".join(TIERS))
# A serve's GPU (``requests.gpu_devices``): node:gpuN, or node:gpu for node:gpu0.
GPU_KIND = f"{GPU_KIND_PATTERN}|gpu"  # node:gpu is node:gpu0
GPU_DEVICE = _device(GPU_KIND, "a GPU of a node: node:gpuN (node:gpu is node:gpu0)", f"(?!any:){NODE_PATTERN}")
# gswarm's serve: a GPU of this node (gpuN), or of a named one.
GSWARM_GPU = {**GPU_DEVICE, "pattern": f"^{NO_DOUBLE_DOT}(?:(?!any:){NODE_PATTERN}:)?(?:{GPU_KIND})$",
              "description": "gpuN (of the node asked), or node:gpuN; gpu is gpu0"}
# A job's id: the mesh's (16 hex digits) or the caller's (POST /jobs/{jid}/create: meshnode.jobs.JOB_ID),
# never . or .. (a URL cannot hold them) nor from-yaml (/jobs/from-yaml is another route).  A
# transfer's: the mesh's (``secrets.token_hex(8)``).  Any other id is not found (404).
JOB_ID: Schema = {"type": "string", "pattern": f"^(?!\\.{{1,2}}$|from-yaml$)(?:{JOB_ID_PATTERN.pattern})$",
                  "description": "a job's id: 1 to 64 letters, digits, '.', '_' or '-' (not ., .. or from-yaml)"}
TRANSFER_ID: Schema = {"type": "string", "pattern": "^[0-9a-f]{16}$", "description": "a transfer's id: 16 hex digits"}

PAGE_QUERY: dict[str, Schema] = {
    "limit": desc("items a page holds (default 1000; jobs 100)", {"type": "integer", "minimum": 1, "maximum": 1000}),
    "offset": desc("items skipped", {"type": "integer", "minimum": 0}),
}


def paged(key: str, item: Schema, **extra: Schema) -> Schema:
    """One page of a list (``responses.paged``)."""
    return obj({**extra, key: array(item), "total_count": INT, "limit": INT, "offset": INT})


USAGE = obj({"total": INT, "used": INT, "free": INT})  # bytes of one tier
ERROR_VALUE = nullable(obj({"code": STR, "message": STR}))  # a step's or a transfer's error
NAMES = array(STR)

# An IPv6 address as Python's ipaddress reads it (no zone): a URL's host in brackets.
H16 = "[0-9A-Fa-f]{1,4}"
IPV4 = r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
IPV6 = (f"(?:(?:{H16}:){{7}}{H16}|(?:{H16}:){{6}}{IPV4}|::(?:{H16}:){{0,6}}{H16}|::(?:{H16}:){{0,5}}{IPV4}|"
         + "|".join(f"(?:{H16}:){{1,{k}}}(?::{H16}){{1,{7 - k}}}" for k in range(1, 7))  # a :: inside
         + f"|(?:{H16}:){{1,7}}:|::|" + "|".join(f"(?:{H16}:){{1,{k}}}(?::{H16}){{0,{5 - k}}}:{IPV4}"
                                                   for k in range(1, 6)) + ")")
