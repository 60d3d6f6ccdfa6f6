"""Executors: what runs an action on this node, one handler per action type.

``run`` dispatches a typed action (``protocol.actions``) through a table;
the peer route decodes a peer's JSON once (``decode_action``) and comes here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from protocol.actions import (
    CancelTransfer,
    DeleteCopy,
    LocalPath,
    PeerAction,
    StartService,
    StartTransfer,
    StopService,
    VerifyCopy,
    Web,
)
from protocol.healthcheck import HealthTarget, unreachable_message

from ..copies.catalog import CopyCatalog
from ..copies.sources import check_source
from ..copies.sources.common import SourceError
from ..copies.sources.guard import confine_path, pin_request, resolve_addresses, resolve_public
from ..copies.transfers import Transfers
from ..copies.verifier import Verifier
from ..errors import MeshError
from ..registry import Registry
from ..serving import Services

__all__ = ["Executors"]

log = logging.getLogger("meshnode.jobs")

HEALTH_ADDRESSES_MAX = 4  # addresses of one name a health check tries, in the resolver's order


class Executors:
    def __init__(
        self, node_id: str, transfers: Transfers, copies: CopyCatalog, ingest_roots: tuple[Path, ...],
        allow_private_sources: bool, services: Services | None = None, registry: Registry | None = None,
    ) -> None:
        self.services = services
        self.registry = registry
        self.node_id = node_id
        self.transfers = transfers
        self.copies = copies
        self.ingest_roots = ingest_roots
        self.allow_private_sources = allow_private_sources
        self.verifier: Verifier | None = None  # the store's re-verify, once the node has one
        self._table: dict[type, Callable[[Any], Awaitable[dict[str, Any]]]] = {
            StartTransfer: self._start_transfer,
            DeleteCopy: self._delete_copy,
            StartService: self._start_service,
            StopService: self._stop_service,
            VerifyCopy: self._verify_copy,
            CancelTransfer: self._cancel_transfer,
        }

    async def run(self, action: PeerAction) -> dict[str, Any]:
        return await self._table[type(action)](action)

    async def _start_transfer(self, a: StartTransfer) -> dict[str, Any]:
        src = a.source
        if isinstance(src, LocalPath):
            # Confined first: a path outside the roots is refused whether or not it exists.
            real = await trio.to_thread.run_sync(confine_path, src.path, self.ingest_roots)
            if not await trio.to_thread.run_sync(real.exists):
                raise MeshError("SOURCE_NOT_FOUND", f"{src.path} does not exist on {self.node_id}")
        elif isinstance(src, Web):  # a bad URL or a private host is refused now, not after the claim
            await check_source(src.url, self.allow_private_sources)
        return self.transfers.start(a).public(self.node_id)

    def _serving(self) -> Services:
        if self.services is None:
            raise MeshError("NOT_SUPPORTED", f"{self.node_id} has no serving executor")
        return self.services

    async def _start_service(self, a: StartService) -> dict[str, Any]:
        services = self._serving()
        mv = self.registry.find(a.model) if self.registry is not None else None
        if mv is None:
            raise MeshError("MODEL_NOT_FOUND", f"model {a.model!r} is not registered")
        md = mv.metadata or {}
        rec = await services.serve(mv.name, a.gpus, a.port, a.config, size=mv.size or 0,
                                   requirements=md.get("requirements"), wait=False, default_engine=md.get("engine"))
        return services.record_json(rec)

    async def _stop_service(self, a: StopService) -> dict[str, Any]:
        stopped = await self._serving().stop(a.model, a.port)
        return {"stopped": [self._serving().record_json(r) for r in stopped]}

    async def _delete_copy(self, a: DeleteCopy) -> dict[str, Any]:
        if not await self.copies.delete_local(a.model, a.kind):
            raise MeshError("COPY_NOT_FOUND", f"{self.node_id}:{a.kind} holds no copy of {a.model!r}")
        return {"model_name": a.model, "device": f"{self.node_id}:{a.kind}", "deleted": True}

    async def _cancel_transfer(self, a: CancelTransfer) -> dict[str, Any]:
        t, ended = await self.transfers.stop(a.transfer_id, "cancelled through the API")
        return {**t, "cancelled": True, "ended": ended}

    async def _verify_copy(self, a: VerifyCopy) -> dict[str, Any]:
        """A peer banned this node for a bad chunk of a copy: read it again now (rate-limited)."""
        if self.verifier is None:
            raise MeshError("NOT_SUPPORTED", f"{self.node_id} does not re-verify its copies")
        return self.verifier.request(a.model, a.manifest_hash, a.chunk)

    async def probe_health(self, client: httpx.AsyncClient, target: HealthTarget) -> int | None:
        """One look at a health check's ``target`` (``protocol.healthcheck``
        decided it): its HTTP status, or None when it cannot be reached now
        (no DNS answer, refused, timed out, a broken answer), which the caller
        tries again until its deadline.  An outside host on a loopback,
        private or link-local address (unless ``--allow-private-sources``) is
        refused before any connection: ``MeshError`` ``UNHEALTHY`` with the
        one message every unreachable target ends with.  The name is resolved
        once and the connection goes to an address so checked (no second
        lookup, so no DNS rebinding); no redirect is followed, no body read."""
        try:
            if target.in_mesh or self.allow_private_sources:
                addrs = await resolve_addresses(target.host, target.port)
            else:
                addrs = await resolve_public(target.host, target.port)
        except SourceError as e:
            log.debug("health check of %s: %s", target.shown, e.message)
            if e.code == "NOT_FOUND":
                return None  # no answer now: a name may come up later
            raise MeshError("UNHEALTHY", unreachable_message(target.shown, self.node_id)) from None
        for addr in addrs[:HEALTH_ADDRESSES_MAX]:
            request = client.build_request("GET", target.url)
            pin_request(request, addr)
            try:
                response = await client.send(request, stream=True, follow_redirects=False)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                log.debug("health check of %s at %s: %s", target.shown, addr, type(e).__name__)
                continue  # the name's next address
            except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as e:
                log.debug("health check of %s at %s: %s", target.shown, addr, type(e).__name__)
                return None
            await response.aclose()
            return response.status_code
        return None
