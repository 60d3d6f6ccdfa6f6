"""The replica keeper: this node's part of keeping every pinned model
between its ``min`` and ``max`` copies.

Every ``interval_s`` it reads the catalog into the pure rule's inputs
(``protocol.replicas``: ``ReplicaFacts`` from the members, their ``node`` and
``storage`` records; ``Holder`` from the ``copy/`` records and the
transfers under way) and runs ``plan`` for each pinned model.  It takes only
the steps that name this node: it starts a copy here (from the mesh, or
from the model's ``source_url`` when no copy is left), or deletes its own.
Every other node does the same with the same inputs, so no node asks
another and no two take one step.

Bounds: one round looks at every pinned model once; a copy that failed
here is not tried again for ``backoff`` (doubling from the interval to
``BACKOFF_MAX_S``); a drop waits until no engine here serves the model and
no transfer here reads it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from protocol import MemberState
from protocol.actions import CopyOf, StartTransfer, Web
from protocol.keys import (
    NODE_KEY,
    STORAGE_KEY,
    SVC_PREFIX,
    XFER_PREFIX,
    NodeInfo,
    RecordError,
    Storage,
    TierUsage,
    XferRecord,
)
from protocol.replicas import Holder, Plan, ReplicaFacts, plan
from protocol.serving import ServiceRecord, ServiceState
from protocol.sources import is_outside
from protocol.view import ModelView

from .copies.catalog import CopyCatalog
from .copies.transfer import Transfer
from .copies.transfers import Transfers
from .errors import MeshError
from .mesh import Mesh
from .registry import Registry

__all__ = ["Keeper"]

log = logging.getLogger("meshnode.replicas")

BACKOFF_MAX_S = 300.0


@dataclass
class _Snapshot:
    now: float
    nodes: list[tuple[ReplicaFacts, Mapping[str, TierUsage]]] = field(default_factory=list)
    making: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (model, tier) -> nodes making it
    reading: dict[str, set[str]] = field(default_factory=dict)  # model -> nodes a transfer reads it from
    serving: dict[str, set[str]] = field(default_factory=dict)  # model -> nodes an engine (not ended) serves it on

    def in_use(self, model: str) -> set[str]:
        return self.reading.get(model, set()) | self.serving.get(model, set())


class Keeper:
    def __init__(self, mesh: Mesh, registry: Registry, transfers: Transfers, copies: CopyCatalog,
                 *, grace_s: float, interval_s: float) -> None:
        self.mesh = mesh
        self.registry = registry
        self.transfers = transfers
        self.copies = copies
        self.grace_s = grace_s
        self.interval_s = interval_s
        self._backoff: dict[str, tuple[float, float]] = {}  # model -> (retry at, last wait)
        self._started: dict[str, Transfer] = {}  # model -> the copy this keeper started here last
        self._snap: tuple[tuple[int, int], _Snapshot] | None = None  # keep_reason's, see _recent_snapshot
        self.counts = {"replica_rounds": 0, "replica_copies_added": 0, "replica_copies_dropped": 0}

    # -- the rule's inputs, from the catalog ----------------------------------------------

    def snapshot(self) -> _Snapshot:
        """What one round reads of the catalog, once for every model: the members, their
        labels and storage, and which models are being made or read where."""
        now = trio.current_time()
        snap = _Snapshot(now)
        for m in self.mesh.members():
            nid = m.record.node_id
            up = self.mesh.reachable(nid)
            # A node that left said so: its copies are gone at once, no grace.
            down_since = None if up else (-math.inf if m.state is MemberState.LEFT else min(m.since, now))
            try:
                labels = NodeInfo.from_value(self.mesh.get(nid, NODE_KEY)).labels
            except RecordError:
                labels = {}
            try:
                tiers = Storage.from_value(self.mesh.get(nid, STORAGE_KEY)).tiers
            except RecordError:
                tiers = {}
            snap.nodes.append((ReplicaFacts(nid, up, down_since, labels), tiers))
        for nid, _key, value in self.mesh.items(XFER_PREFIX):
            try:
                x = XferRecord.from_value(value)
            except RecordError:
                continue
            if x.status.active:
                snap.reading.setdefault(x.model, set()).update(x.sources)
                snap.making.setdefault((x.model, x.kind), set()).add(nid)
        for nid, _key, value in self.mesh.items(SVC_PREFIX):
            try:
                s = ServiceRecord.from_value(value)
            except RecordError:
                continue
            if s.state not in (ServiceState.ERROR, ServiceState.STOPPED):  # restarting counts: it reads again
                snap.serving.setdefault(s.model, set()).add(nid)
        return snap

    def _holders(self, mv: ModelView, tier: str, snap: _Snapshot) -> list[Holder]:
        complete = {c.device.split(":", 1)[0] for c in mv.copies if c.device.endswith(f":{tier}")}
        making = snap.making.get((mv.name, tier), set())
        in_use = snap.in_use(mv.name)
        return [Holder(nid, nid in complete, nid in in_use) for nid in sorted(complete | making)]

    def plan_for(self, mv: ModelView, snap: _Snapshot | None = None) -> Plan | None:
        """The rule's steps for ``mv`` as this node sees the mesh now; None if it is not pinned."""
        policy = mv.policy
        if policy is None:
            return None
        snap = snap or self.snapshot()
        size = mv.size or 0
        nodes = [dataclasses.replace(n, room=policy.tier in tiers and tiers[policy.tier].room_for(size))
                 for n, tiers in snap.nodes]
        # Something to copy from besides the tier's own holders: a copy on another tier (a pin to
        # dram of a model on disk), or the model's source outside the mesh.
        fetchable = self._mesh_copy(mv) or is_outside(mv.source_url)
        return plan(mv.name, policy, nodes, self._holders(mv, policy.tier, snap), snap.now, self.grace_s,
                    fetchable=fetchable)

    def keep_reason(self, model: str, kind: str) -> str | None:
        """Why this node's copy of ``model`` on ``kind`` may not be evicted, or None
        (the evictor asks, copy by copy)."""
        for t in self.transfers.by_id.values():
            if t.model == model and t.status.active:
                return f"transfer {t.id} here reads or writes it"
        snap = self._recent_snapshot()
        me = self.mesh.id
        if me in snap.serving.get(model, set()):
            return "an engine serves from it"
        if me in snap.reading.get(model, set()):
            return "a peer's transfer reads it"
        mv = self.registry.find(model)
        if mv is None or mv.policy is None or mv.policy.tier != kind:
            return None
        p = self.plan_for(mv, snap)
        assert p is not None
        # Only complete copies on nodes that are up: a copy being made, or one on a node
        # within its grace, may never come; evicting this one could leave none.  A copy
        # outside the policy's labels is no replica: it may not stand in for this one.
        live = sum(1 for h in self._holders(mv, kind, snap)
                   if h.complete and self.mesh.online(h.node_id) and h.node_id not in p.outside)
        if live <= p.wanted_min:
            return f"pinned: the replica policy keeps at least {p.wanted_min} copies ({live} complete and up now)"
        return None

    def _recent_snapshot(self) -> _Snapshot:
        """The snapshot of this moment, shared by the questions asked in one sweep
        (taken again once the catalog moved or a second passed)."""
        key = (self.mesh.version, int(trio.current_time()))
        if self._snap is None or self._snap[0] != key:
            self._snap = (key, self.snapshot())
        return self._snap[1]

    # -- acting on the steps that name this node ------------------------------------------

    async def step(self) -> None:
        """One round: every pinned model once."""
        me = self.mesh.id
        models = self.registry.models()
        for gone in (self._backoff.keys() | self._started.keys()) - models.keys():
            self._backoff.pop(gone, None)
            self._started.pop(gone, None)
        snap = self.snapshot()
        for mv in [mv for mv in models.values() if mv.policy is not None]:
            p = self.plan_for(mv, snap)
            if p is None or mv.policy is None:
                continue
            if me in p.add:
                self._add(mv, mv.policy.tier)
            elif me in p.drop:
                await self._drop(mv.name, mv.policy.tier, p.why(me))
        self.counts["replica_rounds"] += 1

    def _mesh_copy(self, mv: ModelView) -> bool:
        """A complete copy of ``mv`` on a node that is up, on any tier."""
        return any(self.mesh.online(c.device.split(":", 1)[0]) for c in mv.copies)

    def _add(self, mv: ModelView, tier: str) -> None:
        prev = self._started.pop(mv.name, None)
        if prev is not None:
            if prev.status.active:
                self._started[mv.name] = prev
                return  # under way
            if prev.error is not None:
                self._failed(mv.name, f"{prev.error.code}: {prev.error.message}")
            else:
                self._backoff.pop(mv.name, None)
        if trio.current_time() < self._backoff.get(mv.name, (0.0, 0.0))[0]:
            return
        source = CopyOf() if self._mesh_copy(mv) or not mv.source_url else Web(mv.source_url)
        try:
            t = self.transfers.start(StartTransfer(mv.name, tier, source))
        except (MeshError, OSError) as e:
            self._failed(mv.name, f"{type(e).__name__}: {e}")
            return
        self._started[mv.name] = t
        self.counts["replica_copies_added"] += 1
        log.info("replicas: adding a copy of %s on %s:%s (transfer %s, from %s)", mv.name, self.mesh.id, tier,
                 t.id, "the mesh" if isinstance(source, CopyOf) else "its source")

    def _failed(self, model: str, why: str) -> None:
        _, wait = self._backoff.get(model, (0.0, 0.0))
        wait = min(max(wait * 2, self.interval_s), BACKOFF_MAX_S)
        self._backoff[model] = (trio.current_time() + wait, wait)
        log.warning("replicas: a copy of %s here failed (%s); trying again in %.0f s", model, why, wait)

    async def _drop(self, model: str, tier: str, why: str) -> None:
        for t in self.transfers.by_id.values():
            if t.model == model and t.status.active:
                return  # a copy being written or read here is never dropped
        try:
            deleted = await self.copies.delete_local(model, tier)
        except (MeshError, OSError) as e:
            log.warning("replicas: could not drop the copy of %s on %s: %s", model, tier, e)
            return
        if deleted:
            self.counts["replica_copies_dropped"] += 1
            log.info("replicas: dropped the copy of %s on %s:%s (%s)", model, self.mesh.id, tier, why)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.interval_s)
            try:
                await self.step()
            except Exception:  # one bad round is a log line; the next one reads the catalog afresh
                log.exception("replicas: a round of the replica rule failed")

    # -- what the API shows ----------------------------------------------------------------

    def status_json(self, mv: ModelView) -> dict[str, Any] | None:
        if mv.policy is None:
            return None
        snap = self.snapshot()
        p = self.plan_for(mv, snap)
        assert p is not None
        holders = self._holders(mv, mv.policy.tier, snap)
        live = [h.node_id for h in holders if h.complete and self.mesh.online(h.node_id)]
        return {
            "policy": mv.policy.to_value(),
            "wanted": {"min": p.wanted_min, "max": p.wanted_max},
            "actual": sum(1 for nid in live if nid not in p.outside),  # only where the labels take it
            "outside": sum(1 for nid in live if nid in p.outside),  # outside the labels: dropped once min is met
            "spread": ({"label": mv.policy.spread, "covered": p.spread_covered, "target": p.spread_target}
                       if mv.policy.spread is not None else None),
            "counted": p.counted,
            "lost": p.lost,
            "copying_to": [h.node_id for h in holders if not h.complete],
            "next": {"add": list(p.add), "drop": list(p.drop)},
            "short": p.short,
        }
