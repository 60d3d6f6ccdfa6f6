"""llama-orch's views (``/v2/``): availability, the catalog of models with
their digests, and nodes with their pools."""

from __future__ import annotations

from typing import Any

from quart import Response
from quart_trio import QuartTrio

from .parts import ApiParts
from .requests import catalog_entry
from .responses import body_json, json_response, paged

__all__ = ["add_v2_routes"]


def add_v2_routes(app: QuartTrio, parts: ApiParts) -> None:
    @app.get("/v2/catalog/availability")
    async def availability() -> Response:
        return json_response(parts.live().views.availability_json(parts.scheme))

    @app.get("/v2/catalog/models")
    async def catalog_models() -> Response:
        r = parts.live()
        return paged("models", [r.views.catalog_model_json(mv) for _, mv in sorted(r.registry.models().items())])

    @app.get("/v2/catalog/models/<model:name>")
    async def catalog_model(name: str) -> Response:
        r = parts.live()
        return json_response(r.views.catalog_model_json(r.registry.model(name)))

    @app.post("/v2/catalog/models")
    async def catalog_add() -> Response:
        """llama-orch's "add to the catalog": a registration with the digest its copies must have."""
        r = parts.live()
        entry = catalog_entry(await body_json())
        existing = r.registry.find(entry.id)
        reg: dict[str, Any] = {} if existing is None else {
            "model_type": existing.model_type, "source_url": existing.source_url, "metadata": dict(existing.metadata)}
        if entry.source_url is not None:
            reg["source_url"] = entry.source_url
        if entry.digest is not None:
            reg.setdefault("metadata", {})["digest"] = entry.digest
        mv, changed = await r.registry.register(entry.id, reg)
        return json_response(r.views.catalog_model_json(mv), 201 if changed is None else 200)

    @app.get("/v2/nodes")
    async def nodes_v2() -> Response:
        return paged("nodes", parts.live().views.nodes_v2_json(parts.scheme))
