"""``ensure`` on a node, and the leases that keep what it handed out
(the rules: ``protocol.leases``).

``POST /ensure {"model", "device": "NODE:TIER", "holder", "lease_s"}``, asked
of the node the device names, answers 200 with the copy's path and a lease
when the copy is there; else it starts what makes it (a copy from the mesh,
or the model's source, fetched once per mesh by the transfers' own claim)
and answers 202 with that transfer; the CLI follows it and asks again.
``NO_SOURCE`` when nothing can make it.

The leases live on this node (a pod reads a copy of the node it runs on),
in ``<data-dir>/leases.json``, written before an answer says they exist,
so a restart keeps them; each ends at its time, or when released.  The
evictor asks ``keep_reason`` beside the replica rule and the engines.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from protocol import InvalidName, parse_device
from protocol.actions import WEB_SCHEMES
from protocol.leases import EnsureStep, InvalidLease, Lease, LeaseBook, plan_ensure, validate_holder
from protocol.names import Device

from .actions import CopyRequest, DownloadRequest, Router
from .copies.store import TIERS, Store
from .copies.transfers import Transfers
from .errors import MeshError
from .mesh import Mesh, wall_ms
from .persist import atomic_write
from .registry import Registry, model_name

__all__ = ["Leases"]

log = logging.getLogger("meshnode.leases")

DEFAULT_HOLDER = "ensure"
FILE_MAX_BYTES = 16 * 1024 * 1024  # a leases.json larger than this is not ours


class Leases:
    def __init__(self, mesh: Mesh, store: Store, registry: Registry, transfers: Transfers, router: Router,
                 path: Path, *, clock_ms: Callable[[], int] = wall_ms) -> None:
        self.mesh = mesh
        self.store = store
        self.registry = registry
        self.transfers = transfers
        self.router = router
        self.path = path
        self.clock_ms = clock_ms
        self.book = LeaseBook()
        self._saving = trio.Lock()  # one write of leases.json at a time (they share a temporary name)

    # -- the leases --------------------------------------------------------------------

    def load(self) -> None:
        """The leases a previous run handed out (none when the file is missing or not ours)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(FILE_MAX_BYTES + 1)
            doc = json.loads(raw) if len(raw) <= FILE_MAX_BYTES else None
        except FileNotFoundError:
            return
        except (OSError, ValueError, RecursionError) as e:
            log.warning("ignoring the leases in %s: %s", self.path, e)
            return
        self.book = LeaseBook.from_value(doc)
        self.book.expire(self.clock_ms())
        if len(self.book):
            log.info("%d leases on copies here carried over from the last run", len(self.book))

    async def _save(self) -> None:
        async with self._saving:
            data = json.dumps(self.book.to_value(), separators=(",", ":")).encode()
            try:
                await trio.to_thread.run_sync(atomic_write, self.path, data)
            except OSError as e:
                raise MeshError("IO_ERROR", f"could not record the lease: {e.strerror or e}") from None

    def keep_reason(self, model: str, kind: str) -> str | None:
        """Why the copy may not be evicted: a lease on it has not ended."""
        return self.book.keep_reason(model, kind, self.clock_ms())

    def leases_json(self) -> dict[str, Any]:
        now = self.clock_ms()
        return {"node_id": self.mesh.id,
                "leases": [_lease_json(x, self.mesh.id, now) for x in self.book.active(now)]}

    async def release(self, model: str, device: str, holder: str | None) -> dict[str, Any]:
        name = model_name(model)
        tier = self.local_tier(device)
        gone = self.book.release(name, tier, holder)
        if not gone:
            who = f"{holder}'s lease" if holder else "a lease"
            raise MeshError("LEASE_NOT_FOUND", f"{who} on {name} at {device} is not held here (it ended, or was "
                                               "never given)")
        self.book.expire(self.clock_ms())
        await self._save()
        log.info("released the lease(s) of %s on %s: %s", name, tier, ", ".join(x.holder for x in gone))
        return {"model_name": name, "device": f"{self.mesh.id}:{tier}", "released": [x.holder for x in gone],
                "held_by": [x.holder for x in self.book.holding(name, tier, self.clock_ms())]}

    # -- ensure ------------------------------------------------------------------------

    def local_tier(self, device: Any) -> str:
        """The tier of ``device``, which must name this node: 404 for a node the mesh lacks,
        421 for another node (ask that one: it knows its own copies and leases)."""
        try:
            d = parse_device(device)
        except InvalidName as e:
            raise MeshError("INVALID_DEVICE", f"device: {e}") from None
        if d.is_web or d.kind not in TIERS:
            raise MeshError("INVALID_DEVICE", f"device: node:disk or node:dram, not {str(device)[:80]}")
        assert d.node_id is not None
        if d.node_id != self.mesh.id:
            m = self.mesh.member(d.node_id)
            if m is None:
                raise MeshError("NODE_NOT_FOUND", f"no node {d.node_id!r} is known to the mesh")
            raise MeshError("WRONG_NODE", f"{d} is on node {d.node_id}: ask it (--peer {m.record.address}); this "
                                          f"is {self.mesh.id}")
        return d.kind

    async def ensure(self, body: Any) -> tuple[int, dict[str, Any]]:
        """200 and the copy's path with a lease, or 202 and the transfer that makes it."""
        if not isinstance(body, dict):
            raise MeshError("INVALID_REQUEST", 'the body is {"model", "device", "holder", "lease_s"}')
        unknown = set(body) - {"model", "device", "holder", "lease_s"}
        if unknown:
            raise MeshError("INVALID_REQUEST", f"unknown fields: {', '.join(sorted(unknown))[:200]}")
        name = model_name(body.get("model"))
        tier = self.local_tier(body.get("device"))
        device = f"{self.mesh.id}:{tier}"
        try:
            holder = validate_holder(body.get("holder") or DEFAULT_HOLDER)
        except InvalidLease as e:
            raise MeshError(e.code, e.message) from None
        here = self.store.get(name, tier)
        making = next((t for t in self.transfers.by_id.values()
                       if t.model == name and t.kind == tier and t.status.active), None)
        mv = self.registry.find(name)
        up, down = [], {}
        for c in mv.copies if mv is not None else []:
            nid = c.device.split(":", 1)[0]
            if c.device == device:
                continue
            if self.mesh.online(nid):
                up.append(nid)
            else:
                state = self.mesh.state_of(nid)
                down[nid] = state.label if state is not None else "unknown"
        plan = plan_ensure(name, device, here=here is not None and not self.store.suspect(name, tier),
                           making=making is not None, holders=up, registered=mv is not None,
                           source_url=mv.source_url if mv is not None else None,
                           web_schemes=(*WEB_SCHEMES, "file://"), down_holders=down)
        if plan.step is EnsureStep.READY:
            assert here is not None
            try:
                lease = self.book.grant(name, tier, holder, body.get("lease_s"), self.clock_ms())
            except InvalidLease as e:
                raise MeshError(e.code, e.message) from None
            await self._save()
            self.store.touch(name, tier)
            return 200, {"status": "ready", "model_name": name, "device": device, "path": str(here.path),
                         "manifest_hash": here.manifest_hash, "size": here.manifest.total_bytes,
                         "lease": _lease_json(lease, self.mesh.id, self.clock_ms())}
        if plan.step is EnsureStep.NO_SOURCE:
            # Not a server's failure: the mesh has nothing to make it from (404, not 503).
            raise MeshError("NO_SOURCE", plan.why, status=404 if not down else None)
        if plan.step is EnsureStep.WAIT:
            assert making is not None
            out = making.public(self.mesh.id)
        elif plan.step is EnsureStep.COPY:
            out = await self.router.start_copy(name, CopyRequest(Device(self.mesh.id, tier)), move=False)
        else:
            out = await self.router.start_download(name, DownloadRequest(Device(self.mesh.id, tier)))
        log.info("ensure %s on %s for %s: %s (transfer %s)", name, device, holder, plan.why, out.get("transfer_id"))
        return 202, {"status": "copying", "model_name": name, "device": device, "why": plan.why,
                     "transfer_id": out.get("transfer_id"), "transfer": out}


def _lease_json(x: Lease, node_id: str, now_ms: int) -> dict[str, Any]:
    return {"model_name": x.model, "device": f"{node_id}:{x.tier}", "holder": x.holder, "until_ms": x.until_ms,
            "granted_ms": x.granted_ms, "left_s": max(0, x.until_ms - now_ms) // 1000}
