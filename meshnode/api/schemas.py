"""The public API described once: each route's request body and answers as
JSON Schema (draft 2020-12), from which ``/openapi.json`` is built and
against which request bodies are checked before a handler runs.

The document is the one truth of what a request may be: every path and
query parameter and every body field says the rule the node enforces
(names, devices and ids as patterns built from ``protocol.names``, lengths,
ranges, enums, what each action type needs), so a request the document
takes is never refused for its shape, and one it refuses is
(tests/integration/test_openapi_live.py: schemathesis, every check).  What
JSON Schema cannot say is in a description, with the answer it gets: rules
between two fields (from_device is not to_device, min at most max, a
pipeline's dependency graph) and the node's state (a model that exists, a
device of a live node, the engines and ports it allows).  A schema never
refuses a body its handler would take, but for one spelling of a value
the handler also reads another way (a label with spaces around, which it
strips; a URL with a tab in it, which urlsplit drops).
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from protocol.actions import TIERS
from protocol.bundle import MODELS_MAX as BUNDLE_MODELS_MAX
from protocol.jobs import ActionStatus, JobStatus, PartStatus
from protocol.leases import HOLDER_PATTERN, LEASE_MAX_S, LEASE_MIN_S
from protocol.names import (
    DEVICE_KIND_PATTERN,
    GPU_KIND_PATTERN,
    MODEL_NAME_MAX,
    NODE_ID_MAX,
    NODE_ID_PATTERN,
    RESERVED_SEGMENTS,
    SEGMENT_PATTERN,
)
from protocol.pipeline import ACTION_TYPES, LIMITS
from protocol.registry import METADATA_FILES_MAX
from protocol.replicas import EVERY_NODE, LABEL_CHARS, LABELS_MAX, REPLICAS_MAX
from protocol.replicas import TIERS as REPLICA_TIERS
from protocol.serving import (
    ARG_CHARS_MAX,
    ARGS_MAX,
    CONFIG_KEYS,
    ENGINES,
    ENV_MAX,
    LOAD_FORMATS,
    ServiceState,
)
from protocol.sources import SCHEMES as SOURCE_SCHEMES
from protocol.sources import URL_MAX as SOURCE_URL_MAX
from protocol.sources import SourceKind
from protocol.transfer import TransferStatus

from ..jobs import JOB_ID as JOB_ID_PATTERN

__all__ = ["ROUTE_DOCS", "RouteDoc", "openapi_document"]

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


def _null(s: Schema) -> Schema:
    """``s`` or null."""
    t = s.get("type")
    if isinstance(t, str):
        return {**s, "type": [t, "null"]}
    return {"anyOf": [s, {"type": "null"}]}


def _arr(items: Schema, **bounds: int) -> Schema:
    return {"type": "array", "items": items, **bounds}


def _obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None, *,
         closed: bool = False, **more: Any) -> Schema:
    """An object with ``required`` keys always present, ``optional`` ones sometimes;
    ``closed``: no other key (only where the handler refuses unknown keys)."""
    out: Schema = {"type": "object", "properties": {**required, **(optional or {})}}
    if required:
        out["required"] = list(required)
    if closed:
        out["additionalProperties"] = False
    return {**out, **more}


def _map(values: Schema) -> Schema:
    """An object whose keys are names (nodes, tiers, states) and whose values are ``values``."""
    return {"type": "object", "additionalProperties": values}


def _desc(text: str, s: Schema | None = None) -> Schema:
    return {**(s or {}), "description": text}


# The code ``validate.py`` answers a problem found in (or under) a schema with, where the handler
# behind it has its own (a device: INVALID_DEVICE); elsewhere INVALID_REQUEST.
ERROR_CODE = "x-error-code"


def _coded(code: str, s: Schema) -> Schema:
    """``s``, a problem under which is answered with ``code``."""
    return {**s, ERROR_CODE: code}


def _state(states: Iterable[enum.Enum], s: Schema = STR) -> Schema:
    """A status or state: its values said, not enforced (a newer peer may know one more)."""
    return _desc("one of: " + ", ".join(str(x.value) for x in states), s)


def _errors(*statuses: int) -> dict[int, Schema]:
    return dict.fromkeys(statuses, ERROR)


def _written(s: Schema) -> Schema:
    """A write's answer: the app adds the write's causality token (also ``X-Mesh-Token``)."""
    if "anyOf" in s:
        return {**s, "anyOf": [_written(x) for x in s["anyOf"]]}
    return {**s, "properties": {**s["properties"], "mesh_token": _desc("the write's causality token", STR)}}


# -- names (protocol/names.py), as patterns: JSON Schema reads them as ECMA-262 regular
# expressions (``$`` is the end of the string), and so does ``validate.py``.

_NO_DOUBLE_DOT = r"(?!.*\.\.)"  # names.py refuses '..' anywhere in a name or a node id
_SEG = f"(?:{SEGMENT_PATTERN})"
_NODE = f"(?:{NODE_ID_PATTERN})"
_RESERVED = "|".join(sorted(RESERVED_SEGMENTS))
MODEL_NAME: Schema = {
    "type": "string", "minLength": 1, "maxLength": MODEL_NAME_MAX,
    "pattern": f"^{_NO_DOUBLE_DOT}{_SEG}(?:/(?!(?:{_RESERVED})$){_SEG})?$", ERROR_CODE: "INVALID_MODEL_NAME",
    "description": f"name or owner/name: letters, digits, '.', '_' and '-', each part starting with a letter or "
                   f"digit, no '..', at most {MODEL_NAME_MAX} characters; the part after '/' is none of "
                   f"{', '.join(sorted(RESERVED_SEGMENTS))}",
}
NODE_ID: Schema = {
    "type": "string", "minLength": 1, "maxLength": NODE_ID_MAX,
    "pattern": f"^{_NO_DOUBLE_DOT}(?:{NODE_ID_PATTERN})$",
    "description": f"a node's id: letters, digits, '.', '_' and '-', starting with a letter or digit, no '..', "
                   f"at most {NODE_ID_MAX} characters",
}
_KIND_CHARS_MAX = len("gpu999")  # DEVICE_KIND_PATTERN's longest (tests/unit/test_openapi.py checks it)


def _device(kinds: str, description: str, node: str = _NODE) -> Schema:
    """``node:kind`` with ``kinds`` a pattern of the kinds taken."""
    return {"type": "string", "maxLength": NODE_ID_MAX + 1 + _KIND_CHARS_MAX,
            "pattern": f"^{_NO_DOUBLE_DOT}{node}:(?:{kinds})$", "description": description,
            ERROR_CODE: "INVALID_DEVICE"}


DEVICE = _device(DEVICE_KIND_PATTERN, "a device: node:disk, node:dram or node:gpuN")
STORE_DEVICE = _device("|".join(TIERS), "where a copy is stored: node:" + " or node:".join(TIERS))
# A serve's GPU (``app._gpu_devices``): node:gpuN, or node:gpu for node:gpu0.
_GPU_KIND = f"{GPU_KIND_PATTERN}|gpu"  # node:gpu is node:gpu0
GPU_DEVICE = _device(_GPU_KIND, "a GPU of a node: node:gpuN (node:gpu is node:gpu0)", f"(?!any:){_NODE}")
# gswarm's serve: a GPU of this node (gpuN), or of a named one.
GSWARM_GPU = {**GPU_DEVICE, "pattern": f"^{_NO_DOUBLE_DOT}(?:(?!any:){_NODE}:)?(?:{_GPU_KIND})$",
              "description": "gpuN (of the node asked), or node:gpuN; gpu is gpu0"}
# A job's id: the mesh's (16 hex digits) or the caller's (POST /jobs/{jid}/create: meshnode.jobs.JOB_ID),
# never . or .. (a URL cannot hold them) nor from-yaml (/jobs/from-yaml is another route).  A
# transfer's: the mesh's (``secrets.token_hex(8)``).  Any other id is not found (404).
JOB_ID: Schema = {"type": "string", "pattern": f"^(?!\\.{{1,2}}$|from-yaml$)(?:{JOB_ID_PATTERN.pattern})$",
                  "description": "a job's id: 1 to 64 letters, digits, '.', '_' or '-' (not ., .. or from-yaml)"}
TRANSFER_ID: Schema = {"type": "string", "pattern": "^[0-9a-f]{16}$", "description": "a transfer's id: 16 hex digits"}

PAGE_QUERY: dict[str, Schema] = {
    "limit": _desc("items a page holds (default 1000; jobs 100)", {"type": "integer", "minimum": 1, "maximum": 1000}),
    "offset": _desc("items skipped", {"type": "integer", "minimum": 0}),
}


def _paged(key: str, item: Schema, **extra: Schema) -> Schema:
    """One page of a list (``_paged`` in app.py)."""
    return _obj({**extra, key: _arr(item), "total_count": INT, "limit": INT, "offset": INT})


USAGE = _obj({"total": INT, "used": INT, "free": INT})  # bytes of one tier
ERROR_VALUE = _null(_obj({"code": STR, "message": STR}))  # a step's or a transfer's error
NAMES = _arr(STR)

# An IPv6 address as Python's ipaddress reads it (no zone): a URL's host in brackets.
_H16 = "[0-9A-Fa-f]{1,4}"
_IPV4 = r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV6 = (f"(?:(?:{_H16}:){{7}}{_H16}|(?:{_H16}:){{6}}{_IPV4}|::(?:{_H16}:){{0,6}}{_H16}|::(?:{_H16}:){{0,5}}{_IPV4}|"
         + "|".join(f"(?:{_H16}:){{1,{k}}}(?::{_H16}){{1,{7 - k}}}" for k in range(1, 7))  # a :: inside
         + f"|(?:{_H16}:){{1,7}}:|::|" + "|".join(f"(?:{_H16}:){{1,{k}}}(?::{_H16}){{0,{5 - k}}}:{_IPV4}"
                                                   for k in range(1, 6)) + ")")

# -- answers -----------------------------------------------------------------------------------

PROBE = _obj({"status": STR, "node_id": STR, "generation": INT})

GPU = _obj(
    {"index": INT, "uuid": STR, "name": STR, "total_bytes": INT, "used_bytes": INT, "free_bytes": INT},
    {"util_pct": _null(INT), "mem_util_pct": _null(INT), "temperature_c": _null(INT), "power_mw": _null(INT),
     "power_limit_mw": _null(INT), "processes": _arr(_desc("[pid, used_bytes]", _arr(_null(INT)))),
     "processes_total": INT},
)

NODE = _obj({
    "node_id": STR, "address": STR, "state": _desc("alive, suspect, dead or left", STR), "generation": INT,
    "incarnation": INT, "last_change_s": NUM, "storage": _desc("its storage record, as it gossips it", {"type": "object"}),
    "gpus": _arr(GPU),
    "gpu_status": _null(_obj({}, {"source": STR, "read_ms": INT, "stale": BOOL, "error": _null(STR)})),
    "models": NAMES, "labels": _desc("its --labels", {"type": "object", "additionalProperties": STR}), "self": BOOL,
})

STATUS = _obj({
    "node_id": STR, "cluster": STR,
    "nodes": _desc("nodes by state, and the total", {**_map(INT), "required": ["total"]}),
    "models": _obj({"total": INT, "replicated": INT, "single_node": INT}),
    "storage": _desc("per tier, the sums over every node", _map(USAGE)),
    "jobs": _desc("jobs by status, and the total", {**_map(INT), "required": ["total"]}),
    "services": _desc("services by state, and the total", {**_map(INT), "required": ["total"]}),
})

STORAGE = _obj({
    "node_id": STR,
    "devices": _desc("disk, dram, gpu0..gpuN", _map(USAGE)),
    "copies": _arr(_obj({"model_name": STR, "device": STR, "manifest_hash": STR, "size": INT,
                         "last_used_ms": _desc("its last read (a peer, a serve, a local copy): eviction's order", INT)})),
})

# A transfer, the same shape from whichever node answers: the node that runs it reads its
# live state (``Transfer.public``), the others its catalog record (``XferRecord``).
TRANSFER = _obj(
    {"transfer_id": STR, "node_id": STR, "target_device": STR, "model_name": STR,
     "model": _desc("the same as model_name (kept for older clients)", STR), "kind": STR,
     "manifest_hash": _null(STR), "status": _state(TransferStatus), "bytes_done": INT, "bytes_total": INT, "rate_bps": NUM,
     "sources": NAMES, "error": ERROR_VALUE, "started_ms": INT, "finished_ms": INT, "note": STR,
     "files_done": INT, "files_total": INT, "source_id": _null(STR),
     "claim": _null(_desc("[wall_ms, logical, node_id]", {"type": "array"})),
     "chunks_total": INT, "chunks_fetched": INT, "chunks_resumed": INT,
     "source": _desc("node:device, file:///path, or a URL without user info or query; null: any holder", _null(STR)),
     "options": {"type": "object"}, "keep_source": BOOL, "bad_chunks": INT, "banned": NAMES,
     "fetched": _null({"type": "object"})},
)

_REPLICA_COUNT = {"type": "integer", "minimum": EVERY_NODE, "maximum": REPLICAS_MAX}
# A label's key or value (``protocol.replicas``): 1 to 63 of LABEL_CHARS ('-' sorts first: a literal).
_LABEL: Schema = {"type": "string", "pattern": "^[" + "".join(sorted(LABEL_CHARS)) + "]{1,63}$",
                  "description": "1 to 63 letters, digits, '-', '_' or '.'"}


def _when_min(value: int, then: Schema) -> Schema:
    """``then`` holds of a policy whose min is ``value``."""
    return {"if": {"required": ["min"], "properties": {"min": {"const": value}}}, "then": then}


POLICY_BODY = _coded("INVALID_POLICY", _obj({}, {
    "min": _desc("at least this many copies; -1: on every eligible node (default 1)", _REPLICA_COUNT),
    "max": _desc("at most this many, at least min; -1: every eligible node (default: min)",
                 {**_REPLICA_COUNT, "not": {"const": 0}}),
    "tier": _desc("where the copies live (default disk)", {"enum": list(REPLICA_TIERS)}),
    "labels": _null(_desc("only on nodes with every one of these --labels",
                          {"type": "object", "propertyNames": _LABEL, "additionalProperties": _LABEL,
                           "maxProperties": LABELS_MAX})),
    "spread": _null(_desc("a label whose values the copies are spread over, e.g. zone", _LABEL)),
}, closed=True, description="min is at most max unless max is -1 (else 400 INVALID_POLICY)",
    allOf=[_when_min(EVERY_NODE, {"properties": {"max": {"const": EVERY_NODE}}}),  # every node: max too
           _when_min(0, {"required": ["max"]})]))  # max defaults to min, and 0 is no max
REPLICAS = _null(_obj({
    "policy": POLICY_BODY, "wanted": _obj({"min": INT, "max": INT}),
    "actual": _desc("complete copies on the policy's tier on nodes that are up and carry its labels", INT),
    "outside": _desc("complete copies on nodes up outside the labels: no replicas, dropped once min is met", INT),
    "spread": _null(_obj({"label": STR, "covered": INT, "target": INT},
                         description="values of the spread label the copies cover, of those they should")),
    "counted": _desc("copies the rule counts: up, being made, or down for less than the grace", INT),
    "lost": _desc("copies on nodes down for longer than the grace", INT),
    "copying_to": NAMES, "next": _obj({"add": NAMES, "drop": NAMES}),
    "short": _null(_desc("why the mesh cannot hold min copies, when it cannot", STR)),
}))

_MODEL_SERVICE = _obj({"node": STR, "port": INT, "device": STR, "engine": STR, "state": _state(ServiceState)})
_MODEL_SHORT = {"model_name": STR, "model_type": _null(STR), "size": _null(INT), "locations": NAMES,
                "services": _arr(_MODEL_SERVICE), "status": _desc("registered, available or unavailable", STR)}
_MODEL_FULL = {
    "replicas": _desc("its replica policy, wanted and actual copies; null: not pinned", REPLICAS),
    "source_url": _null(STR), "metadata": {"type": "object"}, "registered_by": STR, "registered_at_ms": INT,
    "copies": _arr(_obj({"device": STR, "manifest_hash": STR, "size": INT, "status": STR, "online": BOOL})),
}


def _model(full: bool = False, **extra: Schema) -> Schema:
    """A model as ``Views.model_json`` shows it (``full``: with its registration and copies)."""
    return _obj({**_MODEL_SHORT, **(_MODEL_FULL if full else {}), **extra})


SERVICE = _obj({
    "model_name": STR, "node": STR, "port": INT, "engine": STR, "gpus": _arr(INT), "state": _state(ServiceState),
    "pid": _null(INT), "started_ms": INT, "restarts": INT, "vram_bytes": INT, "job_id": _null(STR),
    "error": _null(STR), "log_tail": _null(STR), "health_path": STR, "device": STR, "url": _null(STR),
    "node_state": _desc("its node's: alive, suspect, dead, left or unknown", STR),
})

_PART = _obj({"node": _null(STR), "device": _null(STR), "status": _state(PartStatus, _null(STR)), "attempt": INT,
              "transfer_id": _null(STR), "bytes_done": INT, "bytes_total": INT, "note": STR, "error": ERROR_VALUE})
_STEP_SHORT = {"action_id": STR, "status": _state(ActionStatus), "attempts": INT, "error": ERROR_VALUE}
_STEP = _obj({**_STEP_SHORT, "action_type": STR, "model_name": _null(STR), "devices": NAMES,
              "dependencies": NAMES, "started_ms": _null(INT), "finished_ms": _null(INT), "parts": _arr(_PART)})
_JOB_ERROR = _null(_obj({"action_id": STR, "code": STR, "message": STR}))
_JOB_SHORT = {"job_id": STR, "name": STR, "status": _state(JobStatus),
              "progress": _obj({"completed": INT, "total": INT}), "error": _JOB_ERROR, "coordinator": _null(STR)}


def _job(**extra: Schema) -> Schema:
    """A job as ``Jobs.job_json`` shows it."""
    return _obj({**_JOB_SHORT, "description": STR, "submitted_by": STR, "submitted_ms": INT,
                 "finished_ms": _null(INT), "fail_fast": BOOL, "priority": INT, "cancelled": BOOL,
                 "actions": _arr(_STEP), **extra})


JOB_STATUS = _obj({**_JOB_SHORT, "actions": _arr(_obj(_STEP_SHORT))})
JOB_TAKEN = _job(held_by=_desc("the nodes that hold the job already, this one first", NAMES))

PLACEMENT = _obj({
    "model_name": STR, "device": STR, "needs_bytes": INT, "chosen": _null(STR),
    "ranking": _arr(_obj({"node_id": STR, "device": _null(STR), "fits": BOOL, "holds_model": BOOL,
                          "room_bytes": INT, "reasons": NAMES})),
})

POOL = _obj({"pool_id": _desc("pool-gpuN: one per GPU", STR), "gpu": INT,
             "ready": _desc("a healthy engine serves from this GPU", BOOL), "models": NAMES, "engines": NAMES})
AVAILABILITY = _obj({
    "nodes": _map(_obj({"node_id": STR, "address": STR, "online": BOOL, "models": NAMES, "pools": _arr(POOL)})),
    "total_models": INT, "replicated_models": NAMES, "single_node_models": NAMES,
})
NODE_V2 = _obj({
    "node_id": STR, "address": STR, "online": BOOL, "pools": _arr(POOL),
    "capabilities": _obj({"gpus": _arr(_obj({"index": INT, "uuid": STR, "name": STR, "vram_total_bytes": INT,
                                              "vram_free_bytes": INT})),
                          "labels": {"type": "object", "additionalProperties": STR}}),
})

_DIGEST = {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}
CATALOG_MODEL = _obj({
    "id": STR,
    "digest": _desc("the sha256 digest every copy that computed one agrees on; null: none yet, or they differ",
                    _null(STR)),
    "expected_digest": _desc("the digest the registration asks for", _null(STR)),
    "verified": _desc("every computed digest is the expected one; null: nothing to compare", _null(BOOL)),
    "conflict": _desc("two copies have different digests", BOOL),
    "copies": _arr(_obj({"device": STR, "digest": _null(STR), "online": BOOL})),
    "size": _null(INT), "source_url": _null(STR), "state": STR,
})
CATALOG_BODY = _obj({"id": _desc("the model's name", MODEL_NAME)}, {
    "digest": _null(_desc("sha256:<hex>: the digest its copies must have", _DIGEST)),
    "source_url": _null({"type": "string", "maxLength": 2048}),
}, closed=True)

V1_MODEL = _obj({"id": STR, "object": STR, "owned_by": STR})
V1_MODELS = _obj({"object": STR, "data": _arr(V1_MODEL)})

LOCATION_DROPPED = _obj({"model_name": STR, "device": STR, "dropped": {"const": True}},
                        {"deleted_copy": {"const": True}})
UNREGISTERED = _obj({"model_name": STR, "unregistered": {"const": True}, "purged_locations": NAMES},
                    {"deleted_copies": NAMES, "pending_copies": _arr(_obj({"device": STR, "reason": STR}))})

OPENAPI = _obj({"openapi": STR, "info": {"type": "object"}, "paths": {"type": "object"}})
TEXT: Schema = STR

# -- request bodies ----------------------------------------------------------------------------

_PRIORITY = _desc("taken, not used yet", ANY)
_SAME_DEVICE = "from_device and to_device differ (else 400 SAME_DEVICE)"

COPY_BODY = _obj(
    {"to_device": STORE_DEVICE},
    {"from_device": _desc("the copy to read; left out or null: any holder serves", _null(STORE_DEVICE)),
     "keep_source": _desc("a move that keeps its source is a copy", BOOL), "priority": _PRIORITY},
    closed=True, description=_SAME_DEVICE,
)
MOVE_BODY = _obj(
    {"from_device": _desc("the copy to move", STORE_DEVICE), "to_device": STORE_DEVICE},
    {"keep_source": _desc("true makes the move a copy", BOOL), "priority": _PRIORITY},
    closed=True, description=_SAME_DEVICE,
)
def _any_case(word: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word)


# A source outside the mesh or on the target node (``protocol.sources.classify``): an absolute path,
# or a URL of a scheme it knows (any case); a file:// URL names no host but localhost, and no NUL.
assert all(s.isalnum() for s in SOURCE_SCHEMES)  # no character a pattern reads otherwise
# A host in brackets is an IPv6 address (a zone too) or IPvFuture, and a bracket is never alone (as
# urllib.parse.urlsplit reads a URL): said as what may not follow, which generators need not build.
_NETLOC = ("(?!//(?:[^\\[/?#]*\\][^\\[/?#]*(?:[/?#]|$)|[^\\[/?#]*\\[(?!(?:" + _IPV6
           + "(?:%[^%\\]/?#]+)?|v[0-9A-Fa-f]+\\.[^\\]/?#]+)\\])))")
# No NUL; no tab or line break, and no control character or space before it (urlsplit would drop them).
_SOURCE = ("(?![\\s\\S]*[\\x00\\t\\n\\r])(?:/|" + "|".join(
    _any_case(s) + (":(?![\\s\\S]*%00)(?:/(?!/)|//(?:localhost)?/)" if kind is SourceKind.LOCAL else ":" + _NETLOC)
    for s, kind in SOURCE_SCHEMES.items()) + ")")
SOURCE_URL: Schema = _desc(
    "hf://owner/name[@revision], http(s)://host[:port]/path (no user info; the host a public address unless "
    "--allow-private-sources, else 403 PRIVATE_SOURCE), s3://bucket/prefix[?endpoint_url=...&region=...], or "
    "file:///path or /path on the target node (in its --ingest-roots, else 403)",
    {"type": "string", "minLength": 1, "maxLength": SOURCE_URL_MAX, "pattern": f"^{_SOURCE}"})
# A download's: a source, or (empty, or not a string) the registration's URL, else hf://owner/name for an
# owner/name model with none (else 400).
_DOWNLOAD_URL = _desc(f"{SOURCE_URL['description']}; empty or not a string: the registration's URL, or "
                      "hf://owner/name for an owner/name model with none (else 400)",
                      {"maxLength": SOURCE_URL_MAX, "pattern": f"^(?:$|{_SOURCE})"})
# Which fields count depends on the source: another node's copy (or null: any holder's) takes
# only the devices; the web (the default) reads source_url, revision and the patterns.  What a
# download does not read it does not check, so neither does the schema.
_GLOBS = _null({"anyOf": [{"type": "string", "minLength": 1, "maxLength": 256},
                          _arr({"type": "string", "minLength": 1, "maxLength": 256}, maxItems=64)]})
_WEB_FIELDS: dict[str, Schema] = {
    "source_url": _DOWNLOAD_URL,
    "revision": _desc("a branch, tag or commit of a hub repository",
                      _null({"type": "string", "minLength": 1, "maxLength": 256})),
    "allow_patterns": _desc("glob patterns of the files to fetch: one, or a list", _GLOBS),
    "ignore_patterns": _desc("glob patterns of the files to leave: one, or a list", _GLOBS),
}
DOWNLOAD_BODY = _obj(
    {"target_device": STORE_DEVICE},
    {"source": _desc("\"web\" (the default: source_url), or another node's copy (node:device; null: any holder's)",
                     _null({"anyOf": [{"const": "web"}, STORE_DEVICE]})),
     **{k: _desc(f"{v['description']} (read from the web only)", ANY) for k, v in _WEB_FIELDS.items()},
     "priority": _PRIORITY},
    closed=True, description="source, when a device, differs from target_device (else 400 SAME_DEVICE)",
    # From the web (source "web" or left out) the web's fields are read, and checked; from a copy
    # (source a device, or null) they are not, so they take anything.
    anyOf=[{"properties": {"source": {"const": "web"}, **_WEB_FIELDS}},
           {"required": ["source"], "properties": {"source": {"not": {"const": "web"}}}}],
)

_SHORT = {"type": "string", "minLength": 1, "maxLength": 64}
_COUNT = {"type": "integer", "minimum": 0, "maximum": INT63}
REGISTER_BODY = _null(_obj({}, {
    "replicas": _null(_desc("keep this many copies (as POST /models/{name}/pin)", POLICY_BODY)),
    "model_type": _null(_SHORT),
    "source_url": _null({"type": "string", "maxLength": 2048}),
    "metadata": _null(_obj({}, {
        "description": _null({"type": "string", "maxLength": 4096}),
        "tags": _null(_arr(_SHORT, maxItems=64)),
        "requirements": _null(_obj({}, {
            "min_memory": _desc("bytes", _null(_COUNT)),
            "min_vram": _desc("bytes", _null(_COUNT)),
            "gpu_arch": _null({"anyOf": [_SHORT, _arr(_SHORT, minItems=1, maxItems=16)]}),
        }, closed=True)),
        "revision": _null({"type": "string", "maxLength": 64}),
        "files": _null(_arr({"type": "string", "minLength": 1, "maxLength": 1024}, maxItems=METADATA_FILES_MAX)),
        "file_count": _null(_COUNT),
        "engine": _desc("the engine its serves use unless a step names another", _null({"enum": list(ENGINES)})),
        "digest": _desc("the sha256 digest its copies must have (llama-orch's); sha256:<hex>",
                        _null({"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"})),
    }, closed=True)),
}, closed=True))

# A serve's config (``protocol.serving.validate_config``), refused with the engine layer's own
# codes (INVALID_CONFIG, UNKNOWN_ENGINE).  What the node decides (its engines, their allowed
# arguments and variables: 403; its --service-ports: 400 PORT_OUT_OF_RANGE) the descriptions say.
GSWARM_FRAMEWORKS = ("llamacpp", "llama_cpp")  # app._serve_config reads them as llama.cpp
_ENGINE = _coded("UNKNOWN_ENGINE", _desc("one of " + ", ".join(ENGINES) + " (the node's --engines, else 403)",
                                         {"enum": list(ENGINES)}))
_ARG = {"type": "string", "minLength": 1, "maxLength": ARG_CHARS_MAX, "pattern": "^[^\\x00]*$"}
_ARGS = _arr(_ARG, maxItems=ARGS_MAX)
_PATH = _null({"type": "string", "maxLength": 200, "pattern": "^/"})
SERVE_CONFIG = _coded("INVALID_CONFIG", _obj({}, {
    "engine": _ENGINE,
    "args": _desc("the engine's arguments (its allow list, else 403)", _ARGS),
    "flags": _desc("--name value pairs (true: the bare flag; false or null: left out)",
                   {**_map({"anyOf": [{"type": "string", "maxLength": ARG_CHARS_MAX},
                                      {"type": ["number", "boolean", "null"]}]}),
                    "propertyNames": {"maxLength": 100, "pattern": "^[-_]*[A-Za-z0-9][-_A-Za-z0-9]*$"},
                    "maxProperties": ARGS_MAX}),
    "command": _desc("the command engine's program and arguments ({port}, {host}, {model_dir}, {model_name}, "
                     "{gpus} filled in)", {**_ARGS, "minItems": 1}),
    "env": _desc("variables for the engine (the node's --engine-env-allow, else 403)",
                 {**_map({"type": "string", "maxLength": ARG_CHARS_MAX}), "maxProperties": ENV_MAX,
                  "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$",
                                    "not": {"const": "CUDA_VISIBLE_DEVICES"}}}),
    "health_path": _PATH, "models_path": _PATH,
    "startup_timeout_s": {"type": "number", "minimum": 1, "maximum": 86400},
    "completion_probe": BOOL,
    "load_format": _desc("how the command engine tells its load, as vllm (/metrics), llama.cpp (/slots) or "
                         "sglang (/get_load) do; routing reads it", {"enum": list(LOAD_FORMATS)}),
    "port": _desc("not read here (the body's port is)", ANY),
    "framework": _coded("UNKNOWN_ENGINE", _desc("gswarm's name for engine (llamacpp is llama.cpp)",
                                                {"enum": [*ENGINES, *GSWARM_FRAMEWORKS]})),
}, closed=True, description=f"args and flags make at most {ARGS_MAX} arguments in all (else 400 INVALID_CONFIG)"))
assert set(SERVE_CONFIG["properties"]) == CONFIG_KEYS | {"port", "framework"}
_SERVE_PORT = _desc("1 to 65535, inside the node's --service-ports (else 400 PORT_OUT_OF_RANGE)",
                    _null({"type": "integer", "minimum": 1, "maximum": 65535}))
# ``body.get("config") or {}``: a value Python reads as false is no config.
_SERVE_CONFIG_OR_NONE = {"anyOf": [SERVE_CONFIG, {"enum": [None, False, 0, "", []]}]}
_GPUS_OF_A_NODE = _desc("GPUs of one node (else 400 INVALID_DEVICE)", _arr(GPU_DEVICE, minItems=1, maxItems=64))
SERVE_BODY = _obj({}, {
    "device": _desc("node:gpuN (node:gpu is node:gpu0); read when neither target_nodes nor devices is given", ANY),
    "devices": _desc(f"{_GPUS_OF_A_NODE['description']}; read when target_nodes is not given", ANY),
    "target_nodes": _desc("gswarm's form: nodes, each serving on its freest GPU that fits",
                          _arr(NODE_ID, minItems=1, maxItems=64)),
    "port": _SERVE_PORT,
    "config": _SERVE_CONFIG_OR_NONE,
    "engine": _desc("the config's engine, given beside it", _ENGINE),
}, closed=True, anyOf=[
    {"required": ["target_nodes"]},
    {"required": ["devices"], "not": {"required": ["target_nodes"]}, "properties": {"devices": _GPUS_OF_A_NODE}},
    {"required": ["device"], "not": {"anyOf": [{"required": ["target_nodes"]}, {"required": ["devices"]}]},
     "properties": {"device": GPU_DEVICE}},
])
GSWARM_SERVE_BODY = _obj({"device": GSWARM_GPU}, {"port": _SERVE_PORT, "config": _SERVE_CONFIG_OR_NONE}, closed=True)

# A pipeline (``protocol.pipeline.parse_pipeline``).  What each action type takes is said
# per type; what needs the whole pipeline (ids named once, dependencies that name another action
# and go round no cycle, a device named twice in a move or copy, a serve's GPUs on one node) or
# the mesh (the nodes and models it names) the descriptions say: 422 INVALID_PIPELINE.
_TEXT = {"type": "string", "maxLength": LIMITS.text}
_ACTION_ID = _desc("1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit",
                   {"type": "string", "maxLength": 128, "pattern": f"^(?:{SEGMENT_PATTERN})$"})
_STEP_KIND = f"(?:{DEVICE_KIND_PATTERN}|gpu)"  # parse_step_device: node:gpu is node:gpu0
_STEP_NODE = f"(?:{NODE_ID_PATTERN}):"


def _step_device(pattern: str, description: str) -> Schema:
    return {"type": "string", "maxLength": 100, "pattern": f"^{_NO_DOUBLE_DOT}{pattern}$", "description": description}


STEP_DEVICE = _step_device(f"(?:{_STEP_NODE})?{_STEP_KIND}",
                           "node:disk, node:dram, node:gpuN, node:gpu (gpu0), or any:<kind> or <kind>: placement picks")
_STEP_ON_NODE = _step_device(f"(?!any:){_STEP_NODE}{_STEP_KIND}", "a device of a named node (not any:)")
_STEP_GPU = _step_device(f"(?:{_STEP_NODE})?(?:{_GPU_KIND})",
                         "a GPU: node:gpuN, node:gpu, any:gpu or gpu")
_PORT_NUMBER = ("(?:0{0,4}[1-9]|0{0,3}[1-9][0-9]|0{0,2}[1-9][0-9]{2}|0?[1-9][0-9]{3}|[1-5][0-9]{4}|6[0-4][0-9]{3}"
                "|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])")  # 1 to 65535, in at most 5 digits
# protocol.healthcheck.parse_target: printable ASCII without spaces, quotes or backslashes; a
# host name (no '..') or [IPv6] (no zone), a port 1 to 65535; no user info.
_TARGET = _desc(
    "http(s)://host[:port][/path][?query]: the host a node's id, a name or an address ([IPv6]); printable ASCII "
    "without spaces, quotes, backslashes, <>^`{|}",
    {"type": "string", "maxLength": LIMITS.text,
     "pattern": (f"^https?://(?:\\[{_IPV6}\\]|(?![^/?#:]*\\.\\.)[A-Za-z0-9_][A-Za-z0-9_.-]{{0,252}})"
                 f"(?::{_PORT_NUMBER})?(?:[/?#][!#-;=?-\\[\\]_a-z~]*)?$")})
_URL_PREFIX = {"type": "string", "maxLength": LIMITS.text}
_ACTION = _obj(
    {"action_id": _ACTION_ID, "action_type": {"enum": list(ACTION_TYPES)}},
    {"model_name": _desc("all but a health_check name one", _null(MODEL_NAME)),
     "devices": _arr(STEP_DEVICE, maxItems=LIMITS.devices),
     "dependencies": _desc("action_ids of this pipeline, no cycle", _arr(_ACTION_ID, maxItems=LIMITS.dependencies,
                                                                           uniqueItems=True)),
     "source_url": _desc("a download's", _null(SOURCE_URL)),
     "target_url": _desc("a health_check's (see there); http:// or https://",
                         _null({**_URL_PREFIX, "pattern": "^https?://"})),
     "port": _null({"type": "integer", "minimum": 1, "maximum": 65535}),
     "keep_source": _desc("a move's: keep the source", BOOL),
     "config": _null({"type": "object", "maxProperties": LIMITS.config_items}),
     "retries": {"type": "integer", "minimum": 0, "maximum": LIMITS.retries},
     "backoff_s": {"type": "number", "minimum": 0, "maximum": LIMITS.backoff_s},
     "timeout_s": _null({"type": "number", "minimum": 0.001, "maximum": LIMITS.timeout_s})},
    closed=True,
)


_NAMED = {"model_name": MODEL_NAME}  # required, and a name (not null)
_NO_KEEP = {"keep_source": {"const": False}}  # only a move keeps its source
_NO_SOURCE = {"source_url": {"type": "null"}}  # only a download has a source URL
_GPUS = {"devices": {"items": _STEP_GPU}}
# What each action type takes beyond the fields' own rules: one branch a type (a generator picks one).
_BY_TYPE: dict[str, tuple[list[str], Schema]] = {
    "download": (["model_name", "devices"], {**_NAMED, **_NO_KEEP, "devices": {"minItems": 1, "maxItems": 1}}),
    "move": (["model_name", "devices"], {**_NAMED, **_NO_SOURCE,
                                         "devices": {"minItems": 2, "prefixItems": [_STEP_ON_NODE]}}),
    "copy": (["model_name", "devices"], {**_NAMED, **_NO_KEEP, **_NO_SOURCE,
                                         "devices": {"minItems": 2, "prefixItems": [_STEP_ON_NODE]}}),
    "delete": (["model_name", "devices"], {**_NAMED, **_NO_KEEP, **_NO_SOURCE,
                                           "devices": {"minItems": 1, "items": _STEP_ON_NODE}}),
    "serve": (["model_name"], {**_NAMED, **_NO_KEEP, **_NO_SOURCE, **_GPUS}),
    "stop_serve": (["model_name"], {**_NAMED, **_NO_KEEP, **_NO_SOURCE, **_GPUS}),
    # A health check checks a URL, or the service of a model.
    "health_check": ([], {**_NO_KEEP, **_NO_SOURCE, "devices": {"maxItems": 0}, "target_url": _null(_TARGET)}),
}
assert set(_BY_TYPE) == set(ACTION_TYPES)
_ACTION["anyOf"] = [{"required": ["action_type", *required], "properties": {"action_type": {"const": t}, **props}}
                    for t, (required, props) in _BY_TYPE.items()]
_ACTION["allOf"] = [
    {"anyOf": [{"properties": {"action_type": {"not": {"const": "health_check"}}}},
               {"required": ["target_url"], "properties": {"target_url": {"type": "string"}}},
               {"required": ["model_name"], "properties": {"model_name": {"type": "string"}}}]},
    # A command engine that takes no {port} needs the port it listens on.
    {"if": {"required": ["action_type", "config"], "properties": {"action_type": {"const": "serve"}, "config": {
        "required": ["engine", "command"],
        "properties": {"engine": {"const": "command"},
                       "command": {"type": "array", "not": {"contains": {"type": "string", "pattern": "\\{port\\}"}}}}}}},
     "then": {"required": ["port"], "properties": {"port": {"type": "integer"}}}},
]
PIPELINE = _obj(
    {"name": {**_TEXT, "minLength": 1}, "actions": _arr(_ACTION, minItems=1, maxItems=LIMITS.actions)},
    {"description": _null(_TEXT), "fail_fast": BOOL,
     "priority": _desc("higher runs first", {"type": "integer", "minimum": -1000, "maximum": 1000})},
    closed=True, description="action ids are named once; dependencies name other actions of the pipeline and go "
                             "round no cycle; a move or copy names no device twice; a serve's GPUs share a node; the "
                             "nodes named are in the mesh, and each model is registered or downloaded by an earlier "
                             "action (else 422 INVALID_PIPELINE, with every problem)",
)

INFERENCE_BODY = _obj({"model": {"type": "string", "minLength": 1, "maxLength": 200}},
                      description="an OpenAI-style request: every field but model goes to the engine as it is")

HOLDER: Schema = {"type": "string", "pattern": f"^(?:{HOLDER_PATTERN})$",
                  "description": "who holds a lease (a pod's name): letters, digits, '.', '_', ':', '-'"}
LEASE = _obj({"model_name": STR, "device": STR, "holder": STR, "until_ms": INT, "granted_ms": INT, "left_s": INT})
ENSURE_BODY = _obj(
    {"model": MODEL_NAME, "device": STORE_DEVICE},
    {"holder": _desc("who holds the lease (default: ensure); the same holder renews its own", HOLDER),
     "lease_s": _desc("how long the lease holds", {"type": "number", "minimum": LEASE_MIN_S,
                                                   "maximum": LEASE_MAX_S})}, closed=True)
ENSURED = _obj({"status": {"const": "ready"}, "model_name": STR, "device": STR, "path": STR, "manifest_hash": STR,
                "size": INT, "lease": LEASE})
ENSURING = _obj({"status": {"const": "copying"}, "model_name": STR, "device": STR, "why": STR,
                 "transfer_id": _null(STR), "transfer": TRANSFER})
BUNDLE_IMPORTED = _obj({"node_id": STR, "device": STR, "bytes": INT, "models": _arr(_obj(
    {"model_name": STR, "device": STR, "manifest_hash": STR, "size": INT, "files": INT, "chunks": INT,
     "chunks_resumed": INT, "chunks_written": INT,
     "status": {"enum": ["imported", "already present", "would import"]},
     "path": _null(STR), "digest": _null(STR)}))})

# -- the routes --------------------------------------------------------------------------------

_COPY_ERRORS = _errors(404, 409, 502)  # no model, node or copy; a node not reachable; its peer failed
_SERVE_ERRORS = _errors(403, 404, 409, 424, 501, 502)

# (method, the route's rule as the app writes it) -> its description.  Every
# public route of the app has one (tests/unit/test_openapi.py checks it); the
# peer routes (/mesh/...) are not part of the public API and have none.
ROUTE_DOCS: dict[tuple[str, str], RouteDoc] = {
    # -- the node, and the API itself
    ("GET", "/health"): RouteDoc("The process answers (a liveness probe).", "meta", responses={200: PROBE}, open=True),
    ("GET", "/ready"): RouteDoc("The node listens and has tried every join seed (a readiness probe); 503 NOT_READY "
                                "while it starts or leaves.", "meta", responses={200: PROBE}, open=True),
    ("GET", "/status"): RouteDoc("Nodes by state, model counts, storage totals, jobs and services by state.", "meta",
                                 responses={200: STATUS}),
    ("GET", "/metrics"): RouteDoc("Prometheus metrics of this node, as text.", "meta", responses={200: TEXT},
                                  response_type="text/plain"),
    ("GET", "/openapi.json"): RouteDoc("This document: the API as OpenAPI 3.1.", "meta", responses={200: OPENAPI},
                                       open=True),
    ("GET", "/docs"): RouteDoc("The API's reference, as a page.", "meta", responses={200: TEXT}, open=True,
                               response_type="text/html"),
    ("GET", "/"): RouteDoc("The dashboard: the mesh at a glance, as a page.", "meta", responses={200: TEXT},
                           open=True, response_type="text/html"),
    # -- nodes
    ("GET", "/nodes"): RouteDoc("Every known node: address, state, generation, storage, GPUs, models.", "nodes",
                                responses={200: _paged("nodes", NODE)}, query=PAGE_QUERY),
    ("GET", "/storage"): RouteDoc("This node's devices (total, used, free) and the copies it holds.", "nodes",
                                  responses={200: STORAGE}),
    ("GET", "/v2/catalog/availability"): RouteDoc(
        "llama-orch's view: per node online, models and pools; replicated and single-node models.", "nodes",
        responses={200: AVAILABILITY}),
    ("GET", "/v2/catalog/models"): RouteDoc(
        "llama-orch's catalog: each model's id and sha256 digest, per copy, and whether they agree with the "
        "registration's.", "models", responses={200: _paged("models", CATALOG_MODEL)}, query=PAGE_QUERY),
    ("GET", "/v2/catalog/models/<model:name>"): RouteDoc(
        "One model in llama-orch's catalog shape.", "models", responses={200: CATALOG_MODEL, **_errors(404)}),
    ("POST", "/v2/catalog/models"): RouteDoc(
        "Add a model to the catalog (llama-orch's): a registration, with the digest its copies must have.",
        "models", request=CATALOG_BODY, responses={code: _written(CATALOG_MODEL) for code in (200, 201)}),
    ("GET", "/v2/nodes"): RouteDoc(
        "llama-orch's nodes: each node online or not, its pools (one per GPU) and its GPUs.", "nodes",
        responses={200: _paged("nodes", NODE_V2)}, query=PAGE_QUERY),
    # -- models
    ("GET", "/models"): RouteDoc("Registered models with their locations and status.", "models",
                                 responses={200: _paged("models", _model())}, query=PAGE_QUERY),
    ("GET", "/models/<model:name>"): RouteDoc("One model: its registration, locations, copies and services.",
                                              "models", responses={200: _model(full=True), **_errors(404)}),
    ("POST", "/models/<model:name>/register"): RouteDoc(
        "Register a model (201), or replace its registration (200, with what changed).", "models",
        request=REGISTER_BODY,
        responses={code: _written(_model(full=True, registered={"const": True}, replaced=BOOL, changed=NAMES))
                   for code in (200, 201)}),
    ("DELETE", "/models/<model:name>"): RouteDoc(
        "Unregister a model (with purge=true every copy is deleted too); with device=node:device, free that "
        "device only.", "models",
        responses={200: _written({"anyOf": [UNREGISTERED, LOCATION_DROPPED]}), **_COPY_ERRORS},
        query={"purge": _desc("1, true or yes (any case): delete every copy too; any other value: do not", STR),
               "device": _desc("free this device only (node:device); the model stays registered", DEVICE)}),
    ("POST", "/models/<model:name>/pin"): RouteDoc(
        "Pin a model: the mesh keeps between min and max copies of it, on the tier and nodes the policy names, "
        "and heals itself when a holder is lost.", "models",
        request=POLICY_BODY, responses={200: _written(_model(full=True)), **_errors(404)}),
    ("DELETE", "/models/<model:name>/pin"): RouteDoc(
        "Unpin a model: its copies stay where they are; the mesh no longer adds or drops any.", "models",
        responses={200: _written(_model(full=True)), **_errors(404)}),
    # -- copies and where they live
    ("POST", "/models/<model:name>/copy"): RouteDoc(
        "Copy a model to a device, across nodes or between one node's tiers: a transfer.", "copies",
        request=COPY_BODY, responses={202: _written(TRANSFER), **_COPY_ERRORS}),
    ("POST", "/models/<model:name>/move"): RouteDoc(
        "Move a model's copy to another device: a transfer, then the source is deleted.", "copies",
        request=MOVE_BODY, responses={202: _written(TRANSFER), **_COPY_ERRORS}),
    ("POST", "/models/<model:name>/download"): RouteDoc(
        "Fetch a model onto a device from the hub, a URL, a file on the target node or another node: a transfer.",
        "copies", request=DOWNLOAD_BODY, responses={202: _written(TRANSFER), **_COPY_ERRORS, **_errors(403)}),
    ("GET", "/transfers"): RouteDoc("Every transfer the mesh knows: status, bytes, rate, sources, error.", "copies",
                                    responses={200: _paged("transfers", TRANSFER)}, query=PAGE_QUERY),
    ("GET", "/transfers/<tid>"): RouteDoc("One transfer.", "copies", responses={200: TRANSFER, **_errors(404)}),
    ("DELETE", "/transfers/<tid>"): RouteDoc(
        "Cancel a transfer, through any node (the node that runs it stops it): it fails CANCELLED, its "
        "partial files removed (202: still being removed).",
        "copies", responses={code: _written({**TRANSFER, "properties": {**TRANSFER["properties"], "cancelled": BOOL}})
                             for code in (200, 202)} | _errors(404, 409, 421)),
    ("GET", "/models/<model:name>/locations"): RouteDoc(
        "Where a model's copies live.", "copies",
        responses={200: _obj({"model_name": STR, "locations": NAMES}), **_errors(404)}),
    ("POST", "/models/<model:name>/locations/<device:device>"): RouteDoc(
        "Record by hand that a device holds a model.", "copies",
        responses={201: _written(_obj({"model_name": STR, "device": STR, "recorded": {"const": True}})),
                   **_errors(404)}),
    ("DELETE", "/models/<model:name>/locations/<device:device>"): RouteDoc(
        "Free one device: delete the copy there, or drop a location recorded by hand.", "copies",
        responses={200: _written(LOCATION_DROPPED), **_COPY_ERRORS}),
    # -- pipelines
    ("POST", "/jobs"): RouteDoc(
        "Run a pipeline (JSON): 202 with the job; 422 INVALID_PIPELINE with every problem.", "jobs",
        request=PIPELINE, responses={202: _written(JOB_TAKEN), **_errors(409, 422, 429)}, checked=False),
    ("POST", "/jobs/from-yaml"): RouteDoc(
        "Run a pipeline sent as YAML (the raw body, or a file of a multipart form).", "jobs",
        request=_desc("a pipeline as POST /jobs takes it, written in YAML (JSON is YAML too); no anchors or aliases",
                      PIPELINE), content_type="application/yaml",
        responses={202: _written(JOB_TAKEN), **_errors(409, 422, 429)}),
    ("POST", "/jobs/<jid>/create"): RouteDoc(
        "gswarm's form: run a pipeline (JSON) under the caller's own job id; 409 JOB_ID_TAKEN when the mesh has "
        "one.", "jobs", request=PIPELINE, responses={202: _written(JOB_TAKEN), **_errors(409, 422, 429)},
        checked=False),
    ("GET", "/jobs"): RouteDoc("Every job the mesh knows, newest first, with each step's status.", "jobs",
                               responses={200: _paged("jobs", _job())}, query=PAGE_QUERY),
    ("GET", "/jobs/<jid>"): RouteDoc("One job: each step's status, attempts, timings, progress, error.", "jobs",
                                     responses={200: _job(), **_errors(404)}),
    ("GET", "/jobs/<jid>/status"): RouteDoc("A job's short status (gswarm's).", "jobs",
                                            responses={200: JOB_STATUS, **_errors(404)}),
    ("POST", "/jobs/<jid>/cancel"): RouteDoc("Cancel a job: running steps stop, the rest are cancelled.", "jobs",
                                             responses={200: _written(_job()), **_errors(404)}),
    ("GET", "/placement"): RouteDoc(
        "Where a step that names no node would run: every node ranked, with why it does not fit.", "jobs",
        responses={200: PLACEMENT, **_errors(404)},
        query={"model": _desc("the model's name", MODEL_NAME),
               "device": _desc("the tier (default disk)", {"type": "string", "enum": ["disk", "dram", "gpu"]})},
        required_query=("model",)),
    # -- services
    ("GET", "/services"): RouteDoc("Every engine the mesh runs: model, node, device, port, state, url, error.",
                                   "services", responses={200: _paged("services", SERVICE)}, query=PAGE_QUERY),
    ("GET", "/models/<model:name>/services"): RouteDoc(
        "A model's engines, wherever they run.", "services",
        responses={200: _paged("services", SERVICE, model_name=STR), **_errors(404)}, query=PAGE_QUERY),
    ("POST", "/models/<model:name>/services"): RouteDoc(
        "Serve a model on GPUs of one node: 202 with the service, starting.", "services",
        request=SERVE_BODY, responses={202: _written({"anyOf": [SERVICE, _obj({"model_name": STR, "services": _arr(
            SERVICE)})]}), **_SERVE_ERRORS}),
    ("POST", "/models/<model:name>/serve"): RouteDoc(
        "gswarm's serve: a model on one GPU (of this node, or node:gpuN): 202 with the service, starting.",
        "services", request=GSWARM_SERVE_BODY, responses={202: _written(SERVICE), **_SERVE_ERRORS}),
    ("DELETE", "/models/<model:name>/serve"): RouteDoc(
        "gswarm's stop: every engine of a model, wherever it runs.", "services",
        responses={200: _written(_obj({"model_name": STR, "stopped": _arr(SERVICE)})), **_COPY_ERRORS}),
    ("GET", "/models/<model:name>/serve/status"): RouteDoc(
        "gswarm's serve status: whether a model is served healthy, and its engines.", "services",
        responses={200: _obj({"model_name": STR, "serving": BOOL, "services": _arr(SERVICE)}), **_errors(404)}),
    ("DELETE", "/models/<model:name>/services/<node>"): RouteDoc(
        "Stop that node's engines of a model (on one port, with port=).", "services",
        responses={200: _written(_obj({"stopped": _arr(SERVICE)})), **_COPY_ERRORS},
        query={"port": {"type": "integer", "minimum": 1, "maximum": 65535}}),
    # -- inference through any node
    ("GET", "/v1/models"): RouteDoc("The models served healthy anywhere in the mesh (OpenAI-style).", "inference",
                                    responses={200: V1_MODELS}),
    ("GET", "/v1/models/<model:name>"): RouteDoc(
        "One model served healthy somewhere (the OpenAI SDK's models.retrieve).", "inference",
        responses={200: V1_MODEL, **_errors(404)}),
    **{("POST", path): RouteDoc(
        f"OpenAI-style {what}, forwarded to a healthy service of the model and streamed back.", "inference",
        request=INFERENCE_BODY, responses={200: {"type": "object"}, **_errors(404, 502)}, streams=True,
        other_answers="the engine's own answer, passed on as it came")
       for path, what in (("/v1/chat/completions", "chat completion"), ("/v1/completions", "completion"),
                          ("/v1/embeddings", "embeddings"))},
    # -- bundles, ensure and leases (meshnode/api/bundles.py)
    ("GET", "/bundles"): RouteDoc(
        "Export models as one bundle (a tar stream: manifests, registrations, files, sha256s), from this node's copy "
        "or the nearest holder's.",
        "copies", responses={200: _desc("the bundle (protocol/bundle.py)", {"type": "string", "format": "binary"}),
                             **_errors(404, 409)},
        query={"model": _desc(f"a model to bundle; repeat it for several (model=A&model=B), at most "
                              f"{BUNDLE_MODELS_MAX}", MODEL_NAME)},
        required_query=("model",), response_type="application/x-tar"),
    ("POST", "/bundles"): RouteDoc(
        "Import a bundle (the body, streamed) into a tier of this node: verified as it lands, registered, its copies "
        "gossiped.", "copies",
        request=_desc("a bundle, as GET /bundles gives it, streamed. Every chunk and file is verified as it lands: "
                      "422 BAD_CONTENT, nothing kept; 422 INCOMPLETE, cut short, its verified chunks kept for the "
                      "next try; 409 CONTENT_CONFLICT when the mesh knows other bytes for a model; 421 names the "
                      "node to ask for another node's device. Sent as application/octet-stream or "
                      "application/x-tar", {"type": "string", "format": "binary"}),
        content_type="application/octet-stream",
        responses={code: _written(BUNDLE_IMPORTED) for code in (200, 201)} | _errors(404, 409, 422, 507),
        query={"to": _desc("this node's device the copies go to", STORE_DEVICE),
               "check": _desc("true: the body is the bundle's header entry alone; answer what an import would "
                              "refuse, write nothing", {"type": "string", "enum": ["true", "false"]})},
        required_query=("to",)),
    ("POST", "/ensure"): RouteDoc(
        "A verified copy on this node's device: 200, its path and a lease against eviction; or 202, the transfer "
        "making it; 404 NO_SOURCE when nothing can.", "copies",
        request=ENSURE_BODY, responses={200: _written(ENSURED), 202: _written(ENSURING), **_errors(404, 409, 507)}),
    ("GET", "/leases"): RouteDoc("The leases this node's ensure handed out that have not ended.", "copies",
                                 responses={200: _obj({"node_id": STR, "leases": _arr(LEASE)})}),
    ("DELETE", "/leases"): RouteDoc(
        "Release a lease on a copy of this node (one holder's, or every holder's): it may be evicted again.",
        "copies", responses={200: _written(_obj({"model_name": STR, "device": STR, "released": NAMES,
                                                 "held_by": NAMES})), **_errors(404)},
        query={"model": MODEL_NAME, "device": STORE_DEVICE, "holder": HOLDER}, required_query=("model", "device")),
}

TAGS = {
    "nodes": "The mesh's nodes and their storage.",
    "models": "The registry: models, their registrations and status.",
    "copies": "Copies of a model on devices, and the transfers that make them.",
    "jobs": "Pipelines of steps, run by the mesh.",
    "services": "Inference engines serving models on GPUs.",
    "inference": "OpenAI-style inference for every model served in the mesh.",
    "meta": "The node itself: probes, metrics, this description, the dashboard.",
}

_PARAMS: dict[str, tuple[str, str, Schema]] = {
    "<model:name>": ("name", "a model's name: `name` or `owner/name`", MODEL_NAME),
    "<device:device>": ("device", "a device: `node:disk`, `node:dram` or `node:gpuN`", DEVICE),
    "<tid>": ("tid", "a transfer's id", TRANSFER_ID),
    "<jid>": ("jid", "a job's id", JOB_ID),
    "<node>": ("node", "a node's id", NODE_ID),
}


def _openapi_path(rule: str) -> tuple[str, list[dict[str, Any]]]:
    path, params = rule, []
    for token, (name, description, schema) in _PARAMS.items():
        if token in path:
            path = path.replace(token, "{" + name + "}")
            params.append({"name": name, "in": "path", "required": True, "description": description,
                           "schema": schema})
    return path, params


def _operation_id(method: str, path: str) -> str:
    words = "".join(c if c.isalnum() else "_" for c in path.replace("{", "").replace("}", "")).strip("_")
    return f"{method.lower()}_{words or 'root'}"


def _takes_no_body(schema: Schema) -> bool:
    """Whether ``schema`` accepts null: the body may be left out."""
    t = schema.get("type")
    return t == "null" or (isinstance(t, list) and "null" in t)


def _answer(status: int, schema: Schema, doc: RouteDoc) -> dict[str, Any]:
    ok = status < 300
    content = {doc.response_type if ok else "application/json": {"schema": schema}}
    if ok and doc.streams:
        content["text/event-stream"] = {"schema": _desc("server-sent events, as the engine sends them", STR)}
    return {"description": _STATUS_TEXT.get(status, "answer"), "content": content}


def openapi_document(version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route in ``ROUTE_DOCS``."""
    paths: dict[str, dict[str, Any]] = {}
    for (method, rule), doc in sorted(ROUTE_DOCS.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        path, in_path = _openapi_path(rule)
        params = in_path + [{"name": k, "in": "query", "required": k in doc.required_query, "schema": v}
                            for k, v in doc.query.items()]
        errors = {s: e for s, e in _COMMON_ERRORS.items() if not (doc.open and s == 401)}
        if method != "GET":
            errors.update(_WRITE_ERRORS)
        if in_path:  # a path its converters refuse (a newline in a name) matches no route
            errors[404] = ERROR
        op: dict[str, Any] = {
            "summary": doc.summary,
            "tags": [doc.tag],
            "operationId": _operation_id(method, path),
            "responses": {str(status): _answer(status, schema, doc)
                          for status, schema in sorted({**errors, **doc.responses}.items())},
        }
        if doc.other_answers is not None:
            op["responses"]["default"] = {"description": doc.other_answers}
        if params:
            op["parameters"] = params
        if doc.open:
            op["security"] = []
        if doc.request is not None:
            op["requestBody"] = {"required": not _takes_no_body(doc.request),
                                 "content": {doc.content_type: {"schema": doc.request}}}
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "meshnode", "version": version,
                 "description": "The HTTP API every meshnode node serves (README.md, \"HTTP API\")."},
        "tags": [{"name": name, "description": text} for name, text in TAGS.items()],
        "components": {"securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}},
        "security": [{"token": []}],
        "paths": copy.deepcopy(paths),  # the schemas are shared: a reader's change stays its own
    }


_STATUS_TEXT = {200: "OK", 201: "created", 202: "accepted: follow it where Location says", 400: "a bad request",
                401: "a missing or wrong API token", 403: "not allowed here", 404: "not found",
                405: "a method the route does not take", 409: "a conflict", 413: "a body over the limit",
                415: "a body of a type the route does not take", 421: "a Host name this node does not answer",
                422: "a pipeline with problems: every one listed", 424: "the engine's program is missing",
                429: "too many", 500: "the node's fault: see its log", 501: "not supported by that node",
                502: "a peer or an engine failed", 503: "not now"}
_COMMON_ERRORS: dict[int, Schema] = {400: ERROR, 401: ERROR, 405: ERROR, 413: ERROR, 421: ERROR, 500: ERROR,
                                     503: ERROR}
# The API guard's (protocol.httpguard) answers to a write: from another origin, a body of a type
# the route does not take, past the write rate.
_WRITE_ERRORS: dict[int, Schema] = {403: ERROR, 415: ERROR, 429: ERROR}
