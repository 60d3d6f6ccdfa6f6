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

The schemas themselves live beside it: ``schema_common`` (building blocks,
names and devices as patterns), ``schema_answers`` (what routes answer),
``schema_bodies`` (what they take).  This module holds the routes' table and
builds the document; it re-exports the schemas other modules and tests read.
"""

from __future__ import annotations

import copy
from typing import Any

from protocol.bundle import MODELS_MAX as BUNDLE_MODELS_MAX

from .schema_answers import (
    AVAILABILITY,
    CATALOG_BODY,
    CATALOG_MODEL,
    JOB_STATUS,
    JOB_TAKEN,
    LOCATION_DROPPED,
    NODE,
    NODE_V2,
    OPENAPI,
    PLACEMENT,
    POLICY_BODY,
    PROBE,
    SERVICE,
    STATUS,
    STORAGE,
    TEXT,
    TRANSFER,
    UNREGISTERED,
    V1_MODEL,
    V1_MODELS,
    job_schema,
    model_schema,
)
from .schema_bodies import (
    BUNDLE_IMPORTED,
    COPY_BODY,
    DOWNLOAD_BODY,
    ENSURE_BODY,
    ENSURED,
    ENSURING,
    GSWARM_SERVE_BODY,
    HOLDER,
    INFERENCE_BODY,
    LEASE,
    MOVE_BODY,
    PIPELINE,
    REGISTER_BODY,
    SERVE_BODY,
    SOURCE_URL,
    STEP_DEVICE,
)
from .schema_common import (
    BOOL,
    DEVICE,
    ERROR,
    ERROR_CODE,
    GPU_DEVICE,
    GSWARM_GPU,
    JOB_ID,
    KIND_CHARS_MAX,
    MODEL_NAME,
    NAMES,
    NODE_ID,
    PAGE_QUERY,
    STORE_DEVICE,
    STR,
    TRANSFER_ID,
    RouteDoc,
    Schema,
    array,
    desc,
    error_answers,
    obj,
    paged,
    written,
)

__all__ = [
    "DEVICE", "ERROR", "ERROR_CODE", "GPU_DEVICE", "GSWARM_GPU", "JOB_ID", "KIND_CHARS_MAX",
    "MODEL_NAME", "NODE_ID", "PIPELINE", "POLICY_BODY", "ROUTE_DOCS", "SOURCE_URL", "STEP_DEVICE",
    "STORE_DEVICE", "TAGS", "RouteDoc", "Schema", "openapi_document",
]

# -- the routes --------------------------------------------------------------------------------

_COPY_ERRORS = error_answers(404, 409, 502)  # no model, node or copy; a node not reachable; its peer failed
_SERVE_ERRORS = error_answers(403, 404, 409, 424, 501, 502)

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
                                responses={200: paged("nodes", NODE)}, query=PAGE_QUERY),
    ("GET", "/storage"): RouteDoc("This node's devices (total, used, free) and the copies it holds.", "nodes",
                                  responses={200: STORAGE}),
    ("GET", "/v2/catalog/availability"): RouteDoc(
        "llama-orch's view: per node online, models and pools; replicated and single-node models.", "nodes",
        responses={200: AVAILABILITY}),
    ("GET", "/v2/catalog/models"): RouteDoc(
        "llama-orch's catalog: each model's id and sha256 digest, per copy, and whether they agree with the "
        "registration's.", "models", responses={200: paged("models", CATALOG_MODEL)}, query=PAGE_QUERY),
    ("GET", "/v2/catalog/models/<model:name>"): RouteDoc(
        "One model in llama-orch's catalog shape.", "models", responses={200: CATALOG_MODEL, **error_answers(404)}),
    ("POST", "/v2/catalog/models"): RouteDoc(
        "Add a model to the catalog (llama-orch's): a registration, with the digest its copies must have.",
        "models", request=CATALOG_BODY, responses={code: written(CATALOG_MODEL) for code in (200, 201)}),
    ("GET", "/v2/nodes"): RouteDoc(
        "llama-orch's nodes: each node online or not, its pools (one per GPU) and its GPUs.", "nodes",
        responses={200: paged("nodes", NODE_V2)}, query=PAGE_QUERY),
    # -- models
    ("GET", "/models"): RouteDoc("Registered models with their locations and status.", "models",
                                 responses={200: paged("models", model_schema())}, query=PAGE_QUERY),
    ("GET", "/models/<model:name>"): RouteDoc("One model: its registration, locations, copies and services.",
                                              "models", responses={200: model_schema(full=True), **error_answers(404)}),
    ("POST", "/models/<model:name>/register"): RouteDoc(
        "Register a model (201), or replace its registration (200, with what changed).", "models",
        request=REGISTER_BODY,
        responses={code: written(model_schema(full=True, registered={"const": True}, replaced=BOOL, changed=NAMES))
                   for code in (200, 201)}),
    ("DELETE", "/models/<model:name>"): RouteDoc(
        "Unregister a model (with purge=true every copy is deleted too); with device=node:device, free that "
        "device only.", "models",
        responses={200: written({"anyOf": [UNREGISTERED, LOCATION_DROPPED]}), **_COPY_ERRORS},
        query={"purge": desc("1, true or yes (any case): delete every copy too; any other value: do not", STR),
               "device": desc("free this device only (node:device); the model stays registered", DEVICE)}),
    ("POST", "/models/<model:name>/pin"): RouteDoc(
        "Pin a model: the mesh keeps between min and max copies of it, on the tier and nodes the policy names, "
        "and heals itself when a holder is lost.", "models",
        request=POLICY_BODY, responses={200: written(model_schema(full=True)), **error_answers(404)}),
    ("DELETE", "/models/<model:name>/pin"): RouteDoc(
        "Unpin a model: its copies stay where they are; the mesh no longer adds or drops any.", "models",
        responses={200: written(model_schema(full=True)), **error_answers(404)}),
    # -- copies and where they live
    ("POST", "/models/<model:name>/copy"): RouteDoc(
        "Copy a model to a device, across nodes or between one node's tiers: a transfer.", "copies",
        request=COPY_BODY, responses={202: written(TRANSFER), **_COPY_ERRORS}),
    ("POST", "/models/<model:name>/move"): RouteDoc(
        "Move a model's copy to another device: a transfer, then the source is deleted.", "copies",
        request=MOVE_BODY, responses={202: written(TRANSFER), **_COPY_ERRORS}),
    ("POST", "/models/<model:name>/download"): RouteDoc(
        "Fetch a model onto a device from the hub, a URL, a file on the target node or another node: a transfer.",
        "copies", request=DOWNLOAD_BODY, responses={202: written(TRANSFER), **_COPY_ERRORS, **error_answers(403)}),
    ("GET", "/transfers"): RouteDoc("Every transfer the mesh knows: status, bytes, rate, sources, error.", "copies",
                                    responses={200: paged("transfers", TRANSFER)}, query=PAGE_QUERY),
    ("GET", "/transfers/<tid>"): RouteDoc("One transfer.", "copies", responses={200: TRANSFER, **error_answers(404)}),
    ("DELETE", "/transfers/<tid>"): RouteDoc(
        "Cancel a transfer, through any node (the node that runs it stops it): it fails CANCELLED, its "
        "partial files removed (202: still being removed).",
        "copies", responses={code: written({**TRANSFER, "properties": {**TRANSFER["properties"], "cancelled": BOOL}})
                             for code in (200, 202)} | error_answers(404, 409, 421)),
    ("GET", "/models/<model:name>/locations"): RouteDoc(
        "Where a model's copies live.", "copies",
        responses={200: obj({"model_name": STR, "locations": NAMES}), **error_answers(404)}),
    ("POST", "/models/<model:name>/locations/<device:device>"): RouteDoc(
        "Record by hand that a device holds a model.", "copies",
        responses={201: written(obj({"model_name": STR, "device": STR, "recorded": {"const": True}})),
                   **error_answers(404)}),
    ("DELETE", "/models/<model:name>/locations/<device:device>"): RouteDoc(
        "Free one device: delete the copy there, or drop a location recorded by hand.", "copies",
        responses={200: written(LOCATION_DROPPED), **_COPY_ERRORS}),
    # -- pipelines
    ("POST", "/jobs"): RouteDoc(
        "Run a pipeline (JSON): 202 with the job; 422 INVALID_PIPELINE with every problem.", "jobs",
        request=PIPELINE, responses={202: written(JOB_TAKEN), **error_answers(409, 422, 429)}, checked=False),
    ("POST", "/jobs/from-yaml"): RouteDoc(
        "Run a pipeline sent as YAML (the raw body, or a file of a multipart form).", "jobs",
        request=desc("a pipeline as POST /jobs takes it, written in YAML (JSON is YAML too); no anchors or aliases",
                      PIPELINE), content_type="application/yaml",
        responses={202: written(JOB_TAKEN), **error_answers(409, 422, 429)}),
    ("POST", "/jobs/<jid>/create"): RouteDoc(
        "gswarm's form: run a pipeline (JSON) under the caller's own job id; 409 JOB_ID_TAKEN when the mesh has "
        "one.", "jobs", request=PIPELINE, responses={202: written(JOB_TAKEN), **error_answers(409, 422, 429)},
        checked=False),
    ("GET", "/jobs"): RouteDoc("Every job the mesh knows, newest first, with each step's status.", "jobs",
                               responses={200: paged("jobs", job_schema())}, query=PAGE_QUERY),
    ("GET", "/jobs/<jid>"): RouteDoc("One job: each step's status, attempts, timings, progress, error.", "jobs",
                                     responses={200: job_schema(), **error_answers(404)}),
    ("GET", "/jobs/<jid>/status"): RouteDoc("A job's short status (gswarm's).", "jobs",
                                            responses={200: JOB_STATUS, **error_answers(404)}),
    ("POST", "/jobs/<jid>/cancel"): RouteDoc("Cancel a job: running steps stop, the rest are cancelled.", "jobs",
                                             responses={200: written(job_schema()), **error_answers(404)}),
    ("GET", "/placement"): RouteDoc(
        "Where a step that names no node would run: every node ranked, with why it does not fit.", "jobs",
        responses={200: PLACEMENT, **error_answers(404)},
        query={"model": desc("the model's name", MODEL_NAME),
               "device": desc("the tier (default disk)", {"type": "string", "enum": ["disk", "dram", "gpu"]})},
        required_query=("model",)),
    # -- services
    ("GET", "/services"): RouteDoc("Every engine the mesh runs: model, node, device, port, state, url, error.",
                                   "services", responses={200: paged("services", SERVICE)}, query=PAGE_QUERY),
    ("GET", "/models/<model:name>/services"): RouteDoc(
        "A model's engines, wherever they run.", "services",
        responses={200: paged("services", SERVICE, model_name=STR), **error_answers(404)}, query=PAGE_QUERY),
    ("POST", "/models/<model:name>/services"): RouteDoc(
        "Serve a model on GPUs of one node: 202 with the service, starting.", "services",
        request=SERVE_BODY, responses={202: written({"anyOf": [SERVICE, obj({"model_name": STR, "services": array(
            SERVICE)})]}), **_SERVE_ERRORS}),
    ("POST", "/models/<model:name>/serve"): RouteDoc(
        "gswarm's serve: a model on one GPU (of this node, or node:gpuN): 202 with the service, starting.",
        "services", request=GSWARM_SERVE_BODY, responses={202: written(SERVICE), **_SERVE_ERRORS}),
    ("DELETE", "/models/<model:name>/serve"): RouteDoc(
        "gswarm's stop: every engine of a model, wherever it runs.", "services",
        responses={200: written(obj({"model_name": STR, "stopped": array(SERVICE)})), **_COPY_ERRORS}),
    ("GET", "/models/<model:name>/serve/status"): RouteDoc(
        "gswarm's serve status: whether a model is served healthy, and its engines.", "services",
        responses={200: obj({"model_name": STR, "serving": BOOL, "services": array(SERVICE)}), **error_answers(404)}),
    ("DELETE", "/models/<model:name>/services/<node>"): RouteDoc(
        "Stop that node's engines of a model (on one port, with port=).", "services",
        responses={200: written(obj({"stopped": array(SERVICE)})), **_COPY_ERRORS},
        query={"port": {"type": "integer", "minimum": 1, "maximum": 65535}}),
    # -- inference through any node
    ("GET", "/v1/models"): RouteDoc("The models served healthy anywhere in the mesh (OpenAI-style).", "inference",
                                    responses={200: V1_MODELS}),
    ("GET", "/v1/models/<model:name>"): RouteDoc(
        "One model served healthy somewhere (the OpenAI SDK's models.retrieve).", "inference",
        responses={200: V1_MODEL, **error_answers(404)}),
    **{("POST", path): RouteDoc(
        f"OpenAI-style {what}, forwarded to a healthy service of the model and streamed back.", "inference",
        request=INFERENCE_BODY, responses={200: {"type": "object"}, **error_answers(404, 502)}, streams=True,
        other_answers="the engine's own answer, passed on as it came")
       for path, what in (("/v1/chat/completions", "chat completion"), ("/v1/completions", "completion"),
                          ("/v1/embeddings", "embeddings"))},
    # -- bundles, ensure and leases (meshnode/api/bundles.py)
    ("GET", "/bundles"): RouteDoc(
        "Export models as one bundle (a tar stream: manifests, registrations, files, sha256s), from this node's copy "
        "or the nearest holder's.",
        "copies", responses={200: desc("the bundle (protocol/bundle.py)", {"type": "string", "format": "binary"}),
                             **error_answers(404, 409)},
        query={"model": desc(f"a model to bundle; repeat it for several (model=A&model=B), at most "
                              f"{BUNDLE_MODELS_MAX}", MODEL_NAME)},
        required_query=("model",), response_type="application/x-tar"),
    ("POST", "/bundles"): RouteDoc(
        "Import a bundle (the body, streamed) into a tier of this node: verified as it lands, registered, its copies "
        "gossiped.", "copies",
        request=desc("a bundle, as GET /bundles gives it, streamed. Every chunk and file is verified as it lands: "
                      "422 BAD_CONTENT, nothing kept; 422 INCOMPLETE, cut short, its verified chunks kept for the "
                      "next try; 409 CONTENT_CONFLICT when the mesh knows other bytes for a model; 421 names the "
                      "node to ask for another node's device. Sent as application/octet-stream or "
                      "application/x-tar", {"type": "string", "format": "binary"}),
        content_type="application/octet-stream",
        responses={code: written(BUNDLE_IMPORTED) for code in (200, 201)} | error_answers(404, 409, 422, 507),
        query={"to": desc("this node's device the copies go to", STORE_DEVICE),
               "check": desc("true: the body is the bundle's header entry alone; answer what an import would "
                              "refuse, write nothing", {"type": "string", "enum": ["true", "false"]})},
        required_query=("to",)),
    ("POST", "/ensure"): RouteDoc(
        "A verified copy on this node's device: 200, its path and a lease against eviction; or 202, the transfer "
        "making it; 404 NO_SOURCE when nothing can.", "copies",
        request=ENSURE_BODY, responses={200: written(ENSURED), 202: written(ENSURING), **error_answers(404, 409, 507)}),
    ("GET", "/leases"): RouteDoc("The leases this node's ensure handed out that have not ended.", "copies",
                                 responses={200: obj({"node_id": STR, "leases": array(LEASE)})}),
    ("DELETE", "/leases"): RouteDoc(
        "Release a lease on a copy of this node (one holder's, or every holder's): it may be evicted again.",
        "copies", responses={200: written(obj({"model_name": STR, "device": STR, "released": NAMES,
                                                 "held_by": NAMES})), **error_answers(404)},
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
        content["text/event-stream"] = {"schema": desc("server-sent events, as the engine sends them", STR)}
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
