"""What the public API does, over the gossip state machine: model
registration, locations, and the read views (nodes, models, availability).

Everything here is synchronous and quick; the daemon passes the clock in.
Writes go to this node's own catalog keys, stamped with its HLC, and are
resolved last-writer-wins on every node (``protocol.view``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from protocol import (
    HLC,
    ClockSkewError,
    GossipNode,
    MemberState,
    ModelView,
    Stamp,
    loc_key,
    parse_device,
    reg_key,
    validate_model_name,
)
from protocol.view import ModelIndex

from .errors import MeshError

__all__ = ["MeshService", "Write"]

log = logging.getLogger("meshnode.service")

METADATA_FILES_MAX = 200  # registration metadata lists at most this many file names


Write = tuple[str, Any]  # a catalog key and its new value (None: delete it)


@dataclass
class Clock:
    """monotonic seconds for timers, wall milliseconds for stamps."""

    mono: float
    wall_ms: int


def _model_name(name: str) -> str:
    try:
        return validate_model_name(name)
    except ValueError as e:
        raise MeshError("INVALID_MODEL_NAME", str(e)) from None


_DESC_MAX = 4096
_TAGS_MAX = 64


def _clean_metadata(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MeshError("INVALID_REQUEST", "metadata must be an object")
    out: dict[str, Any] = {}
    desc = raw.get("description")
    if desc is not None:
        if not isinstance(desc, str) or len(desc) > _DESC_MAX:
            raise MeshError("INVALID_REQUEST", f"metadata.description must be a string of at most {_DESC_MAX} characters")
        out["description"] = desc
    tags = raw.get("tags")
    if tags is not None:
        if not isinstance(tags, list) or len(tags) > _TAGS_MAX or not all(isinstance(t, str) and 0 < len(t) <= 64 for t in tags):
            raise MeshError("INVALID_REQUEST", f"metadata.tags must be a list of at most {_TAGS_MAX} short strings")
        out["tags"] = tags
    req = raw.get("requirements")
    if req is not None:
        if not isinstance(req, dict):
            raise MeshError("INVALID_REQUEST", "metadata.requirements must be an object")
        clean: dict[str, Any] = {}
        for k in ("min_memory", "min_vram"):
            v = req.get(k)
            if v is not None:
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**63:
                    raise MeshError("INVALID_REQUEST", f"metadata.requirements.{k} must be a number of bytes below 2**63")
                clean[k] = v
        arch = req.get("gpu_arch")
        if arch is not None:
            if not isinstance(arch, str) or len(arch) > 64:
                raise MeshError("INVALID_REQUEST", "metadata.requirements.gpu_arch must be a short string")
            clean["gpu_arch"] = arch
        unknown = set(req) - {"min_memory", "min_vram", "gpu_arch"}
        if unknown:
            raise MeshError("INVALID_REQUEST", f"unknown requirements: {', '.join(sorted(unknown))[:200]}")
        out["requirements"] = clean
    rev = raw.get("revision")
    if rev is not None:
        if not isinstance(rev, str) or len(rev) > 64:
            raise MeshError("INVALID_REQUEST", "metadata.revision must be a string of at most 64 characters")
        out["revision"] = rev
    files = raw.get("files")
    if files is not None:
        if not isinstance(files, list) or len(files) > METADATA_FILES_MAX or not all(isinstance(f, str) and 0 < len(f) <= 1024 for f in files):
            raise MeshError("INVALID_REQUEST", f"metadata.files must be a list of at most {METADATA_FILES_MAX} paths")
        out["files"] = files
    count = raw.get("file_count")
    if count is not None:
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count < 2**63:
            raise MeshError("INVALID_REQUEST", "metadata.file_count must be a count below 2**63")
        out["file_count"] = count
    unknown = set(raw) - {"description", "tags", "requirements", "revision", "files", "file_count"}
    if unknown:
        raise MeshError("INVALID_REQUEST", f"unknown metadata fields: {', '.join(sorted(unknown))[:200]}")
    return out


class MeshService:
    def __init__(self, gossip: GossipNode, hlc: HLC, index: ModelIndex) -> None:
        self.gossip = gossip
        self.hlc = hlc
        self.index = index  # subscribed to gossip's catalog

    @property
    def node_id(self) -> str:
        return self.gossip.id

    # -- reads ---------------------------------------------------------------

    def models(self) -> dict[str, ModelView]:
        """Every registered model (a live mapping: do not change it)."""
        return self.index.all()

    def model(self, name: str) -> ModelView:
        name = _model_name(name)
        mv = self.index.get(name)
        if mv is None:
            raise MeshError("MODEL_NOT_FOUND", f"model {name!r} is not registered")
        return mv

    def state_of(self, node_id: str) -> MemberState | None:
        m = self.gossip.members.get(node_id)
        return None if m is None else m.state

    def _online(self, node_id: str) -> bool:
        return self.state_of(node_id) is MemberState.ALIVE or (
            node_id == self.node_id and not self.gossip.left
        )

    def model_status(self, mv: ModelView) -> str:
        if not mv.locations:
            return "registered"
        if any(self._online(d.split(":", 1)[0]) for d in mv.locations if ":" in d):
            return "available"
        return "unavailable"

    def model_json(self, mv: ModelView, *, full: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_name": mv.name,
            "model_type": mv.model_type,
            "size": mv.size,
            "locations": mv.locations,
            "services": [],
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
                     "status": "ready", "online": self._online(c.device.split(":", 1)[0])}
                    for c in mv.copies
                ],
            )
        return out

    def nodes_json(self, now: float) -> list[dict[str, Any]]:
        models = self.models()
        held: dict[str, list[str]] = {}
        for mv in models.values():
            for d in mv.locations:
                held.setdefault(d.split(":", 1)[0], []).append(mv.name)
        cat = self.gossip.catalog
        out = []
        for m in sorted(self.gossip.members, key=lambda m: m.record.node_id):
            r = m.record
            out.append(
                {
                    "node_id": r.node_id,
                    "address": r.address,
                    "state": r.state.label,
                    "generation": r.generation,
                    "incarnation": r.incarnation,
                    "last_change_s": round(max(now - m.since, 0.0), 3),
                    "storage": cat.get(r.node_id, "storage") or {},
                    "gpus": cat.get(r.node_id, "gpus") or [],
                    "models": sorted(set(held.get(r.node_id, []))),
                    "self": r.node_id == self.node_id,
                }
            )
        return out

    def availability_json(self) -> dict[str, Any]:
        models = self.models()
        nodes: dict[str, dict[str, Any]] = {}
        for m in self.gossip.members:
            r = m.record
            nodes[r.node_id] = {
                "node_id": r.node_id,
                "address": f"http://{r.address}",
                "online": self._online(r.node_id),
                "models": [],
                "pools": [],
            }
        for mv in models.values():
            for nid in sorted({d.split(":", 1)[0] for d in mv.locations if ":" in d}):
                if nid in nodes:
                    nodes[nid]["models"].append(mv.name)
        online = [n for n in nodes.values() if n["online"]]
        replicated, single = [], []
        for name in sorted(models):
            holders = [n for n in online if name in n["models"]]
            if len(holders) == 1:
                single.append(name)
            elif len(holders) >= 2 and len(holders) == len(online):
                replicated.append(name)
        return {
            "nodes": nodes,
            "total_models": len(models),
            "replicated_models": replicated,
            "single_node_models": single,
        }

    def status_json(self) -> dict[str, Any]:
        counts = {s.label: 0 for s in MemberState}
        for m in self.gossip.members:
            counts[m.state.label] += 1
        if self.gossip.left:
            counts["alive"] -= 1
            counts["left"] += 1
        counts["total"] = sum(counts.values())
        av = self.availability_json()
        storage: dict[str, dict[str, int]] = {}
        for _nid, _key, value in self.gossip.catalog.items("storage"):
            if isinstance(value, dict):
                for dev, usage in value.items():
                    if isinstance(usage, dict):
                        t = storage.setdefault(dev, {"total": 0, "used": 0, "free": 0})
                        for k in t:
                            v = usage.get(k)
                            if isinstance(v, int):
                                t[k] += v
        return {
            "node_id": self.node_id,
            "cluster": self.gossip.config.cluster,
            "nodes": counts,
            "models": {
                "total": av["total_models"],
                "replicated": len(av["replicated_models"]),
                "single_node": len(av["single_node_models"]),
            },
            "storage": storage,
            "services": 0,
            "jobs": {},
        }

    # -- writes --------------------------------------------------------------

    # Writes are computed here and applied by the daemon's ``commit``, which
    # puts them on disk before they enter the catalog.  Each returns the
    # catalog writes, ``[(key, value)]``.

    def register(self, name: str, body: Any, clock: Clock) -> list[Write]:
        name = _model_name(name)
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise MeshError("INVALID_REQUEST", "request body must be a JSON object")
        unknown = set(body) - {"model_type", "source_url", "metadata"}
        if unknown:
            raise MeshError("INVALID_REQUEST", f"unknown fields: {', '.join(sorted(unknown))[:200]}")
        model_type = body.get("model_type")
        if model_type is not None and (not isinstance(model_type, str) or not 0 < len(model_type) <= 64):
            raise MeshError("INVALID_REQUEST", "model_type must be a string of 1 to 64 characters")
        source_url = body.get("source_url")
        if source_url is not None and (not isinstance(source_url, str) or len(source_url) > 2048):
            raise MeshError("INVALID_REQUEST", "source_url must be a string of at most 2048 characters")
        metadata = _clean_metadata(body.get("metadata"))
        existing = self.index.get(name)
        if existing is not None:
            self._observe(existing.stamp, clock)  # a write after a read wins over what it read
        stamp = self.hlc.now(clock.wall_ms)
        since = existing.since if existing is not None else stamp
        value = {
            "stamp": stamp.to_wire(),
            "since": since.to_wire(),
            "op": "register",
            "model_type": model_type,
            "source_url": source_url,
            "metadata": metadata,
        }
        return [(reg_key(name), value)]

    def _observe(self, stamp: Stamp, clock: Clock) -> None:
        try:
            self.hlc.observe(stamp, clock.wall_ms)
        except ClockSkewError as e:
            log.warning("not following a stamp from the future: %s", e)

    def unregister(self, name: str, clock: Clock, *, purge: bool = False) -> tuple[list[str], list[Write]]:
        """Unregister; with ``purge`` also drop every recorded copy.  The dropped devices, and the writes."""
        mv = self.model(name)
        self._observe(mv.stamp, clock)
        dropped = []
        writes: list[Write] = []
        if purge:
            for dev in mv.locations:
                stamp = self.hlc.now(clock.wall_ms)
                writes.append((loc_key(mv.name, dev), {"stamp": stamp.to_wire(), "op": "drop"}))
                dropped.append(dev)
        stamp = self.hlc.now(clock.wall_ms)
        writes.append((reg_key(mv.name), {"stamp": stamp.to_wire(), "since": stamp.to_wire(), "op": "unregister"}))
        return dropped, writes

    def _device(self, device: str) -> str:
        try:
            d = parse_device(device)
        except ValueError as e:
            raise MeshError("INVALID_DEVICE", str(e)) from None
        if d.is_web:
            raise MeshError("INVALID_DEVICE", "'web' is a source, not a place a copy can live")
        assert d.node_id is not None
        if d.node_id not in self.gossip.members:
            raise MeshError("NODE_NOT_FOUND", f"no node {d.node_id!r} is known to the mesh")
        return str(d)

    def set_location(self, name: str, device: str, present: bool, clock: Clock) -> tuple[str, list[Write]]:
        mv = self.model(name)
        self._observe(mv.stamp, clock)
        dev = self._device(device)
        if not present and dev not in mv.locations:
            raise MeshError("LOCATION_NOT_FOUND", f"model {mv.name!r} has no copy recorded on {dev}")
        stamp = self.hlc.now(clock.wall_ms)
        return dev, [(loc_key(mv.name, dev), {"stamp": stamp.to_wire(), "op": "add" if present else "drop"})]
