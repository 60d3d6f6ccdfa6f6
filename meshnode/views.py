"""What the API shows of the mesh: models, nodes, availability, status, as JSON."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload

import trio

from protocol import MemberState
from protocol.digest import model_digest
from protocol.gpus import GpusRecord
from protocol.keys import (
    GPUS_KEY,
    NODE_KEY,
    STORAGE_KEY,
    SVC_PREFIX,
    NodeInfo,
    RecordError,
    Storage,
)
from protocol.registry import availability, storage_totals
from protocol.serving import Pool, ServiceRecord, pools
from protocol.view import ModelIndex, ModelView

from .mesh import Mesh

__all__ = ["Views"]


class _Rendered(Sequence[dict[str, Any]]):
    """``Views.models_json``: the models' JSON, rendered as it is read."""

    def __init__(self, views: Views, names: list[str], services: dict[str, list[ServiceRecord]]) -> None:
        self._views, self._names, self._services = views, names, services

    def __len__(self) -> int:
        return len(self._names)

    def _one(self, name: str) -> dict[str, Any]:
        mv = self._views.index.get(name)
        assert mv is not None  # the names are the index's own
        return self._views.model_json(mv, services=self._services)

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, i: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, i: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(i, slice):
            return [self._one(n) for n in self._names[i]]
        return self._one(self._names[i])


def _node_of(device: str) -> str:
    return device.split(":", 1)[0]


