"""The Quart-trio application.

Public routes (INTERFACES.md) take and give JSON; every error is
``{"error": {"code", "message"}}`` with a fitting status.  They need an API
bearer token when the node has any.  ``/mesh/v1/msg`` takes one msgpack peer
message and needs the cluster secret when the node has one.  Credentials are
compared in constant time and never echoed or logged.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from protocol import LocalProtocolError

from .. import actions
from ..errors import MeshError
from ..metrics import render_metrics
from ..service import MeshService
from .auth import PeerAuthError, check_bearer, request_target
from .peer import DrainOrClose, PeerFastPath

if TYPE_CHECKING:
    from ..node import MeshNode

__all__ = ["create_app"]

log = logging.getLogger("meshnode.api")

PUBLIC_BODY_MAX = 1024 * 1024


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


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), status=status, mimetype="application/json")


def _error(status: int, code: str, message: str) -> Response:
    return _json({"error": {"code": code, "message": message}}, status)


def _remote() -> str:
    addr = request.remote_addr or "?"
    return str(addr)


class ModelNameConverter(PathConverter):
    """Everything up to the route's suffix, so that a bad name (``//x``,
    ``a/../b``) reaches the validator and gets a clear 400 instead of a
    redirect or a bare 404."""

    regex = ".+?"
    part_isolating = False


def create_app(node: MeshNode) -> DrainOrClose:
    """The ASGI app: the peer fast path in front of the public Quart app, and
    in front of both the rule that every response drains or closes."""
    return DrainOrClose(PeerFastPath(_public_app(node), node))


def _public_app(node: MeshNode) -> QuartTrio:
    app = QuartTrio("meshnode")
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    app.url_map.converters["model"] = ModelNameConverter
    app.config["MAX_CONTENT_LENGTH"] = PUBLIC_BODY_MAX
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    cfg = node.cfg

    def svc() -> MeshService:
        if node.service is None:
            raise MeshError("STARTING", "the node is still starting")
        return node.service

    @app.before_request
    async def _auth() -> Response | None:
        path = request.path
        limit = PUBLIC_BODY_MAX
        if request.content_length is not None and request.content_length > limit:
            # Answer before reading the body, and close: the client learns why at once.
            r = _error(413, "TOO_LARGE", f"request body of {request.content_length} bytes is over the {limit} byte limit")
            r.headers["connection"] = "close"
            return r
        if path.startswith("/mesh/"):
            gate = node.peer_gate
            try:
                cred = gate.precheck(request.scope["headers"])
                if cred is not None:
                    target = request_target(request.scope.get("raw_path") or path.encode(), request.scope.get("query_string", b""))
                    body = await request.get_data(cache=True)
                    assert isinstance(body, bytes)
                    gate.check(cred, request.method, target, body)
            except PeerAuthError as e:
                node.note_refused(_remote(), "a peer request", e)
                r = _error(401, "UNAUTHORIZED", e.reason)
                r.headers["connection"] = "close"
                return r
            return None
        if path == "/health":
            return None
        if not check_bearer(request.headers.get("authorization"), cfg.secrets.api_tokens):
            node.note_refused(_remote(), "an API request")
            return _error(401, "UNAUTHORIZED", "missing or wrong API token")
        return None

    @app.errorhandler(MeshError)
    async def _mesh_error(e: MeshError) -> Response:
        return _error(e.status, e.code, e.message)

    @app.errorhandler(LocalProtocolError)
    async def _local_error(e: LocalProtocolError) -> Response:
        # A value this node will not write or send (a bad name, too large, too deep).
        return _error(400, "INVALID_REQUEST", str(e)[:500])

    @app.errorhandler(HTTPException)
    async def _http_error(e: HTTPException) -> Response:
        code = (e.name or "error").upper().replace(" ", "_")
        return _error(e.code or 500, code, e.description or e.name or "error")

    @app.errorhandler(Exception)
    async def _internal(e: Exception) -> Response:
        log.exception("request %s %s failed", request.method, request.path)
        return _error(500, "INTERNAL", "internal error; see the node's log")

    async def body_json() -> Any:
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
        return _json({"status": "ok", "node_id": cfg.node_id, "generation": node.generation})

    @app.get("/status")
    async def status() -> Response:
        return _json(svc().status_json())

    @app.get("/nodes")
    async def nodes() -> Response:
        import trio

        items = svc().nodes_json(trio.current_time())
        return _json({"nodes": items, "total_count": len(items)})

    @app.get("/storage")
    async def storage() -> Response:
        s = svc()
        devices = node.storage()
        copies = [
            {"model_name": c.model, "device": f"{s.node_id}:{c.kind}", "manifest_hash": c.manifest_hash,
             "size": c.manifest.total_bytes}
            for c in node.store.copies()
        ]
        return _json({"node_id": s.node_id, "devices": devices, "copies": copies})

    # -- copies and transfers ------------------------------------------------------

    @app.post("/models/<model:name>/copy")
    async def copy_model(name: str) -> Response:
        svc()
        return _json(await actions.request_copy(node, name, await body_json(), move=False), 202)

    @app.post("/models/<model:name>/move")
    async def move_model(name: str) -> Response:
        svc()
        return _json(await actions.request_copy(node, name, await body_json(), move=True), 202)

    @app.post("/models/<model:name>/download")
    async def download_model(name: str) -> Response:
        svc()
        return _json(await actions.request_download(node, name, await body_json()), 202)

    @app.get("/transfers")
    async def transfers() -> Response:
        svc()
        items = actions.transfers_json(node)
        return _json({"transfers": items, "total_count": len(items)})

    @app.get("/transfers/<tid>")
    async def transfer(tid: str) -> Response:
        svc()
        t = actions.transfer_json(node, tid)
        if t is not None:
            return _json(t)
        raise MeshError("TRANSFER_NOT_FOUND", f"no transfer {tid[:40]!r} is known")

    # -- peer routes (the cluster secret was checked above) ------------------------

    @app.get("/mesh/v1/manifests/<mhash>")
    async def manifest(mhash: str) -> Response:
        c = node.store.find(mhash)
        if c is None:
            raise MeshError("COPY_NOT_FOUND", "no such manifest here")
        return Response(c.manifest.encode(), status=200, content_type="application/msgpack")

    @app.post("/mesh/v1/actions")
    async def peer_action() -> Response:
        svc()
        return _json(await actions.handle_action(node, await body_json()))

    @app.get("/models")
    async def models() -> Response:
        s = svc()
        ms = [s.model_json(mv) for _, mv in sorted(s.models().items())]
        return _json({"models": ms, "total_count": len(ms)})

    @app.get("/models/<model:name>/locations")
    async def locations(name: str) -> Response:
        mv = svc().model(name)
        return _json({"model_name": mv.name, "locations": mv.locations})

    @app.post("/models/<model:name>/locations/<device>")
    async def add_location(name: str, device: str) -> Response:
        s = svc()
        dev, writes = s.set_location(name, device, True, node.clock())
        await node.commit(writes)
        return _json({"model_name": name, "device": dev, "recorded": True}, 201)

    @app.delete("/models/<model:name>/locations/<device>")
    async def drop_location(name: str, device: str) -> Response:
        s = svc()
        deleted = await actions.request_delete_copy(node, name, device)
        if deleted is not None:
            return _json({"model_name": name, "device": deleted["device"], "dropped": True, "deleted_copy": True})
        dev, writes = s.set_location(name, device, False, node.clock())
        await node.commit(writes)
        return _json({"model_name": name, "device": dev, "dropped": True})

    @app.post("/models/<model:name>/register")
    async def register(name: str) -> Response:
        s = svc()
        await node.commit(s.register(name, await body_json(), node.clock()))  # acknowledged means durable
        out = s.model_json(s.model(name), full=True)
        out["registered"] = True
        return _json(out, 201)

    @app.get("/models/<model:name>")
    async def model_info(name: str) -> Response:
        s = svc()
        return _json(s.model_json(s.model(name), full=True))

    @app.delete("/models/<model:name>")
    async def unregister(name: str) -> Response:
        s = svc()
        purge = request.args.get("purge", "false").lower() in ("1", "true", "yes")
        dropped, writes = s.unregister(name, node.clock(), purge=purge)
        await node.commit(writes)
        return _json({"model_name": name, "unregistered": True, "purged_locations": dropped})

    @app.get("/v2/catalog/availability")
    async def availability() -> Response:
        return _json(svc().availability_json())

    @app.get("/metrics")
    async def metrics() -> Response:
        body, ctype = render_metrics(node)
        return Response(body, status=200, content_type=ctype)

    return app
