"""The read view: what the catalog says about models, resolved the same way
on every node.

Keys that several nodes may write for one model live in each writer's own
keyspace, stamped with the writer's HLC:

* ``reg/<model>``: ``{"stamp", "since", "op": "register" | "unregister",
  "model_type", "source_url", "metadata"}``; ``since`` is the stamp at which
  the current registration began (re-registering keeps it).
* ``loc/<model>@<device>``: ``{"stamp", "op": "add" | "drop"}``

For each model the record with the highest stamp wins (last writer wins), so
concurrent writes on both sides of a partition converge to one answer with no
coordinator.  A location counts only if it was recorded at or after the
registration's ``since``, so unregistering clears a model's locations.

Copies a node actually holds are its own single-writer keys,
``copy/<model>@<kind>``: ``{"manifest_hash", "size", "files", "published_ms"}``;
they are locations too, reported by the only node that can know.

``ModelIndex`` keeps these keys by model as the catalog changes (it is a
catalog listener), so that reading or writing one model costs what that model
holds, not what the whole catalog holds; each model is resolved again only
when one of its keys changed, by ``resolve_models`` over its own keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .hlc import Stamp

__all__ = [
    "COPY_PREFIX",
    "LOC_PREFIX",
    "REG_PREFIX",
    "CopyView",
    "ModelIndex",
    "ModelView",
    "copy_key",
    "loc_key",
    "model_of_key",
    "reg_key",
    "resolve_models",
]

REG_PREFIX = "reg/"
LOC_PREFIX = "loc/"
COPY_PREFIX = "copy/"


def reg_key(model: str) -> str:
    return REG_PREFIX + model


def loc_key(model: str, device: str) -> str:
    return f"{LOC_PREFIX}{model}@{device}"


def copy_key(model: str, kind: str) -> str:
    return f"{COPY_PREFIX}{model}@{kind}"


@dataclass(frozen=True, slots=True)
class CopyView:
    device: str
    manifest_hash: str
    size: int


@dataclass(slots=True)
class ModelView:
    name: str
    model_type: str | None
    source_url: str | None
    metadata: dict[str, Any]
    registered_by: str
    stamp: Stamp
    since: Stamp
    locations: list[str] = field(default_factory=list)
    copies: list[CopyView] = field(default_factory=list)

    @property
    def size(self) -> int | None:
        sizes = [c.size for c in self.copies]
        return max(sizes) if sizes else None


def _stamp(v: Any, field_name: str = "stamp") -> Stamp | None:
    if not isinstance(v, dict):
        return None
    try:
        return Stamp.from_wire(v.get(field_name))
    except Exception:
        return None


def resolve_models(items: Iterable[tuple[str, str, Any]]) -> dict[str, ModelView]:
    """Resolve ``(node_id, key, value)`` catalog items into registered models."""
    regs: dict[str, tuple[Stamp, str, dict[str, Any]]] = {}
    locs: dict[tuple[str, str], tuple[Stamp, str]] = {}
    copies: list[tuple[str, CopyView]] = []
    for node_id, key, value in items:
        if key.startswith(COPY_PREFIX):
            name, sep, kind = key[len(COPY_PREFIX) :].rpartition("@")
            if sep and isinstance(value, dict):
                h, size = value.get("manifest_hash"), value.get("size")
                if isinstance(h, str) and isinstance(size, int):
                    copies.append((name, CopyView(f"{node_id}:{kind}", h, size)))
            continue
        stamp = _stamp(value)
        if stamp is None:
            continue
        if key.startswith(REG_PREFIX):
            name = key[len(REG_PREFIX) :]
            cur = regs.get(name)
            if cur is None or stamp > cur[0]:
                regs[name] = (stamp, node_id, value)
        elif key.startswith(LOC_PREFIX):
            name, sep, device = key[len(LOC_PREFIX) :].rpartition("@")
            if not sep:
                continue
            op = value.get("op")
            cur_loc = locs.get((name, device))
            if cur_loc is None or stamp > cur_loc[0]:
                locs[(name, device)] = (stamp, str(op))
    out: dict[str, ModelView] = {}
    for name, (stamp, node_id, value) in regs.items():
        if value.get("op") != "register":
            continue
        meta = value.get("metadata")
        out[name] = ModelView(
            name=name,
            model_type=value.get("model_type") if isinstance(value.get("model_type"), str) else None,
            source_url=value.get("source_url") if isinstance(value.get("source_url"), str) else None,
            metadata=meta if isinstance(meta, dict) else {},
            registered_by=node_id,
            stamp=stamp,
            since=_stamp(value, "since") or stamp,
        )
    for (name, device), (stamp, op) in sorted(locs.items()):
        mv = out.get(name)
        if mv is None or op != "add" or stamp < mv.since:
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


def model_of_key(key: str) -> str | None:
    """The model a ``reg/``, ``loc/`` or ``copy/`` key is about; None for other keys."""
    if key.startswith(REG_PREFIX):
        return key[len(REG_PREFIX) :]
    for prefix in (LOC_PREFIX, COPY_PREFIX):
        if key.startswith(prefix):
            name, sep, _ = key[len(prefix) :].rpartition("@")
            return name if sep else None
    return None


class ModelIndex:
    """The catalog's model keys by model, and each model's resolved view,
    kept up to date by catalog changes (see ``Catalog.subscribe``)."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[tuple[str, str], Any]] = {}  # model -> (node, key) -> value
        self._by_node: dict[str, dict[str, str]] = {}  # node -> key -> model
        self._views: dict[str, ModelView] = {}
        self._dirty: set[str] = set()

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
        entries = self._entries.get(model)
        if not entries:
            self._entries.pop(model, None)
            self._views.pop(model, None)
            return
        view = resolve_models((nid, key, value) for (nid, key), value in entries.items()).get(model)
        if view is None:
            self._views.pop(model, None)
        else:
            self._views[model] = view

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
