"""The Quart-trio application, put together.

Public routes (INTERFACES.md) take and give JSON; every error is
``{"error": {"code", "message"}}`` with a fitting status.  They need an API
bearer token when the node has any.  ``/mesh/v1/msg`` takes one msgpack peer
message and the other ``/mesh/`` routes a peer's request, each signed with
the cluster secret when the node has one.  The app is given its parts
(``ApiParts``), not the node.

One module a resource, each adding its routes to the app:

- ``nodes``: probes, status, nodes, storage, metrics;
- ``models``: the registry, pins, locations;
- ``copies``: copy, move, download, transfers;
- ``jobs``: pipelines and placement;
- ``services``: engines serving models (and gswarm's forms);
- ``v1``: OpenAI-style inference (answered by ``inference.py`` in front);
- ``v2``: llama-orch's catalog and nodes;
- ``bundles``: export, import, ensure, leases;
- ``peer_routes``: what a peer's signed request reaches;
- ``dashboard``: the API's description and the dashboard's pages.

Around them: ``middleware`` (guard, credentials, write rate, causality, the
schema check, error mapping), ``routing`` (how a path is read),
``requests`` (bodies parsed into typed requests, once), ``responses``
(answers, pages, the body's JSON), ``parts`` (what the API is given).
"""

from __future__ import annotations

from quart_trio import QuartTrio

from protocol import RemoteProtocolError

from . import middleware
from .bundles import BUNDLES_PATH, StreamedBodies, add_bundle_routes
from .copies import add_copy_routes
from .dashboard import add_dashboard_routes
from .inference import InferenceFastPath
from .jobs import add_job_routes
from .middleware import OPEN_PATHS
from .models import add_model_routes
from .nodes import add_node_routes
from .parts import ApiParts, Running
from .peer import DrainOrClose, PeerFastPath
from .peer_routes import add_peer_routes
from .responses import PUBLIC_BODY_MAX, body_json
from .routing import new_app
from .services import add_service_routes
from .v1 import add_inference_routes
from .v2 import add_v2_routes

__all__ = ["OPEN_PATHS", "ApiParts", "Running", "create_app"]


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
    return DrainOrClose(PeerFastPath(inference, parts.peer_gate, parts.refusals, receive,
                                     lambda: parts.takes_datagrams))


def _public_app(parts: ApiParts) -> QuartTrio:
    """The public app: every route, behind the middleware.  Nothing of
    ``parts`` is read until a request comes."""
    app = new_app()
    middleware.install(app, parts)
    add_node_routes(app, parts)
    add_copy_routes(app, parts)
    add_job_routes(app, parts)
    add_peer_routes(app, parts)
    add_model_routes(app, parts)
    add_inference_routes(app, parts)
    add_service_routes(app, parts)
    add_v2_routes(app, parts)
    add_dashboard_routes(app)
    add_bundle_routes(app, lambda: parts.optional("bundles"), lambda: parts.optional("leases"), body_json)
    return app
