"""Who pulls from whom in a swarm: bounded neighbour sets that every node
derives alike, with no tracker.

Theory of operation
-------------------
A receiver in a swarm of N does not pull from every holder: each holder's
upload would be split N ways, and every receiver would have to hear of
every other one's chunks (N² progress messages).  It pulls from a few
*neighbours*, and only neighbours tell each other what they hold.  No
tracker picks them: every node computes the same graph from what the
catalog already says: the manifest's holders (complete, or pulling it now),
and each node's ``rack`` label.

* **Groups, racks first.**  The members with one ``rack`` label form a
  group (no label: the group ``""``).  A node's neighbours are in its own
  group, but for a few gateways (below).
* **Rings.**  In a group of more than ``FULL_MESH_MAX`` members there are
  ``RINGS`` rings: on ring ``i`` the members are in the order of their
  rendezvous score ``xxh3(key, i, node)`` (``key`` is the manifest hash, so
  each copy gets its own graph), and each member neighbours the one before
  and the one after it.  So a node has ``2 * RINGS`` neighbours in its
  group (see Bounds); the graph is symmetric by construction, connected whatever
  the hashes (each ring alone visits every member), and, as a union of
  random Hamiltonian cycles, an expander with high probability: a chunk
  reaches everyone within O(log N) hops, and the graph stays connected
  when a few members vanish before the others notice.  A member that joins
  or leaves moves only the edges next to it.  A smaller group is a full
  mesh.
* **Gateways.**  With more than one group, chunk ``c`` belongs to class
  ``c % GATEWAYS``.  Each group's gateway for class ``j`` is its ``j``-th
  member by rendezvous score (it stays the gateway when it completes); the class-``j``
  gateways, one per group, form rings of their own (``CROSS_RINGS``, the
  same rule), and an edge between groups carries only its classes' chunks.
  A chunk thus enters each rack through one gateway: the rack pulls the
  copy across its uplink once.  Every group has a gateway for every class
  and every ring is connected, so every chunk reaches every group.
* **Seeds.**  A complete holder serves each chunk once before any twice:
  its pulling neighbours split the chunks it may send them round-robin
  (``share``), and each asks it only for its own share until it holds that
  share (then for anything).  The shares partition every chunk the holder
  may send, so nothing waits on a chunk nobody asks it for.

Bounds: ``2 * RINGS`` neighbours in the group (a few have one more: where
two rings give the same edge, members left short are paired up, so nobody
has fewer), plus ``2 * CROSS_RINGS`` (+1) per class a node is the gateway
of: ``MAX_NEIGHBOURS`` in all; so with one request in flight per neighbour, a holder has at most
``MAX_NEIGHBOURS`` uploads in flight to the swarm (its upload slots).
Cost: O(N log N) per group to build (cached, bounded), O(1) per lookup;
``share`` is O(n_chunks).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from functools import lru_cache

import xxhash

__all__ = [
    "CROSS_RINGS",
    "FULL_MESH_MAX",
    "GATEWAYS",
    "MAX_NEIGHBOURS",
    "RINGS",
    "SwarmGraph",
    "allowed_mask",
]

RINGS = 4  # rendezvous rings in a group: 2 * RINGS neighbours there (+1 for a few)
FULL_MESH_MAX = 2 * RINGS + 1  # a group this small is a full mesh (each member has <= 2 * RINGS others)
GATEWAYS = 4  # classes of chunks, and gateways per group, when there are several groups
CROSS_RINGS = 2  # rings among the gateways of one class
MAX_NEIGHBOURS = 2 * RINGS + 1 + GATEWAYS * (2 * CROSS_RINGS + 1)

Classes = frozenset[int] | None  # the chunk classes an edge carries; None: every chunk


def _score(tag: str, node: str) -> int:
    return xxhash.xxh3_64_intdigest(f"{tag}\x00{node}".encode())


@lru_cache(maxsize=64)
def _rings(tag: str, members: tuple[str, ...], rings: int) -> dict[str, frozenset[str]]:
    """Each member's neighbours: the full mesh when small, else the members
    before and after it on each rendezvous ring.  ``members`` sorted."""
    if len(members) <= 2 * rings + 1:
        everyone = frozenset(members)
        return {m: everyone - {m} for m in members}
    out: dict[str, set[str]] = {m: set() for m in members}
    for i in range(rings):
        ring_tag = f"{tag}\x00{i}"
        order = sorted(members, key=lambda m: _score(ring_tag, m))
        for a, b in zip(order, order[1:] + order[:1], strict=True):
            out[a].add(b)
            out[b].add(a)
    # Where two rings gave the same edge a member has fewer than 2 * rings
    # neighbours (a smaller share of the uploads around it): such members
    # are paired with each other, in the order of one more score, so every
    # member has 2 * rings neighbours (a few 2 * rings + 1).
    short = sorted((m for m in members if len(out[m]) < 2 * rings), key=lambda m: _score(f"{tag}\x00fill", m))
    for _ in range(rings):
        left: list[str] = []
        for a in short:
            if len(out[a]) >= 2 * rings:
                continue
            mate = next((b for b in left if b not in out[a] and len(out[b]) < 2 * rings), None)
            if mate is None:
                left.append(a)
                continue
            left.remove(mate)
            out[a].add(mate)
            out[mate].add(a)
        short = [m for m in short if len(out[m]) < 2 * rings]
        if len(short) < 2:
            break
    # One left over (an odd count, or two that are neighbours already): a member that has its
    # 2 * rings takes one more, so nobody has fewer.
    spare = sorted(members, key=lambda m: _score(f"{tag}\x00spare", m))
    for a in short:
        for b in spare:
            if len(out[a]) >= 2 * rings:
                break
            if b != a and b not in out[a] and len(out[b]) == 2 * rings:
                out[a].add(b)
                out[b].add(a)
    return {m: frozenset(v) for m, v in out.items()}


class SwarmGraph:
    """The neighbour graph of one swarm, as every node with the same view
    computes it.  See the module docstring."""

    def __init__(
        self,
        members: Iterable[str],
        *,
        complete: Iterable[str] = (),
        racks: Mapping[str, str] | None = None,
        key: str = "",
    ) -> None:
        self.members = frozenset(members)
        self.complete = frozenset(complete) & self.members
        self.key = key
        racks = racks or {}
        groups: dict[str, list[str]] = {}
        for m in self.members:
            groups.setdefault(racks.get(m, ""), []).append(m)
        self._group_of = {m: g for g, ms in groups.items() for m in ms}
        self._groups = {g: tuple(sorted(ms)) for g, ms in groups.items()}
        self.multi = len(self._groups) > 1
        self._gateways: dict[int, dict[str, str]] = {}  # class -> group -> its gateway
        if self.multi:
            for g, ms in self._groups.items():
                order = sorted(ms, key=lambda m: _score(f"{key}\x00gw", m))
                for j in range(GATEWAYS):
                    self._gateways.setdefault(j, {})[g] = order[j % len(order)]
        self._cache: dict[str, dict[str, Classes]] = {}

    def group(self, node: str) -> str:
        return self._group_of[node]

    def gateway(self, group: str, cls: int) -> str | None:
        """The gateway of ``group`` for chunk class ``cls`` (None: one group only)."""
        return self._gateways[cls][group] if self.multi else None

    def neighbours(self, node: str) -> dict[str, Classes]:
        """``node``'s neighbours -> the chunk classes each edge carries
        (None: every chunk).  Empty for a node that is no member."""
        got = self._cache.get(node)
        if got is not None:
            return got
        out: dict[str, Classes] = {}
        g = self._group_of.get(node)
        if g is not None:
            members = self._groups[g]
            for peer in _rings(f"{self.key}\x00g\x00{g}", members, RINGS)[node]:
                out[peer] = None
            if self.multi:
                cross: dict[str, set[int]] = {}
                for j, by_group in self._gateways.items():
                    if by_group[g] != node:
                        continue
                    reps = tuple(sorted(set(by_group.values())))
                    for peer in _rings(f"{self.key}\x00c\x00{j}", reps, CROSS_RINGS).get(node, ()):
                        cross.setdefault(peer, set()).add(j)
                for peer, classes in cross.items():
                    out[peer] = frozenset(classes)
        self._cache[node] = out
        return out

    def stand_ins(self, node: str, k: int, skip: Collection[str] = ()) -> list[str]:
        """Up to ``k`` members of ``node``'s group that are not its
        neighbours nor in ``skip``, in ``node``'s own rendezvous order: the
        holders it pulls from beside its neighbours while ``k`` of those
        lag (slow links, or dead and not yet noticed).  Each node has its
        own order, so the extra requests spread over the group.  O(group)."""
        g = self._group_of.get(node)
        if g is None or k <= 0:
            return []
        nbrs = self.neighbours(node)
        tag = f"{self.key}\x00x\x00{node}"
        cands = [m for m in self._groups[g] if m != node and m not in nbrs and m not in skip]
        cands.sort(key=lambda m: _score(tag, m))
        return cands[:k]

    def share(self, holder: str, node: str, n_chunks: int) -> bytes:
        """The chunks ``node`` asks the complete ``holder`` for first: 1 at
        chunk c when ``node`` owns c among ``holder``'s pulling neighbours
        that may be sent c (round-robin within each class), 0 elsewhere.
        The shares of ``holder``'s pulling neighbours partition every
        chunk it may send them."""
        nbrs = self.neighbours(holder)
        pulling = sorted(p for p in nbrs if p not in self.complete)
        if node not in pulling:
            return bytes(n_chunks)
        mod = GATEWAYS if self.multi else 1
        out = bytearray(n_chunks)
        for cls in range(mod):
            cands = [p for p in pulling if nbrs[p] is None or cls in nbrs[p]]  # type: ignore[operator]
            if node not in cands:
                continue
            me, m = cands.index(node), len(cands)
            for t in range(me, (n_chunks - cls + mod - 1) // mod, m):
                out[cls + t * mod] = 1
        return bytes(out)


def allowed_mask(classes: Classes, n_chunks: int) -> bytes | None:
    """The chunks an edge carrying ``classes`` may carry (1 each), or None for every chunk."""
    if classes is None:
        return None
    out = bytearray(n_chunks)
    for cls in classes:
        out[cls::GATEWAYS] = b"\x01" * len(range(cls, n_chunks, GATEWAYS))
    return bytes(out)


def connected(graph: SwarmGraph, nodes: Collection[str] | None = None) -> bool:
    """Whether ``nodes`` (default: every member) are connected through
    edges among themselves (tests and the simulator)."""
    alive = set(graph.members if nodes is None else nodes)
    if not alive:
        return True
    start = next(iter(alive))
    seen = {start}
    todo = [start]
    while todo:
        n = todo.pop()
        for p in graph.neighbours(n):
            if p in alive and p not in seen:
                seen.add(p)
                todo.append(p)
    return seen == alive
