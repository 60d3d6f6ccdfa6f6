"""The read view: what the catalog says about models, resolved the same way
on every node.

Keys that several nodes may write for one model live in each writer's own
keyspace, stamped with the writer's HLC (their records are in ``keys``):
``reg/<model>`` (``RegRecord``: a registration or an unregistration, and
``since``, the stamp at which the current registration began) and
``loc/<model>@<device>`` (``LocRecord``: a location added or dropped by hand)
and ``pin/<model>`` (``PinRecord``: its replica policy, which counts, like a
location, only if written at or after ``since``).

For each model the record with the highest stamp wins (last writer wins), so
concurrent writes on both sides of a partition converge to one answer with no
coordinator.  A location counts only if it was recorded at or after the
registration's ``since``, so unregistering clears a model's locations.

Copies a node actually holds are its own single-writer keys,
``copy/<model>@<kind>`` (``CopyRecord``); they are locations too, reported by
the only node that can know.

``ModelIndex`` keeps these keys by model as the catalog changes (it is a
catalog listener), so that reading or writing one model costs what that model
holds, not what the whole catalog holds; each model is resolved again only
when one of its keys changed, by ``resolve_models`` over its own keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .hlc import Stamp
from .keys import (
    PIN_PREFIX,
    REG_PREFIX,
    CopyRecord,
    LocOp,
    LocRecord,
    PinRecord,
    RecordError,
    RegOp,
    RegRecord,
    model_of_key,
    parse_copy_key,
    parse_loc_key,
)
from .replicas import ReplicaPolicy

__all__ = ["CopyView", "ModelIndex", "ModelView", "resolve_models"]


@dataclass(frozen=True, slots=True)
class CopyView:
    device: str
    manifest_hash: str
    size: int
    sha256: str | None = None


@dataclass(slots=True)
class ModelView:
    name: str
    model_type: str | None
    source_url: str | None
    metadata: Mapping[str, Any]
    registered_by: str
    stamp: Stamp
    since: Stamp
    locations: list[str] = field(default_factory=list)
    copies: list[CopyView] = field(default_factory=list)
    newest: Stamp | None = None  # the newest stamp of its registration, its location and pin records
    policy: ReplicaPolicy | None = None  # how many copies the mesh keeps (``meshnode pin``)

    @property
    def seen(self) -> Stamp:
        """What a write about this model must be stamped after to win over all of it."""
        return self.stamp if self.newest is None or self.newest < self.stamp else self.newest

    @property
    def size(self) -> int | None:
        sizes = [c.size for c in self.copies]
        return max(sizes) if sizes else None


def resolve_models(items: Iterable[tuple[str, str, Any]]) -> dict[str, ModelView]:
    """Resolve ``(node_id, key, value)`` catalog items into registered models.
    Values that are not their key's record are skipped."""
    regs: dict[str, tuple[RegRecord, str]] = {}
    locs: dict[tuple[str, str], LocRecord] = {}
    pins: dict[str, PinRecord] = {}
    copies: list[tuple[str, CopyView]] = []
    for node_id, key, value in items:
        try:
            if key.startswith(REG_PREFIX):
                reg = RegRecord.from_value(value)
                name = key[len(REG_PREFIX) :]
                cur = regs.get(name)
                if cur is None or reg.stamp > cur[0].stamp:
                    regs[name] = (reg, node_id)
            elif key.startswith(PIN_PREFIX):
                pin = PinRecord.from_value(value)
                name = key[len(PIN_PREFIX) :]
                cur_pin = pins.get(name)
                if cur_pin is None or pin.stamp > cur_pin.stamp:
                    pins[name] = pin
            elif (at := parse_loc_key(key)) is not None:
                loc = LocRecord.from_value(value)
                cur_loc = locs.get(at)
                if cur_loc is None or loc.stamp > cur_loc.stamp:
                    locs[at] = loc
            elif (held := parse_copy_key(key)) is not None:
                c = CopyRecord.from_value(value)
                copies.append((held[0], CopyView(f"{node_id}:{held[1]}", c.manifest_hash, c.size, c.sha256)))
        except RecordError:
            continue
    out: dict[str, ModelView] = {}
    for name, (reg, node_id) in regs.items():
        if reg.op is not RegOp.REGISTER:
            continue
        out[name] = ModelView(
            name=name,
            model_type=reg.model_type,
            source_url=reg.source_url,
            metadata=reg.metadata,
            registered_by=node_id,
            stamp=reg.stamp,
            since=reg.since,
        )
    for name, pin in pins.items():
        mv = out.get(name)
        if mv is None:
            continue
        if mv.newest is None or pin.stamp > mv.newest:
            mv.newest = pin.stamp
        if pin.stamp >= mv.since:
            mv.policy = pin.policy
    for (name, device), loc in sorted(locs.items()):
        mv = out.get(name)
        if mv is None:
            continue
        if mv.newest is None or loc.stamp > mv.newest:
            mv.newest = loc.stamp
        if loc.op is not LocOp.ADD or loc.stamp < mv.since:
            continue
        mv.locations.append(device)
    for name, cv in sorted(copies, key=lambda x: (x[0], x[1].device)):
        mv = out.get(name)
        if mv is None:
            continue
        mv.copies.append(cv)
        if cv.device not in mv.locations:
            mv.locations.append(cv.device)
    for mv in out.values():
        mv.locations.sort()
    return out


class ModelIndex:
    """The catalog's model keys by model, and each model's resolved view,
    kept up to date by catalog changes (see ``Catalog.subscribe``)."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[tuple[str, str], Any]] = {}  # model -> (node, key) -> value
        self._by_node: dict[str, dict[str, str]] = {}  # node -> key -> model
        self._views: dict[str, ModelView] = {}
        self._dirty: set[str] = set()
        self._names: list[str] | None = None  # sorted, until a model comes or goes

    # -- catalog listener -------------------------------------------------------

    def key_changed(self, node_id: str, key: str, value: Any | None) -> None:
        model = model_of_key(key)
        if model is None:
            return
        entries = self._entries.setdefault(model, {})
        keys = self._by_node.setdefault(node_id, {})
        if value is None:
            entries.pop((node_id, key), None)
            keys.pop(key, None)
        else:
            entries[(node_id, key)] = value
            keys[key] = model
        self._dirty.add(model)

    def node_cleared(self, node_id: str) -> None:
        for key, model in self._by_node.pop(node_id, {}).items():
            entries = self._entries.get(model)
            if entries is not None:
                entries.pop((node_id, key), None)
            self._dirty.add(model)

    # -- reading -------------------------------------------------------------------

    def _refresh(self, model: str) -> None:
        self._dirty.discard(model)
        had = model in self._views
        entries = self._entries.get(model)
        view = None
        if not entries:
            self._entries.pop(model, None)
        else:
            view = resolve_models((nid, key, value) for (nid, key), value in entries.items()).get(model)
        if view is None:
            self._views.pop(model, None)
        else:
            self._views[model] = view
        if (view is not None) != had:
            self._names = None

    def get(self, model: str) -> ModelView | None:
        """The registered model ``model``, or None."""
        if model in self._dirty:
            self._refresh(model)
        return self._views.get(model)

    def all(self) -> dict[str, ModelView]:
        """Every registered model (a live mapping: do not change it)."""
        for model in list(self._dirty):
            self._refresh(model)
        return self._views

    def names(self) -> list[str]:
        """Every registered model's name, sorted: kept until a model comes or
        goes, so that a page of 100 out of 100,000 costs its 100 (do not change it)."""
        views = self.all()
        if self._names is None:
            self._names = sorted(views)
        return self._names
