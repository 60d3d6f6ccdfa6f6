"""What runs around every public route, in this order: the clock starts;
the guard (Host, Origin, body type); the credential (a peer's signature
under ``/mesh/``, else the API token) and the body's size; the write rate;
``X-Mesh-After`` (answer once this node has seen that write); the body
checked against its route's schema.  After the handler: the route's
latency, and a write's causality token.  Errors of every kind are mapped
to ``{"error": {"code", "message"}}`` with a fitting status.  Credentials
are compared in constant time and never echoed or logged."""

from __future__ import annotations

import json
import logging
import time

from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from protocol import LocalProtocolError
from protocol.causal import After

from ..errors import MeshError
from .auth import PeerAuthError, check_bearer, request_target
from .bundles import BUNDLE_BODY_MAX, BUNDLES_PATH
from .parts import ApiParts
from .responses import PUBLIC_BODY_MAX, body_json, error_response, remote
from .schemas import ROUTE_DOCS
from .validate import body_problem

__all__ = ["AFTER_HEADER", "OPEN_PATHS", "OPEN_PREFIX", "READ_AFTER_WAIT_S", "TOKEN_HEADER", "install"]

log = logging.getLogger("meshnode.api")

AFTER_HEADER = "X-Mesh-After"  # a request: answer once this write is seen here
TOKEN_HEADER = "X-Mesh-Token"  # a write's answer: its causality token
READ_AFTER_WAIT_S = 2.0
# Answered without a token: probes carry none, and the dashboard's page asks for one itself.
OPEN_PATHS = frozenset({"/health", "/ready", "/", "/docs", "/openapi.json"})
OPEN_PREFIX = "/ui/"


def install(app: QuartTrio, parts: ApiParts) -> None:
    """The hooks and error handlers above, on ``app``."""
    _install_before(app, parts)
    _install_errors(app)


def _install_before(app: QuartTrio, parts: ApiParts) -> None:
    @app.before_request
    async def _start_clock() -> None:  # first, so that a refused request is timed too
        g.started = time.perf_counter()

    @app.before_request
    async def _guard() -> None:
        """Before the credential: an unknown Host (DNS rebinding), a cross-site
        write, a body type the route does not take (``protocol.httpguard``)."""
        parts.guard.check(request.method, request.path, request.headers, request.scheme, remote())

    @app.after_request
    async def _observe(response: Response) -> Response:
        started = getattr(g, "started", None)
        if started is not None:
            rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
            parts.latency.observe(request.method, rule, time.perf_counter() - started)
        return response

    @app.before_request
    async def _auth() -> Response | None:
        return await _credential(parts)

    @app.before_request
    async def _write_rate() -> None:
        """Once the token is known good: one write taken from its client's bucket (429 past it)."""
        parts.guard.limit(request.method, request.path, request.headers.get("authorization"), remote())

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
        g.caught_up = await parts.live().mesh.wait_seen(after, READ_AFTER_WAIT_S)

    @app.after_request
    async def _write_token(response: Response) -> Response:
        return await _with_token(parts, response)

    @app.before_request
    async def _check_body() -> None:
        """A JSON body is checked against its route's schema (the one
        /openapi.json shows) before the handler sees it: the one check of
        its shape (the handler parses it into a typed request, ``requests.py``)."""
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


async def _credential(parts: ApiParts) -> Response | None:
    """The body's size, then a peer's signature (``/mesh/``) or the API token."""
    path = request.path
    limit = BUNDLE_BODY_MAX if (request.method, path) == ("POST", BUNDLES_PATH) else PUBLIC_BODY_MAX
    if request.content_length is not None and request.content_length > limit:
        # Answer before reading the body, and close: the client learns why at once.
        r = error_response(413, "TOO_LARGE",
                           f"request body of {request.content_length} bytes is over the {limit} byte limit")
        r.headers["connection"] = "close"
        return r
    if path.startswith("/mesh/"):
        gate = parts.peer_gate
        try:
            cred = gate.precheck(request.scope["headers"])
            if cred is not None:
                target = request_target(request.scope.get("raw_path") or path.encode(),
                                        request.scope.get("query_string", b""))
                body = await request.get_data(cache=True)
                assert isinstance(body, bytes)
                gate.check(cred, request.method, target, body)
        except PeerAuthError as e:
            parts.refusals.note(remote(), "a peer request", e)
            r = error_response(401, "UNAUTHORIZED", e.reason)
            r.headers["connection"] = "close"
            r.headers.update(e.headers)  # a stale generation's: our current one, signed
            return r
        return None
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIX):
        return None
    if not check_bearer(request.headers.get("authorization"), parts.api_tokens):
        parts.refusals.note(remote(), "an API request")
        return error_response(401, "UNAUTHORIZED", "missing or wrong API token")
    return None


async def _with_token(parts: ApiParts, response: Response) -> Response:
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


def _install_errors(app: QuartTrio) -> None:
    @app.errorhandler(MeshError)
    async def _mesh_error(e: MeshError) -> Response:
        resp = error_response(e.status, e.code, e.message, e.details)
        retry_s = e.details.get("retry_after_s")
        if isinstance(retry_s, int) and retry_s > 0:
            resp.headers["Retry-After"] = str(retry_s)  # RFC 9110: whole seconds
        return resp

    @app.errorhandler(LocalProtocolError)
    async def _local_error(e: LocalProtocolError) -> Response:
        # A value this node will not write or send (a bad name, too large, too deep).
        return error_response(400, "INVALID_REQUEST", str(e)[:500])

    @app.errorhandler(HTTPException)
    async def _http_error(e: HTTPException) -> Response:
        code = (e.name or "error").upper().replace(" ", "_")
        resp = error_response(e.code or 500, code, e.description or e.name or "error")
        allowed = getattr(e, "valid_methods", None)
        if e.code == 405 and allowed:  # what the route does take (RFC 9110)
            resp.headers["Allow"] = ", ".join(sorted(allowed))
        return resp

    @app.errorhandler(Exception)
    async def _internal(e: Exception) -> Response:
        log.exception("request %s %s failed", request.method, request.path)
        return error_response(500, "INTERNAL", "internal error; see the node's log")
