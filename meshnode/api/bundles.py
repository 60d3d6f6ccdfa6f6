"""The routes of bundles and of ``ensure`` (``meshnode/bundles.py``,
``meshnode/leases.py`` do the work):

- ``GET /bundles?model=M[&model=M2...]``: the bundle, streamed (``application/x-tar``, its length known);
- ``POST /bundles?to=NODE:TIER``: import a bundle sent as the body, streamed;
- ``POST /ensure``: a verified copy on a node, and a lease on it (200), or the transfer making it (202);
- ``GET /leases``, ``DELETE /leases?model=M&device=NODE:TIER[&holder=H]``: this node's leases.

An import's body can be any size, so Quart never reads it (it would buffer
what the disk has not yet taken): ``StreamedBodies`` hands the route the
ASGI ``receive`` itself, read at the pace the import writes, so HTTP's own
flow control holds the sender back.  Its bound is the bundle's: the header
at most ``HEADER_MAX_BYTES``, then exactly the bytes the header declares
(which must fit the tier), then at most ``TRAILER_MAX_BYTES`` of zeros.
The credential, Host, Origin and body-type rules and the write rate are the
API's, as for any route (``middleware.py``'s hooks run before the handler).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import trio
from quart import Response, request
from quart_trio import QuartTrio

from protocol.manifest import FILE_MAX_BYTES

from ..bundles import Bundles, ClientGone, ExportCut
from ..errors import MeshError
from ..leases import Leases
from .peer import ASGIApp, Receive, Scope, Send

__all__ = ["BUNDLES_PATH", "BUNDLE_BODY_MAX", "StreamedBodies", "add_bundle_routes"]

BUNDLES_PATH = "/bundles"
BUNDLE_TYPE = "application/x-tar"
# What an import's Content-Length may say: the bundle's own bounds, and the tier's room, hold the rest.
BUNDLE_BODY_MAX = FILE_MAX_BYTES
_STREAM = "meshnode.body"  # the scope key the route finds its body under
# A refused import reads the rest of its body this long (dropping it), so that the client, which
# sends it all before it reads an answer, gets the refusal rather than a closed connection.
DRAIN_MAX_S = 30.0


class _BodyStream:
    """A request's body, read from ASGI as the reader asks for it (an async iterator
    of its pieces; a class, not a generator, so that one left unfinished needs no closing)."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._done = False

    def __aiter__(self) -> _BodyStream:
        return self

    async def __anext__(self) -> bytes:
        while not self._done:
            event = await self._receive()
            if event["type"] != "http.request":
                raise ClientGone("the client went away before its body was all sent")
            self._done = not event.get("more_body", False)
            body: bytes = event.get("body", b"")
            if body:
                return body
        raise StopAsyncIteration

    async def drain(self, limit_s: float) -> None:
        """Read and drop what is left of the body, for at most ``limit_s``."""
        with trio.move_on_after(limit_s):
            try:
                async for _ in self:
                    pass
            except ClientGone:
                pass


class StreamedBodies:
    """For ``paths``: a ``POST``'s body is not read by Quart (it sees an empty
    one); the route reads the real one from ``request.scope`` at its own pace.
    An export whose reading failed midway (``ExportCut``) ends its answer
    short of its length, which is how its client learns of it."""

    def __init__(self, app: ASGIApp, paths: frozenset[str]) -> None:
        self.app = app
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "POST":
            given = False

            async def empty() -> dict[str, Any]:
                nonlocal given
                if not given:
                    given = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                # Quart waits here for more events; once its answer is sent, it stops waiting.
                await trio.sleep_forever()
                raise AssertionError("unreachable")

            scope, receive = {**scope, _STREAM: _BodyStream(receive)}, empty
        try:
            await self.app(scope, receive, send)
        except* ExportCut:
            pass  # logged where it happened; the connection closes short of the announced length


def add_bundle_routes(app: QuartTrio, bundles: Callable[[], Bundles], leases: Callable[[], Leases],
                      body_json: Callable[[], Awaitable[Any]]) -> None:
    """The routes above, on ``app``; ``bundles()`` and ``leases()`` give the parts (or raise STARTING)."""

    @app.get(BUNDLES_PATH)
    async def export_bundle() -> Response:
        names = request.args.getlist("model")
        if not names:
            raise MeshError("INVALID_REQUEST", "give ?model=NAME (repeat it for several models)")
        header, size, stream = await bundles().export(names)
        first = header.models[0].name.replace("/", "--")
        more = f"+{len(header.models) - 1}" if len(header.models) > 1 else ""
        resp = Response(stream, status=200, headers={
            "content-type": BUNDLE_TYPE, "content-length": str(size),
            "content-disposition": f"attachment; filename*=UTF-8''{quote(first + more)}.bundle.tar",
            "x-bundle-models": ",".join(m.name for m in header.models),
        })
        resp.timeout = None  # a large model streams for as long as it takes; each send is bounded
        return resp

    @app.post(BUNDLES_PATH)
    async def import_bundle() -> Response:
        to = request.args.get("to")
        if not to:
            raise MeshError("INVALID_REQUEST", "give ?to=NODE:TIER, the device the bundle's copies go to")
        tier = leases().local_tier(to)  # 404 or 421 before a byte of the body is read
        stream = request.scope.get(_STREAM)
        if not isinstance(stream, _BodyStream):
            raise MeshError("INTERNAL", "the import's body was not handed over")
        check = request.args.get("check", "false") == "true"
        try:
            out = await bundles().import_bundle(tier, stream, check=check)
        except MeshError:
            await stream.drain(DRAIN_MAX_S)  # so that the client, still sending, reads the refusal
            raise
        created = any(m["status"] == "imported" for m in out["models"])
        return Response(_dumps(out), status=201 if created else 200, mimetype="application/json")

    @app.post("/ensure")
    async def ensure() -> Response:
        status, out = await leases().ensure(await body_json())
        return Response(_dumps(out), status=status, mimetype="application/json")

    @app.get("/leases")
    async def leases_list() -> Response:
        return Response(_dumps(leases().leases_json()), status=200, mimetype="application/json")

    @app.delete("/leases")
    async def release() -> Response:
        model, device = request.args.get("model"), request.args.get("device")
        if not model or not device:
            raise MeshError("INVALID_REQUEST", "give ?model=NAME&device=NODE:TIER (and &holder=H for one holder's)")
        out = await leases().release(model, device, request.args.get("holder") or None)
        return Response(_dumps(out), status=200, mimetype="application/json")


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))
