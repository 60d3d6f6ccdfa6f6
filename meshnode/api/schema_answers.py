"""What the API answers, as JSON Schema: nodes, models, transfers, services,
jobs, the v2 catalog (the answers of ``schemas.ROUTE_DOCS``)."""

from __future__ import annotations

from protocol.jobs import ActionStatus, JobStatus, PartStatus
from protocol.replicas import EVERY_NODE, LABEL_CHARS, LABELS_MAX, REPLICAS_MAX
from protocol.replicas import TIERS as REPLICA_TIERS
from protocol.serving import (
    ServiceState,
)
from protocol.transfer import TransferStatus

from .schema_common import (
    BOOL,
    ERROR_VALUE,
    INT,
    MODEL_NAME,
    NAMES,
    NUM,
    STR,
    USAGE,
    Schema,
    array,
    coded,
    desc,
    map_of,
    nullable,
    obj,
    states,
)

# -- answers -----------------------------------------------------------------------------------

PROBE = obj({"status": STR, "node_id": STR, "generation": INT})

GPU = obj(
    {"index": INT, "uuid": STR, "name": STR, "total_bytes": INT, "used_bytes": INT, "free_bytes": INT},
    {"util_pct": nullable(INT), "mem_util_pct": nullable(INT), "temperature_c": nullable(INT), "power_mw": nullable(INT),
     "power_limit_mw": nullable(INT), "processes": array(desc("[pid, used_bytes]", array(nullable(INT)))),
     "processes_total": INT},
)

NODE = obj({
    "node_id": STR, "address": STR, "state": desc("alive, suspect, dead or left", STR), "generation": INT,
    "incarnation": INT, "last_change_s": NUM, "storage": desc("its storage record, as it gossips it", {"type": "object"}),
    "gpus": array(GPU),
    "gpu_status": nullable(obj({}, {"source": STR, "read_ms": INT, "stale": BOOL, "error": nullable(STR)})),
    "models": NAMES, "labels": desc("its --labels", {"type": "object", "additionalProperties": STR}), "self": BOOL,
})

STATUS = obj({
    "node_id": STR, "cluster": STR,
    "nodes": desc("nodes by state, and the total", {**map_of(INT), "required": ["total"]}),
    "models": obj({"total": INT, "replicated": INT, "single_node": INT}),
    "storage": desc("per tier, the sums over every node", map_of(USAGE)),
    "jobs": desc("jobs by status, and the total", {**map_of(INT), "required": ["total"]}),
    "services": desc("services by state, and the total", {**map_of(INT), "required": ["total"]}),
})

STORAGE = obj({
    "node_id": STR,
    "devices": desc("disk, dram, gpu0..gpuN", map_of(USAGE)),
    "copies": array(obj({"model_name": STR, "device": STR, "manifest_hash": STR, "size": INT,
                         "last_used_ms": desc("its last read (a peer, a serve, a local copy): eviction's order", INT)})),
})

# A transfer, the same shape from whichever node answers: the node that runs it reads its
# live state (``Transfer.public``), the others its catalog record (``XferRecord``).
TRANSFER = obj(
    {"transfer_id": STR, "node_id": STR, "target_device": STR, "model_name": STR,
     "model": desc("the same as model_name (kept for older clients)", STR), "kind": STR,
     "manifest_hash": nullable(STR), "status": states(TransferStatus), "bytes_done": INT, "bytes_total": INT, "rate_bps": NUM,
     "sources": NAMES, "error": ERROR_VALUE, "started_ms": INT, "finished_ms": INT, "note": STR,
     "files_done": INT, "files_total": INT, "source_id": nullable(STR),
     "claim": nullable(desc("[wall_ms, logical, node_id]", {"type": "array"})),
     "chunks_total": INT, "chunks_fetched": INT, "chunks_resumed": INT,
     "source": desc("node:device, file:///path, or a URL without user info or query; null: any holder", nullable(STR)),
     "options": {"type": "object"}, "keep_source": BOOL, "bad_chunks": INT, "banned": NAMES,
     "fetched": nullable({"type": "object"})},
)

