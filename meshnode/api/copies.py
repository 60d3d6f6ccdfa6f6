"""Copies and transfers: copy, move and download a model (each a transfer,
202 with where to follow it), the transfers the mesh knows, a cancel."""

from __future__ import annotations

from quart import Response
from quart_trio import QuartTrio

from protocol.actions import CancelTransfer

from ..actions.requests import CopyRequest
from ..errors import MeshError
from .parts import ApiParts
from .requests import copy_request, download_request
from .responses import body_json, json_response, paged, started

__all__ = ["add_copy_routes"]


def add_copy_routes(app: QuartTrio, parts: ApiParts) -> None:
    @app.post("/models/<model:name>/copy")
    async def copy_model(name: str) -> Response:
        return await _copy(parts, name, move=False)

    @app.post("/models/<model:name>/move")
    async def move_model(name: str) -> Response:
        return await _copy(parts, name, move=True)

    @app.post("/models/<model:name>/download")
    async def download_model(name: str) -> Response:
        r = parts.live()
        r.registry.check_room(name)  # a download registers the model it fetches: refused now, not once fetched
        req = download_request(await body_json())
        if isinstance(req, CopyRequest):  # from another node's copy
            return started(await r.router.start_copy(name, req, move=False))
        return started(await r.router.start_download(name, req))

    @app.get("/transfers")
    async def transfers() -> Response:
        return paged("transfers", parts.live().transfers.transfers_json())

    @app.get("/transfers/<tid>")
    async def transfer(tid: str) -> Response:
        t = parts.live().transfers.transfer_json(tid)
        if t is not None:
            return json_response(t)
        raise MeshError("TRANSFER_NOT_FOUND", f"no transfer {tid[:40]!r} is known")

    @app.delete("/transfers/<tid>")
    async def cancel_transfer(tid: str) -> Response:
        r = parts.live()
        node = r.transfers.runner_of(tid)  # any node answers: the one that runs it stops it
        out = await r.router.run_on(node, CancelTransfer(tid))
        ended = out.pop("ended", True)
        return json_response(out, 200 if ended else 202)  # 202: still removing its partial files


async def _copy(parts: ApiParts, name: str, *, move: bool) -> Response:
    r = parts.live()
    body = await body_json()
    if body is None:  # no body, so no schema check: an unknown model is said first, as for any copy
        r.registry.model(name)
    return started(await r.router.start_copy(name, copy_request(body), move=move))
