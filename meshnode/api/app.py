"""The Quart-trio application.

Public routes (INTERFACES.md) take and give JSON; every error is
``{"error": {"code", "message"}}`` with a fitting status.  They need an API
bearer token when the node has any.  ``/mesh/v1/msg`` takes one msgpack peer
message and the other ``/mesh/`` routes a peer's request, each signed with
the cluster secret when the node has one.  Credentials are compared in
constant time and never echoed or logged.  The app is given its parts
(``ApiParts``), not the node.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from quart import Response, g, request
from quart.routing import QuartRule
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException
from werkzeug.routing import BaseConverter, PathConverter

from protocol import LocalProtocolError, RemoteProtocolError
from protocol.actions import CancelTransfer, StartService, StopService
from protocol.causal import After
from protocol.errors import InvalidName
from protocol.names import RESERVED_SEGMENTS
from protocol.pipeline import parse_step_device
from protocol.view import ModelView

from .. import __version__
from ..actions import Router
from ..bundles import Bundles
from ..copies.catalog import CopyCatalog
from ..copies.store import Store
from ..copies.transfers import Transfers
from ..errors import MeshError
from ..gpus import GpuMonitor
from ..jobs import Jobs
from ..keeper import Keeper
from ..leases import Leases
from ..mesh import Mesh
from ..metrics import RouteLatency
from ..pipelines import DOC_BYTES_MAX, load_document
from ..proxy import INFER_PATHS, InferenceProxy
from ..registry import Registry
from ..serving import Services
from ..views import Views
from .auth import PeerAuthError, PeerGate, Refusals, check_bearer, request_target
from .bundles import BUNDLE_BODY_MAX, BUNDLES_PATH, StreamedBodies, add_bundle_routes
from .guard import ApiGuard
from .inference import InferenceFastPath
from .peer import DrainOrClose, PeerFastPath
from .schemas import ROUTE_DOCS, openapi_document
from .validate import body_problem

__all__ = ["ApiParts", "Running", "create_app"]

log = logging.getLogger("meshnode.api")

PUBLIC_BODY_MAX = 1024 * 1024
AFTER_HEADER = "X-Mesh-After"  # a request: answer once this write is seen here
TOKEN_HEADER = "X-Mesh-Token"  # a write's answer: its causality token
READ_AFTER_WAIT_S = 2.0
PAGE_DEFAULT = 1000  # items of a list a page holds unless ?limit= says fewer
PAGE_MAX = 1000
JOBS_PAGE_DEFAULT = 100
# Answered without a token: probes carry none, and the dashboard's page asks for one itself.
OPEN_PATHS = frozenset({"/health", "/ready", "/", "/docs", "/openapi.json"})
OPEN_PREFIX = "/ui/"


JSON_DEPTH_MAX = 32


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


def _gpu_devices(raw: Any) -> tuple[str, tuple[int, ...]]:
    """A serve's devices: GPUs of one named node (``node:gpu`` is ``node:gpu0``)."""
    if not isinstance(raw, list) or not 0 < len(raw) <= 64:
        raise MeshError("INVALID_DEVICE", "device (or devices): node:gpuN, the GPUs of one node")
    nodes, gpus = set(), set()
    for text in raw:
        try:
            d = parse_step_device(text)
        except InvalidName as e:
            raise MeshError("INVALID_DEVICE", str(e)) from None
        if d.node is None or d.tier != "gpu" or not d.kind[3:].isdigit():
            raise MeshError("INVALID_DEVICE", f"{str(text)[:80]!r}: a serve runs on node:gpuN")
        nodes.add(d.node)
        gpus.add(int(d.kind[3:]))
    if len(nodes) != 1:
        raise MeshError("INVALID_DEVICE", "one service runs on one node: its GPUs share a node")
    return nodes.pop(), tuple(sorted(gpus))


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), status=status, mimetype="application/json")


