"""The registry: models, their registrations, replica policies (pin), and
where their copies live (locations, recorded or dropped by hand)."""

from __future__ import annotations

from typing import Any

from quart import Response, request
from quart_trio import QuartTrio

from protocol.view import ModelView

from ..errors import MeshError
from .parts import ApiParts
from .responses import body_json, json_response, paged

__all__ = ["add_model_routes"]


def add_model_routes(app: QuartTrio, parts: ApiParts) -> None:
    @app.get("/models")
    async def models() -> Response:
        return paged("models", parts.live().views.models_json())

    @app.get("/models/<model:name>/locations")
    async def locations(name: str) -> Response:
        mv = parts.live().registry.model(name)
        return json_response({"model_name": mv.name, "locations": mv.locations})

    @app.post("/models/<model:name>/locations/<device:device>")
    async def add_location(name: str, device: str) -> Response:
        dev = await parts.live().registry.set_location(name, device, True)
        return json_response({"model_name": name, "device": dev, "recorded": True}, 201)

    @app.delete("/models/<model:name>/locations/<device:device>")
    async def drop_location(name: str, device: str) -> Response:
        return await _drop(parts, name, device)

    @app.post("/models/<model:name>/register")
    async def register(name: str) -> Response:
        r = parts.live()
        mv, changed = await r.registry.register(name, await body_json())  # acknowledged means durable
        out = _model_full(parts, mv)
        out["registered"] = True
        # Registering again replaces the registration: say so, and what changed.
        out["replaced"] = changed is not None
        out["changed"] = changed or []
        return json_response(out, 201 if changed is None else 200)

    @app.get("/models/<model:name>")
    async def model_info(name: str) -> Response:
        return json_response(_model_full(parts, parts.live().registry.model(name)))

    @app.post("/models/<model:name>/pin")
    async def pin(name: str) -> Response:
        policy = await body_json()
        if policy is None:  # an empty POST once unpinned: a write nobody meant
            raise MeshError("INVALID_REQUEST", "the body is the replica policy, e.g. {\"min\": 2}; "
                                               f"to unpin, DELETE /models/{name[:200]}/pin")
        return json_response(_model_full(parts, await parts.live().registry.pin(name, policy)))

    @app.delete("/models/<model:name>/pin")
    async def unpin(name: str) -> Response:
        return json_response(_model_full(parts, await parts.live().registry.pin(name, None)))

    @app.delete("/models/<model:name>")
    async def unregister(name: str) -> Response:
        device = request.args.get("device")
        if device is not None:  # gswarm's "remove from one device": the model stays registered
            return await _drop(parts, name, device)
        purge = request.args.get("purge", "false").lower() in ("1", "true", "yes")
        return json_response(await _unregister(parts, name, purge))


def _model_full(parts: ApiParts, mv: ModelView) -> dict[str, Any]:
    r = parts.live()
    out = r.views.model_json(mv, full=True)
    out["replicas"] = r.keeper.status_json(mv)  # wanted and actual, when pinned
    return out


async def _drop(parts: ApiParts, name: str, device: str) -> Response:
    """Free one device: delete the copy there, or drop a location recorded by hand."""
    r = parts.live()
    deleted = await r.router.delete_copy(name, device)
    if deleted is not None:
        return json_response({"model_name": name, "device": deleted["device"], "dropped": True,
                              "deleted_copy": True})
    dev = await r.registry.set_location(name, device, False)
    return json_response({"model_name": name, "device": dev, "dropped": True})


async def _unregister(parts: ApiParts, name: str, purge: bool) -> dict[str, Any]:
    r = parts.live()
    copies = [c.device for c in r.registry.model(name).copies]
    dropped = await r.registry.unregister(name, purge=purge)
    out: dict[str, Any] = {"model_name": name, "unregistered": True, "purged_locations": dropped}
    if purge:
        # The purge is in the catalog now, so a holder that is down deletes its copy when
        # it is back; the reachable ones are asked to delete theirs at once.
        deleted, pending = await r.router.purge_copies(name, copies)
        out["deleted_copies"], out["pending_copies"] = deleted, pending
    return out