_REPLICA_COUNT = {"type": "integer", "minimum": EVERY_NODE, "maximum": REPLICAS_MAX}
# A label's key or value (``protocol.replicas``): 1 to 63 of LABEL_CHARS ('-' sorts first: a literal).
_LABEL: Schema = {"type": "string", "pattern": "^[" + "".join(sorted(LABEL_CHARS)) + "]{1,63}$",
                  "description": "1 to 63 letters, digits, '-', '_' or '.'"}


def _when_min(value: int, then: Schema) -> Schema:
    """``then`` holds of a policy whose min is ``value``."""
    return {"if": {"required": ["min"], "properties": {"min": {"const": value}}}, "then": then}


POLICY_BODY = coded("INVALID_POLICY", obj({}, {
    "min": desc("at least this many copies; -1: on every eligible node (default 1)", _REPLICA_COUNT),
    "max": desc("at most this many, at least min; -1: every eligible node (default: min)",
                 {**_REPLICA_COUNT, "not": {"const": 0}}),
    "tier": desc("where the copies live (default disk)", {"enum": list(REPLICA_TIERS)}),
    "labels": nullable(desc("only on nodes with every one of these --labels",
                          {"type": "object", "propertyNames": _LABEL, "additionalProperties": _LABEL,
                           "maxProperties": LABELS_MAX})),
    "spread": nullable(desc("a label whose values the copies are spread over, e.g. zone", _LABEL)),
}, closed=True, description="min is at most max unless max is -1 (else 400 INVALID_POLICY)",
    allOf=[_when_min(EVERY_NODE, {"properties": {"max": {"const": EVERY_NODE}}}),  # every node: max too
           _when_min(0, {"required": ["max"]})]))  # max defaults to min, and 0 is no max
REPLICAS = nullable(obj({
    "policy": POLICY_BODY, "wanted": obj({"min": INT, "max": INT}),
    "actual": desc("complete copies on the policy's tier on nodes that are up and carry its labels", INT),
    "outside": desc("complete copies on nodes up outside the labels: no replicas, dropped once min is met", INT),
    "spread": nullable(obj({"label": STR, "covered": INT, "target": INT},
                         description="values of the spread label the copies cover, of those they should")),
    "counted": desc("copies the rule counts: up, being made, or down for less than the grace", INT),
    "lost": desc("copies on nodes down for longer than the grace", INT),
    "copying_to": NAMES, "next": obj({"add": NAMES, "drop": NAMES}),
    "short": nullable(desc("why the mesh cannot hold min copies, when it cannot", STR)),
}))

_MODEL_SERVICE = obj({"node": STR, "port": INT, "device": STR, "engine": STR, "state": states(ServiceState)})
_MODEL_SHORT = {"model_name": STR, "model_type": nullable(STR), "size": nullable(INT), "locations": NAMES,
                "services": array(_MODEL_SERVICE), "status": desc("registered, available or unavailable", STR)}
_MODEL_FULL = {
    "replicas": desc("its replica policy, wanted and actual copies; null: not pinned", REPLICAS),
    "source_url": nullable(STR), "metadata": {"type": "object"}, "registered_by": STR, "registered_at_ms": INT,
    "copies": array(obj({"device": STR, "manifest_hash": STR, "size": INT, "status": STR, "online": BOOL})),
}


def model_schema(full: bool = False, **extra: Schema) -> Schema:
    """A model as ``Views.model_json`` shows it (``full``: with its registration and copies)."""
    return obj({**_MODEL_SHORT, **(_MODEL_FULL if full else {}), **extra})


SERVICE = obj({
    "model_name": STR, "node": STR, "port": INT, "engine": STR, "gpus": array(INT), "state": states(ServiceState),
    "pid": nullable(INT), "started_ms": INT, "restarts": INT, "vram_bytes": INT, "job_id": nullable(STR),
    "error": nullable(STR), "log_tail": nullable(STR), "health_path": STR, "device": STR, "url": nullable(STR),
    "node_state": desc("its node's: alive, suspect, dead, left or unknown", STR),
})

_PART = obj({"node": nullable(STR), "device": nullable(STR), "status": states(PartStatus, nullable(STR)), "attempt": INT,
              "transfer_id": nullable(STR), "bytes_done": INT, "bytes_total": INT, "note": STR, "error": ERROR_VALUE})