class Views:
    def __init__(self, mesh: Mesh, index: ModelIndex) -> None:
        self.mesh = mesh
        self.index = index

    def model_status(self, mv: ModelView) -> str:
        if not mv.locations:
            return "registered"
        if any(self.mesh.online(_node_of(d)) for d in mv.locations if ":" in d):
            return "available"
        return "unavailable"

    def services_by_model(self) -> dict[str, list[ServiceRecord]]:
        out: dict[str, list[ServiceRecord]] = {}
        for _nid, _key, value in self.mesh.items(SVC_PREFIX):
            try:
                r = ServiceRecord.from_value(value)
            except RecordError:
                continue
            out.setdefault(r.model, []).append(r)
        return out

    def model_json(self, mv: ModelView, *, full: bool = False,
                   services: dict[str, list[ServiceRecord]] | None = None) -> dict[str, Any]:
        svcs = sorted((services if services is not None else self.services_by_model()).get(mv.name, []),
                      key=lambda r: (r.node, r.port))
        # A GPU holds the model while an engine on it runs: a location too.
        held = [f"{s.node}:gpu{g}" for s in svcs if s.state.up for g in s.gpus]
        out: dict[str, Any] = {
            "model_name": mv.name,
            "model_type": mv.model_type,
            "size": mv.size,
            "locations": mv.locations + [d for d in held if d not in mv.locations],
            "services": [{"node": s.node, "port": s.port, "device": s.device, "engine": s.engine,
                          "state": s.state.value} for s in svcs],
            "status": self.model_status(mv),
        }
        if full:
            out.update(
                source_url=mv.source_url,
                metadata=mv.metadata,
                registered_by=mv.registered_by,
                registered_at_ms=mv.stamp.wall_ms,
                copies=[
                    {"device": c.device, "manifest_hash": c.manifest_hash, "size": c.size,
                     "status": "ready", "online": self.mesh.online(_node_of(c.device))}
                    for c in mv.copies
                ],
            )
        return out

    def catalog_model_json(self, mv: ModelView) -> dict[str, Any]:
        """llama-orch's catalog entry: ``{id, digest}``, and what it rests on."""
        expected = mv.metadata.get("digest") if isinstance(mv.metadata.get("digest"), str) else None
        d = model_digest((c.sha256 for c in mv.copies), expected)
        return {
            "id": mv.name,
            "digest": d.digest,
            "expected_digest": d.expected,
            "verified": d.verified,
            "conflict": d.conflict,
            "copies": [{"device": c.device, "digest": c.sha256, "online": self.mesh.online(_node_of(c.device))}
                       for c in mv.copies],
            "size": mv.size,
            "source_url": mv.source_url,
            "state": self.model_status(mv),
        }

    def models_json(self) -> Sequence[dict[str, Any]]:
        """Every model in name order, each rendered only when read: a page of
        a large catalog costs the page (``len`` and slices are cheap)."""
        return _Rendered(self, self.index.names(), self.services_by_model())

    def nodes_json(self) -> list[dict[str, Any]]:
        now = trio.current_time()
        held: dict[str, set[str]] = {}
        for mv in self.index.all().values():
            for d in mv.locations:
                held.setdefault(_node_of(d), set()).add(mv.name)
        out = []
        for m in sorted(self.mesh.members(), key=lambda m: m.record.node_id):
            r = m.record
            out.append(
                {
                    "node_id": r.node_id,
                    "address": r.address,
                    "state": r.state.label,
                    "generation": r.generation,
                    "incarnation": r.incarnation,
                    "last_change_s": round(max(now - m.since, 0.0), 3),
                    "storage": self.mesh.get(r.node_id, STORAGE_KEY) or {},
                    **self._gpus_of(r.node_id),
                    "models": sorted(held.get(r.node_id, ())),
                    "labels": self._labels_of(r.node_id),
                    "self": r.node_id == self.mesh.id,
                }
            )
        return out

    def _gpu_record(self, node_id: str) -> GpusRecord | None:
        try:
            raw = self.mesh.get(node_id, GPUS_KEY)
            return None if raw is None else GpusRecord.from_value(raw)
        except RecordError:
            return None

    def _pools_of(self, node_id: str, services: list[ServiceRecord]) -> list[Pool]:
        rec = self._gpu_record(node_id)
        return pools(node_id, [g.index for g in rec.gpus] if rec is not None else [], services)

    def nodes_v2_json(self, scheme: str = "http") -> list[dict[str, Any]]:
        """``/v2/nodes`` in llama-orch's shape: each node, whether it is
        online, its pools (one per GPU) and its GPUs as capabilities."""
        services = [x for xs in self.services_by_model().values() for x in xs]
        out = []
        for m in sorted(self.mesh.members(), key=lambda m: m.record.node_id):
            r = m.record
            rec = self._gpu_record(r.node_id)
            gpus = [{"index": g.index, "uuid": g.uuid, "name": g.name, "vram_total_bytes": g.total_bytes,
                     "vram_free_bytes": g.free_bytes} for g in (rec.gpus if rec is not None else ())]
            out.append({
                "node_id": r.node_id,
                "address": f"{scheme}://{r.address}",
                "online": self.mesh.online(r.node_id),
                "pools": [p.to_value() for p in self._pools_of(r.node_id, services)],
                "capabilities": {"gpus": gpus, "labels": self._labels_of(r.node_id)},
            })
        return out

    def _labels_of(self, node_id: str) -> dict[str, str]:
        try:
            return dict(NodeInfo.from_value(self.mesh.get(node_id, NODE_KEY)).labels)
        except RecordError:  # not heard of yet, or a bad record: no labels
            return {}

    def _gpus_of(self, node_id: str) -> dict[str, Any]:
        """``gpus`` (a list, empty without any) and ``gpu_status`` (where the
        figures come from, when they were read, whether reads fail)."""
        raw = self.mesh.get(node_id, GPUS_KEY)
        if raw is None:
            return {"gpus": [], "gpu_status": None}
        try:
            rec = GpusRecord.from_value(raw)
        except RecordError as e:
            return {"gpus": [], "gpu_status": {"error": f"unreadable record: {e}"}}
        return {"gpus": [g.to_value() for g in rec.gpus],
                "gpu_status": {"source": rec.source, "read_ms": rec.read_ms, "stale": rec.stale, "error": rec.error}}

    def availability_json(self, scheme: str = "http") -> dict[str, Any]:
        models = self.index.all()
        members = [m.record for m in self.mesh.members()]
        online = {r.node_id for r in members if self.mesh.online(r.node_id)}
        av = availability(models, [r.node_id for r in members], online)
        services = [x for xs in self.services_by_model().values() for x in xs]
        nodes = {
            r.node_id: {
                "node_id": r.node_id,
                "address": f"{scheme}://{r.address}",
                "online": r.node_id in online,
                "models": av.models_by_node[r.node_id],
                "pools": [p.to_value() for p in self._pools_of(r.node_id, services)],
            }
            for r in members
        }
        return {
            "nodes": nodes,
            "total_models": len(models),
            "replicated_models": av.replicated,
            "single_node_models": av.single_node,
        }

    def status_json(self) -> dict[str, Any]:
        counts = {s.label: 0 for s in MemberState}
        for m in self.mesh.members():
            counts[m.state.label] += 1
        if self.mesh.left:
            counts["alive"] -= 1
            counts["left"] += 1
        counts["total"] = sum(counts.values())
        av = self.availability_json()
        storages = []
        for _nid, _key, value in self.mesh.items(STORAGE_KEY):
            try:
                storages.append(Storage.from_value(value))
            except RecordError:
                continue
        return {
            "node_id": self.mesh.id,
            "cluster": self.mesh.cluster,
            "nodes": counts,
            "models": {
                "total": av["total_models"],
                "replicated": len(av["replicated_models"]),
                "single_node": len(av["single_node_models"]),
            },
            "storage": storage_totals(storages),
            "jobs": {},
        }
