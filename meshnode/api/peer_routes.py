"""The peer routes a peer's signed request reaches (``/mesh/v1/``; the
credential was checked by ``middleware.py``): a copy's manifest, whether
this node has seen a write, an action handed over.  (A gossip message takes
the fast path in front of the app: ``peer.py``.)"""

from __future__ import annotations

from quart import Response, request
from quart_trio import QuartTrio

from protocol import LocalProtocolError
from protocol.causal import After

from ..errors import MeshError
from .middleware import AFTER_HEADER, READ_AFTER_WAIT_S
from .parts import ApiParts
from .responses import body_json, json_response

__all__ = ["add_peer_routes"]


def add_peer_routes(app: QuartTrio, parts: ApiParts) -> None:
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
        return json_response({"seen": await parts.live().mesh.wait_seen(after, READ_AFTER_WAIT_S)})

    @app.post("/mesh/v1/actions")
    async def peer_action() -> Response:
        # A peer's action is decoded once, by the router (``protocol.actions.decode_action``).
        return json_response(await parts.live().router.handle_peer(await body_json()))
