"""The node and the mesh at a glance: probes, status, nodes, storage, metrics."""

from __future__ import annotations

from typing import Any

from quart import Response
from quart_trio import QuartTrio

from .parts import ApiParts
from .responses import error_response, json_response, paged

__all__ = ["add_node_routes"]


def add_node_routes(app: QuartTrio, parts: ApiParts) -> None:
    @app.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok", "node_id": parts.node_id, "generation": parts.generation()})

    @app.get("/ready")
    async def ready() -> Response:
        """200 once the node listens and has tried every join seed; 503
        ``NOT_READY`` while it starts or leaves (a readiness probe)."""
        why = parts.not_ready()
        if why is not None:
            return error_response(503, "NOT_READY", why)
        return json_response({"status": "ready", "node_id": parts.node_id, "generation": parts.generation()})

    @app.get("/status")
    async def status() -> Response:
        r = parts.live()
        out = r.views.status_json()
        counts: dict[str, int] = {}
        for v in r.jobs.views():
            counts[v.status.value] = counts.get(v.status.value, 0) + 1
        out["jobs"] = {"total": sum(counts.values()), **counts}
        svc: dict[str, int] = {}
        for s in r.services.records():
            svc[s.state.value] = svc.get(s.state.value, 0) + 1
        out["services"] = {"total": sum(svc.values()), **svc}
        return json_response(out)

    @app.get("/nodes")
    async def nodes() -> Response:
        return paged("nodes", parts.live().views.nodes_json())

    @app.get("/storage")
    async def storage() -> Response:
        return json_response(_storage(parts))

    @app.get("/metrics")
    async def metrics() -> Response:
        body, ctype = parts.metrics()
        return Response(body, status=200, content_type=ctype)


def _storage(parts: ApiParts) -> dict[str, Any]:
    """This node's devices (with the eviction watermarks and GPUs) and the copies it holds."""
    run = parts.live()
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
    return {"node_id": parts.node_id, "devices": devices, "copies": copies}