_STEP_SHORT = {"action_id": STR, "status": states(ActionStatus), "attempts": INT, "error": ERROR_VALUE}
_STEP = obj({**_STEP_SHORT, "action_type": STR, "model_name": nullable(STR), "devices": NAMES,
              "dependencies": NAMES, "started_ms": nullable(INT), "finished_ms": nullable(INT), "parts": array(_PART)})
_JOB_ERROR = nullable(obj({"action_id": STR, "code": STR, "message": STR}))
_JOB_SHORT = {"job_id": STR, "name": STR, "status": states(JobStatus),
              "progress": obj({"completed": INT, "total": INT}), "error": _JOB_ERROR, "coordinator": nullable(STR)}


def job_schema(**extra: Schema) -> Schema:
    """A job as ``Jobs.job_json`` shows it."""
    return obj({**_JOB_SHORT, "description": STR, "submitted_by": STR, "submitted_ms": INT,
                 "finished_ms": nullable(INT), "fail_fast": BOOL, "priority": INT, "cancelled": BOOL,
                 "actions": array(_STEP), **extra})


JOB_STATUS = obj({**_JOB_SHORT, "actions": array(obj(_STEP_SHORT))})
JOB_TAKEN = job_schema(held_by=desc("the nodes that hold the job already, this one first", NAMES))

PLACEMENT = obj({
    "model_name": STR, "device": STR, "needs_bytes": INT, "chosen": nullable(STR),
    "ranking": array(obj({"node_id": STR, "device": nullable(STR), "fits": BOOL, "holds_model": BOOL,
                          "room_bytes": INT, "reasons": NAMES})),
})

POOL = obj({"pool_id": desc("pool-gpuN: one per GPU", STR), "gpu": INT,
             "ready": desc("a healthy engine serves from this GPU", BOOL), "models": NAMES, "engines": NAMES})
AVAILABILITY = obj({
    "nodes": map_of(obj({"node_id": STR, "address": STR, "online": BOOL, "models": NAMES, "pools": array(POOL)})),
    "total_models": INT, "replicated_models": NAMES, "single_node_models": NAMES,
})
NODE_V2 = obj({
    "node_id": STR, "address": STR, "online": BOOL, "pools": array(POOL),
    "capabilities": obj({"gpus": array(obj({"index": INT, "uuid": STR, "name": STR, "vram_total_bytes": INT,
                                              "vram_free_bytes": INT})),
                          "labels": {"type": "object", "additionalProperties": STR}}),
})

_DIGEST = {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}
CATALOG_MODEL = obj({
    "id": STR,
    "digest": desc("the sha256 digest every copy that computed one agrees on; null: none yet, or they differ",
                    nullable(STR)),
    "expected_digest": desc("the digest the registration asks for", nullable(STR)),
    "verified": desc("every computed digest is the expected one; null: nothing to compare", nullable(BOOL)),
    "conflict": desc("two copies have different digests", BOOL),
    "copies": array(obj({"device": STR, "digest": nullable(STR), "online": BOOL})),
    "size": nullable(INT), "source_url": nullable(STR), "state": STR,
})
CATALOG_BODY = obj({"id": desc("the model's name", MODEL_NAME)}, {
    "digest": nullable(desc("sha256:<hex>: the digest its copies must have", _DIGEST)),
    "source_url": nullable({"type": "string", "maxLength": 2048}),
}, closed=True)

V1_MODEL = obj({"id": STR, "object": STR, "owned_by": STR})
V1_MODELS = obj({"object": STR, "data": array(V1_MODEL)})

LOCATION_DROPPED = obj({"model_name": STR, "device": STR, "dropped": {"const": True}},
                        {"deleted_copy": {"const": True}})
UNREGISTERED = obj({"model_name": STR, "unregistered": {"const": True}, "purged_locations": NAMES},
                    {"deleted_copies": NAMES, "pending_copies": array(obj({"device": STR, "reason": STR}))})

OPENAPI = obj({"openapi": STR, "info": {"type": "object"}, "paths": {"type": "object"}})
TEXT: Schema = STR
