"""OpenAI-style inference through any node: the models served healthy in
the mesh, and the rules of the inference paths.  The inference requests
themselves (``/v1/...`` and the peer hop ``/mesh/v1/infer/...``) are answered
by ``InferenceFastPath`` (``inference.py``) in front of the app; their rules
are here for routing (a method they do not take is 405) and for the route
list and the OpenAPI document."""

from __future__ import annotations

from quart import Response
from quart_trio import QuartTrio

from ..errors import MeshError
from ..proxy import INFER_PATHS
from .parts import ApiParts
from .responses import json_response

__all__ = ["add_inference_routes"]


def _inference_path() -> Response:
    raise MeshError("INTERNAL", "inference is answered in front of the app (meshnode/api/inference.py)")


def add_inference_routes(app: QuartTrio, parts: ApiParts) -> None:
    app.add_url_rule("/mesh/v1/infer/<int:port>/v1/<path:rest>", "peer_infer",
                     lambda port, rest: _inference_path(), methods=["POST"])

    @app.get("/v1/models")
    async def v1_models() -> Response:
        return json_response(parts.live().proxy.models_json())

    @app.get("/v1/models/<model:name>")
    async def v1_model(name: str) -> Response:
        """The OpenAI SDK's ``models.retrieve``: one model served somewhere and healthy."""
        for m in parts.live().proxy.models_json()["data"]:
            if m["id"] == name:
                return json_response(m)
        raise MeshError("MODEL_NOT_FOUND", f"no healthy service of {name[:200]!r} in the mesh")

    for path in INFER_PATHS:
        app.add_url_rule(path, "v1_" + path.rsplit("/", 1)[1], _inference_path, methods=["POST"])
