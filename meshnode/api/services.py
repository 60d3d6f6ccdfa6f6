"""Services: the engines serving models on GPUs, started and stopped on the
node that runs them (ours, and gswarm's forms: ``/serve``, ``target_nodes``)."""

from __future__ import annotations

from typing import Any

from quart import Response, request
from quart_trio import QuartTrio

from protocol.actions import StartService, StopService
from protocol.view import ModelView

from ..errors import MeshError
from .parts import ApiParts, Running
from .requests import ServeRequest, gswarm_serve_request, serve_request
from .responses import body_json, json_response, paged

__all__ = ["add_service_routes"]


def add_service_routes(app: QuartTrio, parts: ApiParts) -> None:
    @app.get("/services")
    async def services_all() -> Response:
        r = parts.live()
        return paged("services", [r.services.record_json(x) for x in r.services.records()])

    @app.get("/models/<model:name>/services")
    async def model_services(name: str) -> Response:
        r = parts.live()
        mv = r.registry.model(name)
        items = [r.services.record_json(x) for x in r.services.records() if x.model == mv.name]
        return paged("services", items, model_name=mv.name)

    @app.post("/models/<model:name>/services")
    async def serve_model(name: str) -> Response:
        r = parts.live()
        mv = r.registry.model(name)
        req = serve_request(await body_json())
        if req.target_nodes:
            return await _serve_on_nodes(r, mv, req)
        return _starting(await _serve(r, mv, req), f"/models/{mv.name}/services")

    @app.post("/models/<model:name>/serve")
    async def serve_gswarm(name: str) -> Response:
        """gswarm's form: ``{"port", "device": "gpu0" (this node) or "node:gpu0", "config": {"framework"}}``."""
        r = parts.live()
        mv = r.registry.model(name)
        req = gswarm_serve_request(await body_json(), parts.node_id)
        return _starting(await _serve(r, mv, req), f"/models/{mv.name}/serve/status")

    @app.delete("/models/<model:name>/serve")
    async def stop_serve_gswarm(name: str) -> Response:
        """gswarm's form: stop every service of the model, wherever it runs."""
        r = parts.live()
        mv = r.registry.model(name)
        nodes = sorted({s.node for s in r.services.records() if s.model == mv.name})
        if not nodes:
            raise MeshError("SERVICE_NOT_FOUND", f"no service of {mv.name!r} in the mesh")
        stopped: list[Any] = []
        for node in nodes:
            stopped += (await r.router.run_on(node, StopService(mv.name, None))).get("stopped") or []
        return json_response({"model_name": mv.name, "stopped": stopped})

    @app.get("/models/<model:name>/serve/status")
    async def serve_status_gswarm(name: str) -> Response:
        """gswarm's form: whether the model is served, and each service."""
        r = parts.live()
        mv = r.registry.model(name)
        svcs = [r.services.record_json(s) for s in r.services.records() if s.model == mv.name]
        return json_response({"model_name": mv.name, "serving": any(s["state"] == "healthy" for s in svcs),
                              "services": svcs})

    @app.delete("/models/<model:name>/services/<node>")
    async def stop_serving(name: str, node: str) -> Response:
        r = parts.live()
        mv = r.registry.model(name)
        port_text = request.args.get("port")
        if port_text is not None and not (port_text.isdigit() and 0 < int(port_text) < 65536):
            raise MeshError("INVALID_REQUEST", "port: 1 to 65535")
        return json_response(await r.router.run_on(node, StopService(mv.name, int(port_text) if port_text else None)))


def _starting(out: dict[str, Any], location: str) -> Response:
    """202: a service starting, and where to follow it."""
    resp = json_response(out, 202)
    resp.headers["Location"] = location
    return resp


async def _serve(r: Running, mv: ModelView, req: ServeRequest) -> dict[str, Any]:
    assert req.node is not None
    return await r.router.run_on(req.node, StartService(mv.name, req.gpus, req.port, req.config))


async def _serve_on_nodes(r: Running, mv: ModelView, req: ServeRequest) -> Response:
    """gswarm's ``target_nodes``: on each node, its freest GPU that fits (placement's ranking)."""
    ranking = {c["node_id"]: c for c in r.jobs.placement(mv.name, "gpu")["ranking"]}
    started = []
    for node in req.target_nodes:
        c = ranking.get(node)
        if c is None:
            raise MeshError("NODE_NOT_FOUND", f"no node {node[:64]!r} in the mesh")
        if not c["fits"] or not c.get("device"):
            raise MeshError("NO_CAPACITY", f"{node}: {'; '.join(c['reasons']) or 'no GPU fits'}")
        gpu = int(str(c["device"]).rsplit(":gpu", 1)[1])
        started.append(await r.router.run_on(node, StartService(mv.name, (gpu,), req.port, req.config)))
    return _starting({"model_name": mv.name, "services": started}, f"/models/{mv.name}/services")
