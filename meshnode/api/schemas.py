"""The public API described once: each route's request body and answers as
JSON Schema (draft 2020-12), from which ``/openapi.json`` is built and
against which request bodies are checked before a handler runs.

The schemas say the shape (types, required fields, bounds the handlers
also enforce); the handlers and ``protocol/`` still judge what only they
can (a model that exists, a device of a live node, a pipeline's graph).
A schema never refuses a body its handler would take.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from protocol.jobs import ActionStatus, JobStatus, PartStatus
from protocol.pipeline import ACTION_TYPES, LIMITS
from protocol.registry import METADATA_FILES_MAX
from protocol.serving import ARG_CHARS_MAX, ARGS_MAX, ENGINES, ServiceState
from protocol.transfer import TransferStatus

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

_REPLICA_COUNT = {"type": "integer", "minimum": -1, "maximum": 1024}
POLICY_BODY = _obj({}, {
    "min": _desc("at least this many copies; -1: on every eligible node (default 1)", _REPLICA_COUNT),
    "max": _desc("at most this many; -1: every eligible node (default: min)", _REPLICA_COUNT),
    "tier": _desc("where the copies live (default disk)", {"enum": ["disk", "dram"]}),
    "labels": _null(_desc("only on nodes with every one of these --labels", {"type": "object", "additionalProperties": STR})),
    "spread": _null(_desc("a label whose values the copies are spread over, e.g. zone", STR)),
}, closed=True)
REPLICAS = _null(_obj({
    "policy": POLICY_BODY, "wanted": _obj({"min": INT, "max": INT}),
    "actual": _desc("complete copies on the policy's tier on nodes that are up", INT),
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
CATALOG_BODY = _obj({"id": _desc("the model's name", {"type": "string", "minLength": 1, "maxLength": 200})}, {
    "digest": _null(_desc("sha256:<hex>: the digest its copies must have", _DIGEST)),
    "source_url": _null({"type": "string", "maxLength": 2048}),
}, closed=True)

V1_MODELS = _obj({"object": STR, "data": _arr(_obj({"id": STR, "object": STR, "owned_by": STR}))})

LOCATION_DROPPED = _obj({"model_name": STR, "device": STR, "dropped": {"const": True}},
                        {"deleted_copy": {"const": True}})
UNREGISTERED = _obj({"model_name": STR, "unregistered": {"const": True}, "purged_locations": NAMES},
                    {"deleted_copies": NAMES, "pending_copies": _arr(_obj({"device": STR, "reason": STR}))})

OPENAPI = _obj({"openapi": STR, "info": {"type": "object"}, "paths": {"type": "object"}})
TEXT: Schema = STR

# -- request bodies ----------------------------------------------------------------------------

_DEVICE = _desc("node:disk, node:dram or node:gpuN", STR)
_PRIORITY = _desc("taken, not used yet", ANY)

COPY_BODY = _obj(
    {"to_device": _DEVICE},
    {"from_device": _desc("the copy to read; left out or null: any holder serves", _null(STR)),
     "keep_source": _desc("a move that keeps its source is a copy", BOOL), "priority": _PRIORITY},
    closed=True,
)
MOVE_BODY = _obj(
    {"from_device": _desc("the copy to move", STR), "to_device": _DEVICE},
    {"keep_source": _desc("true makes the move a copy", BOOL), "priority": _PRIORITY},
    closed=True,
)
# Which fields count depends on the source: another node's copy takes only the devices; a file
# takes the path; only an http(s):// or hf:// URL reads revision and the patterns.  What a
# download does not read it does not check, so neither does the schema.
DOWNLOAD_BODY = _obj(
    {"target_device": _DEVICE},
    {"source": _desc("\"web\" (the default: source_url) or another node's copy, node:device", _null(STR)),
     "source_url": _desc("hf://owner/name, https://..., s3://bucket/prefix, file:///path on the target node (a string; any other "
                         "value is ignored: the registration's URL serves)", ANY),
     "revision": _desc("a branch, tag or commit of a hub repository (a string)", ANY),
     "allow_patterns": _desc("glob patterns of the files to fetch (a string or a list of strings)", ANY),
     "ignore_patterns": _desc("glob patterns of the files to leave (a string or a list of strings)", ANY),
     "priority": _PRIORITY},
    closed=True,
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

# A serve's config: its keys and their types.  Unknown keys and bad values are the engine
# layer's to refuse (400 INVALID_CONFIG, UNKNOWN_ENGINE): the schema leaves them to it.
_ARGS = _arr({"type": "string", "minLength": 1, "maxLength": ARG_CHARS_MAX}, maxItems=ARGS_MAX)
SERVE_CONFIG = _obj({}, {
    "engine": _desc(", ".join(ENGINES), STR),
    "args": _ARGS,
    "flags": _desc("--name value pairs (true: the bare flag; false or null: left out)",
                   _map({"type": ["string", "number", "boolean", "null"]})),
    "command": _desc("the command engine's program and arguments ({port}, {host}, {model_dir}, {model_name}, "
                           "{gpus} filled in)",
                     {**_ARGS, "minItems": 1}),
    "env": _map(STR),
    "health_path": _null(STR), "models_path": _null(STR),
    "startup_timeout_s": {"type": "number", "minimum": 1, "maximum": 86400},
    "completion_probe": BOOL,
    "port": ANY,
})
SERVE_BODY = _obj({}, {
    "device": _desc("node:gpuN (node:gpu is node:gpu0); read when devices is not given", ANY),
    "devices": _desc("GPUs of one node", _arr(STR, minItems=1, maxItems=64)),
    "port": _null({"type": "integer", "minimum": 1, "maximum": 65535}),
    # ``body.get("config") or {}``: a value Python reads as false is no config.
    "config": {"anyOf": [SERVE_CONFIG, {"enum": [None, False, 0, "", []]}]},
    "engine": _desc("the config's engine, given beside it", STR),
}, closed=True, anyOf=[{"required": ["devices"]}, {"required": ["device"], "properties": {"device": STR}}])

# A pipeline (``protocol.pipeline.parse_pipeline``, which says what a schema cannot: ids,
# the dependency graph, what each action type needs).
_TEXT = {"type": "string", "maxLength": LIMITS.text}
_ACTION = _obj(
    {"action_id": {"type": "string", "minLength": 1, "maxLength": 128},
     "action_type": _desc(", ".join(ACTION_TYPES), STR)},
    {"model_name": _desc("all but a health_check name one", _null(STR)),
     "devices": _arr(_desc("node:disk, node:dram, node:gpuN, node:gpu, any:<kind> or <kind>", STR),
                     maxItems=LIMITS.devices),
     "dependencies": _arr(_desc("an action_id", STR), maxItems=LIMITS.dependencies),
     "source_url": _null(_TEXT), "target_url": _null(_TEXT),
     "port": _null({"type": "integer", "minimum": 1, "maximum": 65535}),
     "keep_source": _desc("a move's: keep the source", BOOL),
     "config": _null({"type": "object", "maxProperties": LIMITS.config_items}),
     "retries": {"type": "integer", "minimum": 0, "maximum": LIMITS.retries},
     "backoff_s": {"type": "number", "minimum": 0, "maximum": LIMITS.backoff_s},
     "timeout_s": _null({"type": "number", "minimum": 0.001, "maximum": LIMITS.timeout_s})},
    closed=True,
)
PIPELINE = _obj(
    {"name": {**_TEXT, "minLength": 1}, "actions": _arr(_ACTION, minItems=1, maxItems=LIMITS.actions)},
    {"description": _null(_TEXT), "fail_fast": BOOL,
     "priority": _desc("higher runs first", {"type": "integer", "minimum": -1000, "maximum": 1000})},
    closed=True,
)

INFERENCE_BODY = _obj({"model": {"type": "string", "minLength": 1, "maxLength": 200}},
                      description="an OpenAI-style request: every field but model goes to the engine as it is")

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
        query={"purge": _desc("1, true or yes: delete every copy too", STR),
               "device": _desc("free this device only (node:device); the model stays registered", STR)}),
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
        request=_desc("the pipeline's YAML (or JSON) text", STR), content_type="application/yaml",
        responses={202: _written(JOB_TAKEN), **_errors(409, 422, 429)}),
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
        query={"model": _desc("the model's name", STR),
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
        request=SERVE_BODY, responses={202: _written(SERVICE), **_SERVE_ERRORS}),
    ("DELETE", "/models/<model:name>/services/<node>"): RouteDoc(
        "Stop that node's engines of a model (on one port, with port=).", "services",
        responses={200: _written(_obj({"stopped": _arr(SERVICE)})), **_COPY_ERRORS},
        query={"port": {"type": "integer", "minimum": 1, "maximum": 65535}}),
    # -- inference through any node
    ("GET", "/v1/models"): RouteDoc("The models served healthy anywhere in the mesh (OpenAI-style).", "inference",
                                    responses={200: V1_MODELS}),
    **{("POST", path): RouteDoc(
        f"OpenAI-style {what}, forwarded to a healthy service of the model and streamed back.", "inference",
        request=INFERENCE_BODY, responses={200: {"type": "object"}, **_errors(404, 502)}, streams=True,
        other_answers="the engine's own answer, passed on as it came")
       for path, what in (("/v1/chat/completions", "chat completion"), ("/v1/completions", "completion"),
                          ("/v1/embeddings", "embeddings"))},
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

_PARAMS = {
    "<model:name>": ("name", "a model's name: `name` or `owner/name`"),
    "<device:device>": ("device", "a device: `node:disk`, `node:dram` or `node:gpuN`"),
    "<tid>": ("tid", "a transfer's id"),
    "<jid>": ("jid", "a job's id"),
    "<node>": ("node", "a node's id"),
}


def _openapi_path(rule: str) -> tuple[str, list[dict[str, Any]]]:
    path, params = rule, []
    for token, (name, description) in _PARAMS.items():
        if token in path:
            path = path.replace(token, "{" + name + "}")
            params.append({"name": name, "in": "path", "required": True, "description": description,
                           "schema": {"type": "string"}})
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
                422: "a pipeline with problems: every one listed", 424: "the engine's program is missing",
                429: "too many", 500: "the node's fault: see its log", 501: "not supported by that node",
                502: "a peer or an engine failed", 503: "not now"}
_COMMON_ERRORS: dict[int, Schema] = {400: ERROR, 401: ERROR, 405: ERROR, 413: ERROR, 500: ERROR, 503: ERROR}
