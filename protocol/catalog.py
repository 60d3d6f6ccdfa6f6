"""The catalog: a scuttlebutt CRDT of per-node owned keys.

Theory of operation
-------------------
The catalog maps each node id to that node's *own* keys.  Only the owner
writes them; every write bumps the owner's version counter and stamps the key
with it, so for one origin "higher version wins" is the whole merge rule.
Deletion writes a tombstone (also versioned).  Tombstones are collected
``tombstone_grace_s`` after they were seen; collecting raises the origin's
``last_gc_version`` on that node.

Anti-entropy exchanges *digests*: node id -> ``(generation, max_version,
last_gc_version)``.  Given a peer's digest, ``delta_for`` returns, per origin,
the keys with versions in ``(peer.max_version, to_version]``, sorted by
version and cut to a byte budget *without gaps*: if an entry does not fit,
``to_version`` stops just below it, so the receiver never believes it has a
version it lacks.  A peer that knows an older generation of an origin, or
whose ``max_version`` is below our ``last_gc_version`` (it may miss a
tombstone we no longer have), gets a *reset*: the origin's whole state from
version 0, which replaces what it had.

``apply_delta`` ignores a delta that would leave a gap (``from_version`` above
what we have), an older generation, and anything about ourselves.  Merge is
per-key max by version within a generation and "newest generation wins"
across them, so it is commutative, associative and idempotent.

A summary hash of the digest (a sum of 64-bit per-origin hashes, kept up to
date incrementally) lets two agreeing peers find out in one small message.

Restarts hide nothing.  A restarted node's new generation starts from
nothing at its peers (its versions are its own), and fills in as deltas
arrive.  Meanwhile the old generation's live keys stay readable as the
node's *shadow* (``get``, ``items``; never gossiped): a key of the new
generation, live or a tombstone, overrides its shadow, and the shadow goes
when the new generation's state is whole.  The node says when that is: on
start it writes ``GENERATION_KEY`` (``announce``) above everything it
restored, and deltas are gap-free prefixes, so a peer that holds that key
at the node's generation holds the whole restored state.  So a key a peer
saw is never missing there across a restart, unless the node itself lost
or deleted it.

Listeners (``subscribe``) hear of every change to the live keys as it
happens: a key set or gone, or all of a node's keys gone at once (a reset,
a node forgotten).  Read views and persistence keep themselves up to date
from them instead of walking the whole catalog.

One origin's keys and their indexes (``NodeState``, ``Entry``) are in
``nodestate.py``; the merge, deltas and persistence are here.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any, Protocol

import msgpack
import xxhash

from .errors import LocalProtocolError, RemoteProtocolError
from .nodestate import GENERATION_KEY, Entry, NodeState
from .nodestate import family as family  # re-exported: it lived here
from .wire import DeltaEntry, NodeDelta, NodeDigest, check_value, encoded_size

__all__ = ["GENERATION_KEY", "Catalog", "CatalogListener", "Entry", "NodeState", "digest_entry_hash"]

_MASK = 2**64 - 1
_ENTRY_OVERHEAD = 16  # msgpack framing per entry, roughly
_NODE_OVERHEAD = 48


def _packed(value: Any) -> bytes:
    # Compare encodings, not values: 1 == 1.0 == True in Python but not on the wire.
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def _size(key: str, e: Entry) -> int:
    """An entry's bytes on the wire, worked out once, when a delta first carries it."""
    e.size = encoded_size(e.value) + len(key.encode()) + _ENTRY_OVERHEAD
    return e.size


def digest_entry_hash(node_id: str, d: NodeDigest) -> int:
    return xxhash.xxh3_64_intdigest(
        f"{node_id}\x00{d.generation}\x00{d.max_version}\x00{d.last_gc_version}".encode()
    )


class CatalogListener(Protocol):
    """Told of every change to the catalog's live keys."""

    def key_changed(self, node_id: str, key: str, value: Any | None) -> None:
        """``key`` of ``node_id`` now holds ``value``; None: it is gone (deleted or a tombstone)."""

    def node_cleared(self, node_id: str) -> None:
        """Every key of ``node_id`` is gone (the ones that follow, if any, are reported one by one)."""