def _error(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> Response:
    return _json({"error": {"code": code, "message": message, **(details or {})}}, status)


def _remote() -> str:
    addr = request.remote_addr or "?"
    return str(addr)


class ModelNameConverter(PathConverter):
    """Everything up to the route's suffix, so that a bad name (``//x``,
    ``a/../b``) reaches the validator and gets a clear 400 instead of a
    redirect or a bare 404."""

    regex = ".+?"
    part_isolating = False


class DeviceConverter(BaseConverter):
    """A device segment that is not one of a model's sub-resources, so that
    ``/models/acme/locations/register`` is never read as the device
    ``register`` of the model ``acme``: it is the model ``acme/locations``
    (a name the validator refuses, its last segment being reserved)."""

    regex = "(?!(?:" + "|".join(sorted(RESERVED_SEGMENTS)) + ")(?:/|$))[^/]+"


class BareModelConverter(ModelNameConverter):
    """The model of ``/models/<model:name>`` alone: a path that ends in one
    of a model's sub-resources (``acme/m/register``, ``acme/m/services/n1``)
    belongs to that sub-resource's route, so a GET there is 405 with the
    methods that route takes, not the bad model name ``acme/m/register``."""

    regex = "(?:(?!/(?:" + "|".join(sorted(RESERVED_SEGMENTS)) + r")(?:/|\Z)).)+"


class JobIdConverter(BaseConverter):
    """A job id that is not ``from-yaml`` (``POST /jobs/from-yaml``'s path)."""

    regex = r"(?!from-yaml\Z)[^/]+"


class _Rule(QuartRule):
    """A route whose last variable could take a path another route owns gets
    a converter that leaves that path alone (``_OWNED``), so that a method a
    path does not take is 405 with exactly the methods it does take."""

    _OWNED: dict[tuple[str, str], type[BaseConverter]] = {
        ("/models/<model:name>", "name"): BareModelConverter,
        ("/jobs/<jid>", "jid"): JobIdConverter,
    }

    def get_converter(self, variable_name: str, converter_name: str, args: tuple[Any, ...],
                      kwargs: Mapping[str, Any]) -> BaseConverter:
        owned = self._OWNED.get((self.rule, variable_name))
        if owned is not None:
            return owned(self.map, *args, **kwargs)
        return super().get_converter(variable_name, converter_name, args, kwargs)


@dataclass
class Running:
    """The parts that exist once the node has joined the mesh."""

    mesh: Mesh
    registry: Registry
    views: Views
    router: Router
    transfers: Transfers
    copies: CopyCatalog
    jobs: Jobs
    gpus: GpuMonitor
    services: Services
    proxy: InferenceProxy
    keeper: Keeper
    bundles: Bundles | None = None  # export and import (meshnode/bundles.py)
    leases: Leases | None = None  # ensure, and its leases (meshnode/leases.py)


@dataclass
class ApiParts:
    """What the API uses.  ``running`` is set once the node has started (until
    then the routes answer 503 ``STARTING``, ``/health`` excepted)."""

    node_id: str
    api_tokens: tuple[str, ...]
    scheme: str
    store: Store
    peer_gate: PeerGate
    refusals: Refusals
    generation: Callable[[], int]
    metrics: Callable[[], tuple[bytes, str]]
    not_ready: Callable[[], str | None] = lambda: None  # why the node is not ready; None when it is
    latency: RouteLatency = field(default_factory=RouteLatency)
    guard: ApiGuard = field(default_factory=ApiGuard)  # Host, Origin, body types, write rate
    running: Running | None = None


def create_app(parts: ApiParts) -> DrainOrClose:
    """The ASGI app: the peer message fast path, then inference's own lean
    path (``inference.py``), in front of the public Quart app; in front of
    all of them the rule that every response drains or closes."""

    def receive(data: bytes, remote: str, signer: str | None) -> None:
        if parts.running is None:
            raise RemoteProtocolError("node is starting")
        parts.running.mesh.receive(data, remote, signer)

    public = StreamedBodies(_public_app(parts), frozenset({BUNDLES_PATH}))  # an import's body, read at its pace
    inference = InferenceFastPath(
        public, proxy=lambda: parts.running.proxy if parts.running is not None else None,
        api_tokens=parts.api_tokens, guard=parts.guard, gate=parts.peer_gate, refusals=parts.refusals,
        body_max=PUBLIC_BODY_MAX, observe=parts.latency.observe)
    return DrainOrClose(PeerFastPath(inference, parts.peer_gate, parts.refusals, receive))


def _public_app(parts: ApiParts) -> QuartTrio:
    app = QuartTrio("meshnode")
    app.url_rule_class = _Rule
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    app.url_map.converters["model"] = ModelNameConverter
    app.url_map.converters["device"] = DeviceConverter
    app.config["MAX_CONTENT_LENGTH"] = PUBLIC_BODY_MAX
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True

    def running() -> Running:
        if parts.running is None:
            raise MeshError("STARTING", "the node is still starting")
        return parts.running

    @app.before_request
    async def _start_clock() -> None:  # first, so that a refused request is timed too
        g.started = time.perf_counter()

    @app.before_request
    async def _guard() -> None:
        """Before the credential: an unknown Host (DNS rebinding), a cross-site
        write, a body type the route does not take (``protocol.httpguard``)."""
        parts.guard.check(request.method, request.path, request.headers, request.scheme, _remote())

    @app.after_request
    async def _observe(response: Response) -> Response:
        started = getattr(g, "started", None)
        if started is not None:
            rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
            parts.latency.observe(request.method, rule, time.perf_counter() - started)
        return response

    @app.before_request
    async def _auth() -> Response | None:
        path = request.path
        limit = BUNDLE_BODY_MAX if (request.method, path) == ("POST", BUNDLES_PATH) else PUBLIC_BODY_MAX
        if request.content_length is not None and request.content_length > limit:
            # Answer before reading the body, and close: the client learns why at once.
            r = _error(413, "TOO_LARGE", f"request body of {request.content_length} bytes is over the {limit} byte limit")
            r.headers["connection"] = "close"
            return r
        if path.startswith("/mesh/"):
            gate = parts.peer_gate
            try:
                cred = gate.precheck(request.scope["headers"])
                if cred is not None:
                    target = request_target(request.scope.get("raw_path") or path.encode(), request.scope.get("query_string", b""))
                    body = await request.get_data(cache=True)
                    assert isinstance(body, bytes)
                    gate.check(cred, request.method, target, body)
            except PeerAuthError as e:
                parts.refusals.note(_remote(), "a peer request", e)
                r = _error(401, "UNAUTHORIZED", e.reason)
                r.headers["connection"] = "close"
                r.headers.update(e.headers)  # a stale generation's: our current one, signed
                return r
            return None
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIX):
            return None
        if not check_bearer(request.headers.get("authorization"), parts.api_tokens):
            parts.refusals.note(_remote(), "an API request")
            return _error(401, "UNAUTHORIZED", "missing or wrong API token")
        return None

    @app.before_request
    async def _write_rate() -> None:
        """Once the token is known good: one write taken from its client's bucket (429 past it)."""
        parts.guard.limit(request.method, request.path, request.headers.get("authorization"), _remote())

    @app.before_request
    async def _read_after() -> None:
        """``X-Mesh-After: <token>``: answer only once this node has seen that
        write (``protocol.causal``), waiting at most READ_AFTER_WAIT_S."""
        text = request.headers.get(AFTER_HEADER)
        if text is None or request.path.startswith("/mesh/") or request.path in OPEN_PATHS:
            return
        try:
            after = After.parse(text)
        except LocalProtocolError as e:
            raise MeshError("INVALID_REQUEST", f"{AFTER_HEADER}: {e}") from None
        g.caught_up = await running().mesh.wait_seen(after, READ_AFTER_WAIT_S)

    @app.after_request
    async def _write_token(response: Response) -> Response:
        """Every write answers with its causality token (header and body), for the next read."""
        if parts.running is None or request.path.startswith("/mesh/"):
            return response
        if hasattr(g, "caught_up"):
            response.headers["X-Mesh-Caught-Up"] = "true" if g.caught_up else "false"
        if request.method in ("POST", "DELETE") and response.status_code < 300 and not request.path.startswith("/v1/"):
            # (an inference answer is the engine's, passed through untouched: never parsed here)
            token = parts.running.mesh.token()
            response.headers[TOKEN_HEADER] = token
            if response.mimetype == "application/json":
                body = json.loads(await response.get_data())
                if isinstance(body, dict):
                    body["mesh_token"] = token
                    response.set_data(json.dumps(body))
        return response

    @app.errorhandler(MeshError)
    async def _mesh_error(e: MeshError) -> Response:
        resp = _error(e.status, e.code, e.message, e.details)
        retry_s = e.details.get("retry_after_s")
        if isinstance(retry_s, int) and retry_s > 0:
            resp.headers["Retry-After"] = str(retry_s)  # RFC 9110: whole seconds
        return resp

    @app.errorhandler(LocalProtocolError)
    async def _local_error(e: LocalProtocolError) -> Response:
        # A value this node will not write or send (a bad name, too large, too deep).
        return _error(400, "INVALID_REQUEST", str(e)[:500])

    @app.errorhandler(HTTPException)
    async def _http_error(e: HTTPException) -> Response:
        code = (e.name or "error").upper().replace(" ", "_")
        resp = _error(e.code or 500, code, e.description or e.name or "error")
        allowed = getattr(e, "valid_methods", None)
        if e.code == 405 and allowed:  # what the route does take (RFC 9110)
            resp.headers["Allow"] = ", ".join(sorted(allowed))
        return resp

    @app.errorhandler(Exception)
    async def _internal(e: Exception) -> Response:
        log.exception("request %s %s failed", request.method, request.path)
        return _error(500, "INTERNAL", "internal error; see the node's log")

    async def body_json() -> Any:
        """The request's JSON body, parsed and checked once (the schema check, then the handler)."""
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

    # -- public routes -----------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok", "node_id": parts.node_id, "generation": parts.generation()})

    @app.get("/ready")
    async def ready() -> Response:
        """200 once the node listens and has tried every join seed; 503
        ``NOT_READY`` while it starts or leaves (a readiness probe)."""
        why = parts.not_ready()
        if why is not None:
            return _error(503, "NOT_READY", why)
        return _json({"status": "ready", "node_id": parts.node_id, "generation": parts.generation()})

    @app.get("/status")
    async def status() -> Response:
        r = running()
        out = r.views.status_json()
        counts: dict[str, int] = {}
        for v in r.jobs.views():
            counts[v.status.value] = counts.get(v.status.value, 0) + 1
        out["jobs"] = {"total": sum(counts.values()), **counts}
        svc: dict[str, int] = {}
        for s in r.services.records():
            svc[s.state.value] = svc.get(s.state.value, 0) + 1
        out["services"] = {"total": sum(svc.values()), **svc}
        return _json(out)

    @app.get("/nodes")
    async def nodes() -> Response:
        return _paged("nodes", running().views.nodes_json())

    @app.get("/storage")
    async def storage() -> Response:
        run = running()
        devices: dict[str, Any] = run.copies.storage()
        for kind, marks in run.copies.watermarks.items():
            if kind in devices:
                devices[kind] = {**devices[kind], "high": round(100 * marks.high), "low": round(100 * marks.low)}
        if run.gpus.current is not None:
            devices.update(run.gpus.current.storage_view())
        copies = [
            {"model_name": c.model, "device": f"{parts.node_id}:{c.kind}", "manifest_hash": c.manifest_hash,
             "size": c.manifest.total_bytes, "last_used_ms": int(1000 * parts.store.last_used(c.model, c.kind))}
            for c in parts.store.copies()
        ]
        for d in devices.values():  # gswarm's name for free space, beside ours
            if isinstance(d, dict) and "free" in d:
                d["available"] = d["free"]
        return _json({"node_id": parts.node_id, "devices": devices, "copies": copies})

    # -- copies and transfers ------------------------------------------------------

    def _started(out: dict[str, Any]) -> Response:
        """202 for a transfer under way, with where to follow it."""
        r = _json(out, 202)
        tid = out.get("transfer_id")
        if isinstance(tid, str) and tid:
            r.headers["Location"] = f"/transfers/{tid}"
        return r

    @app.post("/models/<model:name>/copy")
    async def copy_model(name: str) -> Response:
        return _started(await running().router.copy(name, await body_json(), move=False))

    @app.post("/models/<model:name>/move")
    async def move_model(name: str) -> Response:
        return _started(await running().router.copy(name, await body_json(), move=True))

    @app.post("/models/<model:name>/download")
    async def download_model(name: str) -> Response:
        r = running()
        r.registry.check_room(name)  # a download registers the model it fetches: refused now, not once fetched
        return _started(await r.router.download(name, await body_json()))

    @app.get("/transfers")
    async def transfers() -> Response:
        return _paged("transfers", running().transfers.transfers_json())

    @app.get("/transfers/<tid>")
    async def transfer(tid: str) -> Response:
        t = running().transfers.transfer_json(tid)
        if t is not None:
            return _json(t)
        raise MeshError("TRANSFER_NOT_FOUND", f"no transfer {tid[:40]!r} is known")

    @app.delete("/transfers/<tid>")
    async def cancel_transfer(tid: str) -> Response:
        r = running()
        node = r.transfers.runner_of(tid)  # any node answers: the one that runs it stops it
        out = await r.router.run_on(node, CancelTransfer(tid))
        ended = out.pop("ended", True)
        return _json(out, 200 if ended else 202)  # 202: still removing its partial files

    # -- pipelines -------------------------------------------------------------------

    def _job_created(jobs: Jobs, taken: tuple[Any, list[str]]) -> Response:
        out = jobs.job_json(taken[0])
        out["held_by"] = [parts.node_id, *taken[1]]  # on disk here, and seen by these peers
        r = _json(out, 202)
        r.headers["Location"] = f"/jobs/{out['job_id']}"
        return r

    @app.post("/jobs")
    async def submit_job() -> Response:
        data = await request.get_data(cache=True)
        if len(data) > DOC_BYTES_MAX:
            raise MeshError("TOO_LARGE", f"a pipeline is at most {DOC_BYTES_MAX} bytes; this one is {len(data)}")
        doc = await body_json()
        if doc is None:
            raise MeshError("INVALID_PIPELINE", "the request has no pipeline: POST it as JSON (or YAML to /jobs/from-yaml)")
        r = running()
        return _job_created(r.jobs, await r.jobs.submit(doc))

    @app.post("/jobs/<jid>/create")
    async def create_job(jid: str) -> Response:
        """gswarm's form: the pipeline under the caller's own job id (409 when taken)."""
        doc = await body_json()
        if doc is None:
            raise MeshError("INVALID_PIPELINE", "the request has no pipeline: POST it as JSON")
        r = running()
        return _job_created(r.jobs, await r.jobs.submit(doc, job_id=jid))

    @app.post("/jobs/from-yaml")
    async def submit_job_yaml() -> Response:
        if (request.mimetype or "").startswith("multipart/"):
            files = await request.files
            if not files:
                raise MeshError("INVALID_PIPELINE", "the form holds no file: send the YAML as a file field")
            data = next(iter(files.values())).read(DOC_BYTES_MAX + 1)
        else:
            data = await request.get_data(cache=True)
        assert isinstance(data, bytes)
        r = running()
        return _job_created(r.jobs, await r.jobs.submit(load_document(data)))

    def _page(default: int = PAGE_DEFAULT) -> tuple[int, int]:
        try:
            limit = int(request.args.get("limit", str(default)))
            offset = int(request.args.get("offset", "0"))
        except ValueError:
            raise MeshError("INVALID_REQUEST", "limit and offset are integers") from None
        if not 1 <= limit <= PAGE_MAX or offset < 0:
            raise MeshError("INVALID_REQUEST", f"limit is 1 to {PAGE_MAX}, offset 0 or more")
        return limit, offset

    def _paged(key: str, items: list[Any], default: int = PAGE_DEFAULT, **extra: Any) -> Response:
        """One page of a list, in the list's own stable order, with where it is."""
        limit, offset = _page(default)
        return _json({**extra, key: items[offset:offset + limit], "total_count": len(items), "limit": limit,
                      "offset": offset})

    @app.get("/jobs")
    async def jobs() -> Response:
        return _paged("jobs", running().jobs.jobs_json(), default=JOBS_PAGE_DEFAULT)

    @app.get("/jobs/<jid>")
    async def job(jid: str) -> Response:
        j = running().jobs
        return _json(j.job_json(j.view(jid)))

    @app.get("/jobs/<jid>/status")
    async def job_status(jid: str) -> Response:
        j = running().jobs
        full = j.job_json(j.view(jid))
        return _json({k: full[k] for k in ("job_id", "name", "status", "progress", "error", "coordinator")}
                     | {"actions": [{k: a[k] for k in ("action_id", "status", "attempts", "error")}
                                    for a in full["actions"]]})

    @app.post("/jobs/<jid>/cancel")
    async def cancel_job(jid: str) -> Response:
        j = running().jobs
        return _json(j.job_json(await j.cancel(jid)))

    @app.get("/placement")
    async def placement() -> Response:
        model = request.args.get("model")
        if not model:
            raise MeshError("INVALID_REQUEST", "give ?model=NAME (and &device=disk, dram or gpu)")
        return _json(running().jobs.placement(model, request.args.get("device", "disk")))

    # -- peer routes (the credential was checked above) ------------------------------

    @app.get("/mesh/v1/manifests/<mhash>")
    async def manifest(mhash: str) -> Response:
        c = parts.store.find(mhash)
        if c is None:
            raise MeshError("COPY_NOT_FOUND", "no such manifest here")
        return Response(c.manifest.encode(), status=200, content_type="application/msgpack")

    @app.get("/mesh/v1/seen")
    async def peer_seen() -> Response:
        """A peer asks whether we have its write (``X-Mesh-After``), to know
        that a job it took outlives it: we pull it now, waiting a little."""
        try:
            after = After.parse(request.headers.get(AFTER_HEADER, ""))
        except LocalProtocolError as e:
            raise MeshError("INVALID_REQUEST", f"{AFTER_HEADER}: {e}") from None
        return _json({"seen": await running().mesh.wait_seen(after, READ_AFTER_WAIT_S)})

    @app.post("/mesh/v1/actions")
    async def peer_action() -> Response:
        return _json(await running().router.handle_peer(await body_json()))

    # Inference (``/v1/...`` and the peer hop ``/mesh/v1/infer/...``) is answered by
    # ``InferenceFastPath`` in front of this app; the rules stay here for routing (a method
    # they do not take is 405) and for the route list and the OpenAPI document.
    def _inference_path() -> Response:
        raise MeshError("INTERNAL", "inference is answered in front of the app (meshnode/api/inference.py)")

    app.add_url_rule("/mesh/v1/infer/<int:port>/v1/<path:rest>", "peer_infer",
                     lambda port, rest: _inference_path(), methods=["POST"])

    # -- the registry ------------------------------------------------------------------

    @app.get("/models")
    async def models() -> Response:
        return _paged("models", running().views.models_json())

    @app.get("/models/<model:name>/locations")
    async def locations(name: str) -> Response:
        mv = running().registry.model(name)
        return _json({"model_name": mv.name, "locations": mv.locations})

    @app.post("/models/<model:name>/locations/<device:device>")
    async def add_location(name: str, device: str) -> Response:
        dev = await running().registry.set_location(name, device, True)
        return _json({"model_name": name, "device": dev, "recorded": True}, 201)

    @app.delete("/models/<model:name>/locations/<device:device>")
    async def drop_location(name: str, device: str) -> Response:
        return await _drop(name, device)

    async def _drop(name: str, device: str) -> Response:
        """Free one device: delete the copy there, or drop a location recorded by hand."""
        r = running()
        deleted = await r.router.delete_copy(name, device)
        if deleted is not None:
            return _json({"model_name": name, "device": deleted["device"], "dropped": True, "deleted_copy": True})
        dev = await r.registry.set_location(name, device, False)
        return _json({"model_name": name, "device": dev, "dropped": True})

    # -- inference through any node (OpenAI-style) --------------------------------------

    @app.get("/v1/models")
    async def v1_models() -> Response:
        return _json(running().proxy.models_json())

    @app.get("/v1/models/<model:name>")
    async def v1_model(name: str) -> Response:
        """The OpenAI SDK's ``models.retrieve``: one model served somewhere and healthy."""
        for m in running().proxy.models_json()["data"]:
            if m["id"] == name:
                return _json(m)
        raise MeshError("MODEL_NOT_FOUND", f"no healthy service of {name[:200]!r} in the mesh")

    for _path in INFER_PATHS:
        app.add_url_rule(_path, "v1_" + _path.rsplit("/", 1)[1], _inference_path, methods=["POST"])

    # -- services ----------------------------------------------------------------------

    @app.get("/services")
    async def services_all() -> Response:
        r = running()
        return _paged("services", [r.services.record_json(x) for x in r.services.records()])

    @app.get("/models/<model:name>/services")
    async def model_services(name: str) -> Response:
        r = running()
        mv = r.registry.model(name)
        items = [r.services.record_json(x) for x in r.services.records() if x.model == mv.name]
        return _paged("services", items, model_name=mv.name)

    @app.post("/models/<model:name>/services")
    async def serve_model(name: str) -> Response:
        r = running()
        mv = r.registry.model(name)
        body = await body_json()
        if not isinstance(body, dict):
            raise MeshError("INVALID_REQUEST", "the body is a JSON object")
        unknown = set(body) - {"device", "devices", "port", "config", "engine", "target_nodes"}
        if unknown:
            raise MeshError("INVALID_REQUEST", f"unknown fields: {', '.join(sorted(unknown))[:200]}")
        config, port = _serve_config(body)
        if "target_nodes" in body:  # gswarm's form: the nodes; each its freest GPU that fits
            return await _serve_on_nodes(mv, body["target_nodes"], port, config)
        node, gpus = _gpu_devices(body.get("devices") if "devices" in body else [body.get("device")])
        resp = _json(await r.router.run_on(node, StartService(mv.name, gpus, port, config)), 202)
        resp.headers["Location"] = f"/models/{mv.name}/services"
        return resp

    def _serve_config(body: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        config = body.get("config") or {}
        if not isinstance(config, dict):
            raise MeshError("INVALID_REQUEST", "config is an object")
        if "framework" in config:  # gswarm's name for the engine
            fw = config["framework"]
            config = {k: v for k, v in config.items() if k != "framework"}
            config["engine"] = {"llamacpp": "llama.cpp", "llama_cpp": "llama.cpp"}.get(fw, fw) \
                if isinstance(fw, str) else fw
        if "engine" in body:
            config = {**config, "engine": body["engine"]}
        port = body.get("port")
        if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536):
            raise MeshError("INVALID_REQUEST", "port: 1 to 65535")
        return config, port

    async def _serve_on_nodes(mv: ModelView, nodes: Any, port: int | None, config: dict[str, Any]) -> Response:
        r = running()
        if not isinstance(nodes, list) or not 0 < len(nodes) <= 64 or not all(isinstance(n, str) for n in nodes):
            raise MeshError("INVALID_REQUEST", "target_nodes: a list of 1 to 64 node ids")
        ranking = {c["node_id"]: c for c in r.jobs.placement(mv.name, "gpu")["ranking"]}
        started = []
        for node in dict.fromkeys(nodes):
            c = ranking.get(node)
            if c is None:
                raise MeshError("NODE_NOT_FOUND", f"no node {node[:64]!r} in the mesh")
            if not c["fits"] or not c.get("device"):
                raise MeshError("NO_CAPACITY", f"{node}: {'; '.join(c['reasons']) or 'no GPU fits'}")
            gpu = int(str(c["device"]).rsplit(":gpu", 1)[1])
            started.append(await r.router.run_on(node, StartService(mv.name, (gpu,), port, config)))
        resp = _json({"model_name": mv.name, "services": started}, 202)
        resp.headers["Location"] = f"/models/{mv.name}/services"
        return resp

    @app.post("/models/<model:name>/serve")
    async def serve_gswarm(name: str) -> Response:
        """gswarm's form: ``{"port", "device": "gpu0" (this node) or "node:gpu0", "config": {"framework"}}``."""
        r = running()
        mv = r.registry.model(name)
        body = await body_json()
        if not isinstance(body, dict):
            raise MeshError("INVALID_REQUEST", "the body is a JSON object")
        unknown = set(body) - {"device", "port", "config"}
        if unknown:
            raise MeshError("INVALID_REQUEST", f"unknown fields: {', '.join(sorted(unknown))[:200]}")
        device = body.get("device")
        if isinstance(device, str) and ":" not in device:
            device = f"{parts.node_id}:{device}"
        config, port = _serve_config(body)
        node, gpus = _gpu_devices([device])
        resp = _json(await r.router.run_on(node, StartService(mv.name, gpus, port, config)), 202)
        resp.headers["Location"] = f"/models/{mv.name}/serve/status"
        return resp

    @app.delete("/models/<model:name>/serve")
    async def stop_serve_gswarm(name: str) -> Response:
        """gswarm's form: stop every service of the model, wherever it runs."""
        r = running()
        mv = r.registry.model(name)
        nodes = sorted({s.node for s in r.services.records() if s.model == mv.name})
        if not nodes:
            raise MeshError("SERVICE_NOT_FOUND", f"no service of {mv.name!r} in the mesh")
        stopped: list[Any] = []
        for node in nodes:
            stopped += (await r.router.run_on(node, StopService(mv.name, None))).get("stopped") or []
        return _json({"model_name": mv.name, "stopped": stopped})

    @app.get("/models/<model:name>/serve/status")
    async def serve_status_gswarm(name: str) -> Response:
        """gswarm's form: whether the model is served, and each service."""
        r = running()
        mv = r.registry.model(name)
        svcs = [r.services.record_json(s) for s in r.services.records() if s.model == mv.name]
        return _json({"model_name": mv.name, "serving": any(s["state"] == "healthy" for s in svcs),
                      "services": svcs})

    @app.delete("/models/<model:name>/services/<node>")
    async def stop_serving(name: str, node: str) -> Response:
        r = running()
        mv = r.registry.model(name)
        port_text = request.args.get("port")
        if port_text is not None and not (port_text.isdigit() and 0 < int(port_text) < 65536):
            raise MeshError("INVALID_REQUEST", "port: 1 to 65535")
        return _json(await r.router.run_on(node, StopService(mv.name, int(port_text) if port_text else None)))

    def _model_full(mv: ModelView) -> dict[str, Any]:
        r = running()
        out = r.views.model_json(mv, full=True)
        out["replicas"] = r.keeper.status_json(mv)  # wanted and actual, when pinned
        return out

    @app.post("/models/<model:name>/register")
    async def register(name: str) -> Response:
        r = running()
        mv, changed = await r.registry.register(name, await body_json())  # acknowledged means durable
        out = _model_full(mv)
        out["registered"] = True
        # Registering again replaces the registration: say so, and what changed.
        out["replaced"] = changed is not None
        out["changed"] = changed or []
        return _json(out, 201 if changed is None else 200)

    @app.get("/models/<model:name>")
    async def model_info(name: str) -> Response:
        return _json(_model_full(running().registry.model(name)))

    @app.post("/models/<model:name>/pin")
    async def pin(name: str) -> Response:
        policy = await body_json()
        if policy is None:  # an empty POST once unpinned: a write nobody meant
            raise MeshError("INVALID_REQUEST", "the body is the replica policy, e.g. {\"min\": 2}; "
                                               f"to unpin, DELETE /models/{name[:200]}/pin")
        return _json(_model_full(await running().registry.pin(name, policy)))

    @app.delete("/models/<model:name>/pin")
    async def unpin(name: str) -> Response:
        return _json(_model_full(await running().registry.pin(name, None)))

    @app.delete("/models/<model:name>")
    async def unregister(name: str) -> Response:
        device = request.args.get("device")
        if device is not None:  # gswarm's "remove from one device": the model stays registered
            return await _drop(name, device)
        purge = request.args.get("purge", "false").lower() in ("1", "true", "yes")
        r = running()
        copies = [c.device for c in r.registry.model(name).copies]
        dropped = await r.registry.unregister(name, purge=purge)
        out: dict[str, Any] = {"model_name": name, "unregistered": True, "purged_locations": dropped}
        if purge:
            # The purge is in the catalog now, so a holder that is down deletes its copy when
            # it is back; the reachable ones are asked to delete theirs at once.
            deleted, pending = await r.router.purge_copies(name, copies)
            out["deleted_copies"], out["pending_copies"] = deleted, pending
        return _json(out)

    @app.get("/v2/catalog/availability")
    async def availability() -> Response:
        return _json(running().views.availability_json(parts.scheme))

    @app.get("/v2/catalog/models")
    async def catalog_models() -> Response:
        r = running()
        return _paged("models", [r.views.catalog_model_json(mv) for _, mv in sorted(r.registry.models().items())])

    @app.get("/v2/catalog/models/<model:name>")
    async def catalog_model(name: str) -> Response:
        r = running()
        return _json(r.views.catalog_model_json(r.registry.model(name)))

    @app.post("/v2/catalog/models")
    async def catalog_add() -> Response:
        """llama-orch's "add to the catalog": a registration with the digest its copies must have."""
        r = running()
        body = await body_json()
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise MeshError("INVALID_REQUEST", "body: {\"id\": model name, \"digest\": \"sha256:<hex>\", "
                                               "\"source_url\"}")
        existing = r.registry.find(body["id"])
        reg: dict[str, Any] = {} if existing is None else {
            "model_type": existing.model_type, "source_url": existing.source_url, "metadata": dict(existing.metadata)}
        if body.get("source_url") is not None:
            reg["source_url"] = body["source_url"]
        if body.get("digest") is not None:
            reg.setdefault("metadata", {})["digest"] = body["digest"]
        mv, changed = await r.registry.register(body["id"], reg)
        return _json(r.views.catalog_model_json(mv), 201 if changed is None else 200)

    @app.get("/v2/nodes")
    async def nodes_v2() -> Response:
        return _paged("nodes", running().views.nodes_v2_json(parts.scheme))

    @app.get("/metrics")
    async def metrics() -> Response:
        body, ctype = parts.metrics()
        return Response(body, status=200, content_type=ctype)

    # -- the API's description, and the dashboard (files shipped in the package) ------

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return _json(openapi_document(__version__))

    @app.get("/")
    async def dashboard() -> Response:
        return _page_file("index.html")

    @app.get("/docs")
    async def docs() -> Response:
        return _page_file("docs.html")

    @app.get("/ui/<file>")
    async def ui_file(file: str) -> Response:
        if file not in UI_FILES:
            raise MeshError("NOT_FOUND", f"no file {file[:40]!r} in the dashboard")
        return _page_file(file)

    def _part(name: str) -> Any:
        part = getattr(running(), name)
        if part is None:
            raise MeshError("NOT_SUPPORTED", f"this node runs no {name}")
        return part

    add_bundle_routes(app, lambda: _part("bundles"), lambda: _part("leases"), body_json)

    @app.before_request
    async def _check_body() -> None:
        """A JSON body is checked against its route's schema (the one
        /openapi.json shows) before the handler sees it."""
        rule = request.url_rule
        doc = ROUTE_DOCS.get((request.method, rule.rule)) if rule is not None else None
        if doc is None or doc.request is None or not doc.checked or doc.content_type != "application/json":
            return
        value = await body_json()
        if value is None:
            return
        problem = body_problem(request.method, rule.rule, value)  # type: ignore[union-attr]
        if problem is not None:
            raise MeshError("INVALID_REQUEST", problem)

    return app


UI_FILES = {"index.html": "text/html", "docs.html": "text/html", "app.js": "text/javascript",
            "docs.js": "text/javascript", "style.css": "text/css"}
# The dashboard's pages load only their own files and talk only to this node.
_CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"


@functools.lru_cache(maxsize=len(UI_FILES))
def _ui_bytes(file: str) -> bytes:
    return (importlib.resources.files("meshnode") / "dashboard" / file).read_bytes()


def _page_file(file: str) -> Response:
    r = Response(_ui_bytes(file), status=200, content_type=f"{UI_FILES[file]}; charset=utf-8")
    r.headers["content-security-policy"] = _CSP
    r.headers["x-content-type-options"] = "nosniff"
    r.headers["cache-control"] = "no-cache"
    return r
