"""One origin's keys in the catalog: ``NodeState`` and its indexes.

A ``NodeState`` holds one node's keys at one generation (``Entry``: value,
version, tombstone), its digest figures, the shadow of its previous
generation, and two indexes kept up to date on every write: the entries by
version (what a delta reads, ``since``) and the keys by family (what a
prefix read walks, ``in_family``).  The catalog (``catalog.py``) merges
and gossips these; this module only holds them.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .wire import NodeDigest

__all__ = ["GENERATION_KEY", "Entry", "NodeState", "family"]

# Written by every node on start, above all it restored: ``{"generation": G,
# "version": V}`` says generation G holds the restored state up to version V.
GENERATION_KEY = "generation"


def family(key: str) -> str:
    """A key's family: up to its first "/" ("reg/" of "reg/m"), or the key itself."""
    i = key.find("/")
    return key if i < 0 else key[: i + 1]


@dataclass(slots=True)
class Entry:
    value: Any
    version: int
    tombstone: bool
    seen_at: float  # local time the version was written or learned (for tombstone GC)
    size: int  # approximate bytes on the wire; -1 until a delta first needs it (``catalog._size``)


@dataclass(slots=True)
class NodeState:
    node_id: str
    generation: int
    max_version: int = 0
    last_gc_version: int = 0
    entries: dict[str, Entry] | None = None
    # An older generation's live values, readable until this generation's
    # state is whole (``GENERATION_KEY``); local only, never gossiped.
    shadow: dict[str, Any] | None = None
    # The entries by version, ascending (``since``): versions and their keys,
    # with the stale pairs overwrites and collection leave, swept out when
    # they outnumber the live ones.  So a delta costs what it carries, not a
    # sort of every key the node holds.
    _order_v: list[int] = field(default_factory=list)
    _order_k: list[str] = field(default_factory=list)
    _order_sorted: bool = True
    # The keys by family (``family``: "reg/", "copy/", ...), in the order of
    # ``keys``: so ``Catalog.items(prefix)`` reads the family it asks for,
    # not every key (100,000 registrations beside a few services).
    _families: dict[str, dict[str, None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.entries is None:
            self.entries = {}
        elif self.entries:
            self._order_sorted = False
            for k in self.entries:
                self._families.setdefault(family(k), {})[k] = None

    @property
    def keys(self) -> dict[str, Entry]:
        assert self.entries is not None
        return self.entries

    def put(self, key: str, e: Entry) -> None:
        """Hold ``e`` for ``key`` (every write to ``keys`` goes through here)."""
        if key not in self.keys:
            self._families.setdefault(family(key), {})[key] = None
        self.keys[key] = e
        vs = self._order_v
        if vs and e.version <= vs[-1]:
            self._order_sorted = False
        vs.append(e.version)
        self._order_k.append(key)
        if len(vs) > 2 * len(self.keys) + 1024:
            self._reindex()

    def drop(self, key: str) -> None:
        """Forget ``key`` (tombstone collection: every removal goes through here)."""
        del self.keys[key]
        fam = self._families.get(family(key))
        if fam is not None:
            fam.pop(key, None)

    def in_family(self, prefix: str) -> Iterator[tuple[str, Entry]]:
        """``(key, entry)`` of the keys starting with ``prefix``, in ``keys``'s order."""
        f = family(prefix)
        if f.endswith("/"):
            keys = self.keys
            for k in self._families.get(f, ()):
                if k.startswith(prefix):
                    yield k, keys[k]
        else:  # no family in the prefix ("" or a bare word): every key
            for k, e in self.keys.items():
                if k.startswith(prefix):
                    yield k, e

    def _reindex(self) -> None:
        pairs = sorted((e.version, k) for k, e in self.keys.items())
        self._order_v = [v for v, _ in pairs]
        self._order_k = [k for _, k in pairs]
        self._order_sorted = True

    def since(self, version: int) -> Iterator[tuple[int, str, Entry]]:
        """``(version, key, entry)`` of every entry above ``version``, in version order."""
        if not self._order_sorted:
            self._reindex()
        vs, ks, keys = self._order_v, self._order_k, self.keys
        for i in range(bisect_right(vs, version), len(vs)):
            k = ks[i]
            e = keys.get(k)
            if e is not None and e.version == vs[i]:
                yield vs[i], k, e

    def digest(self) -> NodeDigest:
        return NodeDigest(self.generation, self.max_version, self.last_gc_version)

    def visible(self) -> dict[str, Any]:
        """Every live value as a reader sees it: the keys, over the shadow."""
        out = {} if self.shadow is None else dict(self.shadow)
        for k, e in self.keys.items():
            if e.tombstone:
                out.pop(k, None)
            else:
                out[k] = e.value
        return out

    @property
    def whole(self) -> bool:
        """This generation announced its start and we hold everything up to it."""
        e = self.keys.get(GENERATION_KEY)
        return (
            e is not None
            and not e.tombstone
            and isinstance(e.value, dict)
            and e.value.get("generation") == self.generation
        )