class Catalog:
    def __init__(
        self,
        self_id: str,
        generation: int,
        *,
        tombstone_grace_s: float = 3600.0,
        value_max_bytes: int = 64 * 1024,
        key_max_chars: int = 512,
        # One node may write every model the mesh holds (--max-models, 100,000)
        # and still keep its own records (node, storage, copies, transfers).
        keys_per_node_max: int = 200_000,
    ) -> None:
        self.self_id = self_id
        self.tombstone_grace_s = tombstone_grace_s
        self.value_max_bytes = value_max_bytes
        self.key_max_chars = key_max_chars
        self.keys_per_node_max = keys_per_node_max
        self.nodes: dict[str, NodeState] = {}
        self._hash = 0
        self._hashes: dict[str, int] = {}
        self._digest: dict[str, NodeDigest] = {}
        # Origins that may hold a tombstone (a superset), so collection does not walk every key.
        self._tomb_origins: set[str] = set()
        self.stats = {"deltas_applied": 0, "deltas_gap": 0, "resets_sent": 0, "resets_applied": 0}
        self._listeners: list[CatalogListener] = []
        self._put_node(NodeState(self_id, generation))

    def subscribe(self, listener: CatalogListener) -> None:
        """Tell ``listener`` of every change from now on (subscribe before ``restore``)."""
        self._listeners.append(listener)

    def _changed(self, node_id: str, key: str, value: Any | None) -> None:
        for lst in self._listeners:
            lst.key_changed(node_id, key, value)

    def _cleared(self, st: NodeState) -> None:
        """``st``'s keys replace whatever was known of that node."""
        seen = st.visible()
        for lst in self._listeners:
            lst.node_cleared(st.node_id)
            for key, value in seen.items():
                lst.key_changed(st.node_id, key, value)

    # -- bookkeeping ---------------------------------------------------------

    def _rehash(self, node_id: str) -> None:
        old = self._hashes.pop(node_id, None)
        if old is not None:
            self._hash = (self._hash - old) & _MASK
        self._digest.pop(node_id, None)
        st = self.nodes.get(node_id)
        if st is not None:
            d = st.digest()
            h = digest_entry_hash(node_id, d)
            self._hashes[node_id] = h
            self._digest[node_id] = d
            self._hash = (self._hash + h) & _MASK

    def _put_node(self, st: NodeState) -> None:
        self.nodes[st.node_id] = st
        self._rehash(st.node_id)

    @property
    def own(self) -> NodeState:
        return self.nodes[self.self_id]

    def digest(self) -> dict[str, NodeDigest]:
        """The current digest (a live view: copy it before keeping it)."""
        return self._digest

    def digest_hash(self) -> int:
        return self._hash

    # -- local writes (own keys only) ---------------------------------------

    def _check_local(self, key: str, value: Any, *, internal: bool = False) -> int:
        if not isinstance(key, str) or not key or len(key) > self.key_max_chars:
            raise LocalProtocolError(f"catalog key must be 1 to {self.key_max_chars} characters")
        try:
            # What peers would refuse (too deep, a type the wire lacks, an
            # integer msgpack cannot carry) is refused here, before it is ours.
            check_value(value)
            size = encoded_size(value) + len(key.encode()) + _ENTRY_OVERHEAD
        except (RemoteProtocolError, OverflowError, TypeError, ValueError) as e:
            raise LocalProtocolError(f"catalog value for {key[:80]!r} cannot be sent: {e}") from None
        if size > self.value_max_bytes:
            raise LocalProtocolError(
                f"catalog value for {key!r} is {size} bytes, over the {self.value_max_bytes} byte limit"
            )
        own = self.own.keys
        if key not in own and len(own) >= self.keys_per_node_max and not internal:
            raise LocalProtocolError(f"this node already holds {self.keys_per_node_max} keys")
        return size

    def set(self, key: str, value: Any, now: float, *, internal: bool = False) -> int:
        """Write one of our own keys; returns its new version."""
        size = self._check_local(key, value, internal=internal)
        own = self.own
        cur = own.keys.get(key)
        if cur is not None and not cur.tombstone and _packed(cur.value) == _packed(value):
            return cur.version  # unchanged: no new version, nothing to gossip
        own.max_version += 1
        own.put(key, Entry(value, own.max_version, False, now, size))
        self._rehash(self.self_id)
        self._changed(self.self_id, key, value)
        return own.max_version

    def announce(self, now: float) -> int:
        """Say that this generation holds all it restored: ``GENERATION_KEY``
        above every version we hold (a peer holding it holds them all, and
        drops the older generation's shadow).  Call on start, after
        ``restore``, and whenever the generation moves."""
        own = self.own
        return self.set(GENERATION_KEY, {"generation": own.generation, "version": own.max_version}, now, internal=True)

    def delete(self, key: str, now: float) -> bool:
        own = self.own
        cur = own.keys.get(key)
        if cur is None or cur.tombstone:
            return False
        own.max_version += 1
        own.put(key, Entry(None, own.max_version, True, now, len(key.encode()) + _ENTRY_OVERHEAD))
        self._tomb_origins.add(self.self_id)
        self._rehash(self.self_id)
        self._changed(self.self_id, key, None)
        return True

    def get(self, node_id: str, key: str) -> Any:
        st = self.nodes.get(node_id)
        if st is None:
            return None
        e = st.keys.get(key)
        if e is None:
            return None if st.shadow is None else st.shadow.get(key)
        return None if e.tombstone else e.value

    def items(self, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
        """Every live ``(node_id, key, value)`` whose key starts with ``prefix``
        (a restarted node's old keys too, until its new state is whole)."""
        for nid, st in self.nodes.items():
            keys = st.keys
            for key, e in st.in_family(prefix):
                if not e.tombstone:
                    yield nid, key, e.value
            if st.shadow is not None:
                for key, value in st.shadow.items():
                    if key not in keys and key.startswith(prefix):
                        yield nid, key, value

    # -- anti-entropy --------------------------------------------------------

    def delta_for(
        self, peer: dict[str, NodeDigest], budget_bytes: int, rng: random.Random
    ) -> tuple[NodeDelta, ...]:
        """What the peer with digest ``peer`` lacks, within ``budget_bytes``."""
        return self.delta_and_more(peer, budget_bytes, rng)[0]

    def delta_and_more(
        self, peer: dict[str, NodeDigest], budget_bytes: int, rng: random.Random, *, only: bool = False
    ) -> tuple[tuple[NodeDelta, ...], bool]:
        """``delta_for``, and whether the budget left out some of what the peer
        lacks (it may ask again with its new digest: the sync resumes there).
        ``only``: ``peer`` is part of a digest; just the origins it names."""
        wanted: list[tuple[NodeState, int, bool]] = []
        nodes = self.nodes
        for nid in peer if only else nodes:
            st = nodes.get(nid)
            if st is None:
                continue
            pd = peer.get(nid)
            if pd is None or pd.generation < st.generation:
                wanted.append((st, 0, True))
            elif pd.generation > st.generation:
                continue
            elif pd.max_version < st.last_gc_version and pd.last_gc_version < st.last_gc_version:
                # The peer may miss tombstones we collected.  (A peer already at our
                # collection horizon holds a clean prefix: it gets a normal delta.)
                wanted.append((st, 0, True))
            elif pd.max_version < st.max_version:
                wanted.append((st, pd.max_version, False))
        # Fairness: the smallest backlogs first (a random order among equals), so
        # one origin's flood fills only what the others leave of the budget: a
        # single write elsewhere goes in the next message, whatever the flood.
        rng.shuffle(wanted)
        wanted.sort(key=lambda w: w[0].max_version - w[1])
        out: list[NodeDelta] = []
        used = 0
        sent_any = False
        more = False
        for st, frm, reset in wanted:
            if used + _NODE_OVERHEAD > budget_bytes:
                more = True
                break
            used += _NODE_OVERHEAD
            entries: list[DeltaEntry] = []
            to_version = st.max_version
            for version, key, e in st.since(frm):
                # The first entry of a message may overflow the budget, so that an
                # entry bigger than the budget still gets through.
                size = e.size if e.size >= 0 else _size(key, e)
                if used + size > budget_bytes and sent_any:
                    to_version = version - 1
                    more = True
                    break
                used += size
                sent_any = True
                entries.append(DeltaEntry(key, version, e.value, e.tombstone))
            if to_version <= frm and not reset:
                continue  # nothing fit for this origin
            if reset:
                self.stats["resets_sent"] += 1
            out.append(
                NodeDelta(st.node_id, st.generation, frm, to_version, st.last_gc_version, reset, tuple(entries))
            )
        return tuple(out), more

    def behind(self, peer: dict[str, NodeDigest]) -> bool:
        """Whether the digest ``peer`` holds some origin's keys we lack."""
        nodes = self.nodes
        for nid, pd in peer.items():
            st = nodes.get(nid)
            if nid == self.self_id:
                continue
            if st is None or pd.generation > st.generation or (
                pd.generation == st.generation and pd.max_version > st.max_version
            ):
                return True
        return False

    def apply_delta(self, delta: NodeDelta, now: float, *, accept_new: bool = True) -> bool:
        """Merge one node delta; returns whether anything changed."""
        if delta.node_id == self.self_id:
            return False  # nobody else writes our keys
        if len(delta.entries) > self.keys_per_node_max:
            return False
        st = self.nodes.get(delta.node_id)
        succeeded = False  # a new generation of a node we hold: its old keys stand as a shadow
        if st is None:
            if not accept_new:
                return False
            if not delta.reset:
                self.stats["deltas_gap"] += 1
                return False
            st = NodeState(delta.node_id, delta.generation)
        elif delta.generation < st.generation:
            return False
        elif delta.generation > st.generation:
            if not delta.reset:
                self.stats["deltas_gap"] += 1
                return False
            st = self._successor(st, delta.generation)
            succeeded = True
        elif delta.reset:
            if delta.to_version <= st.max_version and delta.last_gc_version <= st.last_gc_version:
                return False  # we already have at least this much
            if st.max_version < delta.last_gc_version:
                # We may hold keys whose tombstones the sender has collected: start
                # clean from the reset (a clean prefix of the sender's state), an
                # older generation's shadow kept until the state is whole.
                st = NodeState(delta.node_id, delta.generation, shadow=st.shadow)
            # Otherwise we already saw every collected tombstone: merge it like a
            # normal delta from version 0, keeping whatever we hold that is newer.
        elif delta.from_version > st.max_version:
            self.stats["deltas_gap"] += 1
            return False
        elif delta.to_version <= st.max_version:
            return False
        fresh = st is not self.nodes.get(delta.node_id)
        changed = fresh
        applied: list[DeltaEntry] = []
        for e in delta.entries:
            cur = st.keys.get(e.key)
            if cur is not None and cur.version >= e.version:
                continue
            st.put(e.key, Entry(e.value, e.version, e.tombstone, now, -1))
            if e.tombstone:
                self._tomb_origins.add(delta.node_id)
            applied.append(e)
            changed = True
        if delta.to_version > st.max_version:
            st.max_version = delta.to_version
            changed = True
        if delta.last_gc_version > st.last_gc_version:
            st.last_gc_version = delta.last_gc_version
            changed = True
        if delta.reset:
            self.stats["resets_applied"] += 1
        if changed:
            self.stats["deltas_applied"] += 1
            self._put_node(st)
            if fresh and not succeeded:
                self._cleared(st)
            else:  # the shadow keeps what readers saw: only what this delta changed is news
                for e in applied:
                    self._changed(st.node_id, e.key, None if e.tombstone else e.value)
            self._settle(st)
        return changed

    def _successor(self, old: NodeState, generation: int) -> NodeState:
        """A new generation of ``old``'s node, empty, with what readers saw of
        ``old`` as its shadow (the keys stand until the new state supersedes them)."""
        seen = old.visible()
        return NodeState(old.node_id, generation, shadow=seen or None)

    def _settle(self, st: NodeState) -> None:
        """Drop ``st``'s shadow once its own state is whole; readers hear of the
        shadow's keys the new generation does not hold."""
        if st.shadow is None or not st.whole:
            return
        shadow, st.shadow = st.shadow, None
        keys = st.keys
        for k in shadow:
            if k not in keys:
                self._changed(st.node_id, k, None)

    def shadowed(self) -> list[str]:
        """Nodes whose older generation's keys still stand in for the new one's."""
        return [nid for nid, st in self.nodes.items() if st.shadow is not None]

    # -- collection ----------------------------------------------------------

    def collect_tombstones(self, now: float) -> int:
        """Drop tombstones older than the grace period; returns how many."""
        dropped = 0
        for nid in sorted(self._tomb_origins):
            st = self.nodes.get(nid)
            if st is None or not any(e.tombstone for e in st.keys.values()):
                self._tomb_origins.discard(nid)
                continue
            old = [
                (k, e.version)
                for k, e in st.keys.items()
                if e.tombstone and now - e.seen_at >= self.tombstone_grace_s
            ]
            if not old:
                continue
            for k, version in old:
                st.drop(k)
                st.last_gc_version = max(st.last_gc_version, version)
                dropped += 1
            self._rehash(nid)
        return dropped

    def forget(self, node_id: str) -> None:
        """Drop everything about a node that left the mesh for good."""
        if node_id != self.self_id and self.nodes.pop(node_id, None) is not None:
            self._rehash(node_id)
            for lst in self._listeners:
                lst.node_cleared(node_id)

    def reset_generation(self, node_id: str, generation: int) -> None:
        """A node restarted: its old generation's keys stand (as a shadow,
        readers see no change) until the new generation's state is whole."""
        st = self.nodes.get(node_id)
        if node_id != self.self_id and st is not None and st.generation < generation:
            self._put_node(self._successor(st, generation))

    def move_generation(self, generation: int) -> None:
        """Our own keys move to a new, higher generation (an identity conflict
        was refuted): peers drop the old generation's keys and take these."""
        own = self.own
        if generation <= own.generation:
            raise LocalProtocolError("a generation only moves up")
        own.generation = generation
        self._rehash(self.self_id)

    # -- persistence ---------------------------------------------------------

    def check(self, key: str, value: Any) -> None:
        """Raise ``LocalProtocolError`` unless ``set(key, value)`` would succeed."""
        self._check_local(key, value)

    def snapshot(self, node_ids: list[str] | None = None) -> dict[str, Any]:
        """The state of ``node_ids`` (default: every node) as plain values."""
        nodes = self.nodes if node_ids is None else {n: self.nodes[n] for n in node_ids if n in self.nodes}
        return {
            nid: {
                "generation": st.generation,
                "max_version": st.max_version,
                "last_gc_version": st.last_gc_version,
                "entries": [[k, e.version, e.value, e.tombstone] for k, e in st.keys.items()],
            }
            for nid, st in nodes.items()
        }

    def restore(self, snap: dict[str, Any], now: float, own_generation: int) -> None:
        """Load a snapshot; our own keys move to ``own_generation``, keeping their versions."""
        for nid, raw in snap.items():
            st = NodeState(nid, int(raw["generation"]), int(raw["max_version"]), int(raw["last_gc_version"]))
            for k, version, value, tomb in raw["entries"]:
                st.put(k, Entry(value, int(version), bool(tomb), now, -1))
                if tomb:
                    self._tomb_origins.add(nid)
            if nid == self.self_id:
                st.generation = own_generation
            self._put_node(st)
            self._cleared(st)
