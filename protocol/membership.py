"""Membership: who is in the mesh, and whether they are alive.

Theory of operation
-------------------
Each member is described by a ``MemberRecord``; records form a lattice
ordered by ``(generation, incarnation, state)`` with ALIVE < SUSPECT < DEAD <
LEFT, and merging keeps the higher record.  So the member table is a CRDT, and
any two nodes that have seen the same records agree, whatever the order.

* ``generation`` changes when a node restarts: the restarted node supersedes
  its old self, whatever that self was believed to be.
* ``incarnation`` is bumped by a node to refute a suspicion or death of
  itself (SWIM): an ALIVE record at a higher incarnation beats the accusation.
* SUSPECT starts a local timer (Lifeguard): the timeout starts at
  ``max_timeout`` and falls towards ``min_timeout`` as independent accusers
  confirm it; when it fires the node is declared DEAD.  One lossy link cannot
  kill a node; a crashed one is agreed dead within ``min_timeout`` plus the
  time for the news to spread.
* DEAD and LEFT members are kept for ``reap_after_s`` (so the news spreads and
  the dead can be re-dialled after a partition heals), then forgotten.  A
  record about an unknown node that is already DEAD or LEFT is not adopted,
  so forgotten nodes do not come back as zombies.

Changes are queued as rumours (``MemberUpdate``) and piggybacked on probes and
gossip, each retransmitted ``retransmit_mult * ceil(log10(n + 1))`` times.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import xxhash

from .wire import MemberRecord, MemberState, MemberUpdate

__all__ = ["BroadcastQueue", "IndexedSet", "Member", "MemberTable", "SuspicionConfig", "record_hash"]

_MASK = 2**64 - 1


def record_hash(r: MemberRecord) -> int:
    return xxhash.xxh3_64_intdigest(
        f"{r.node_id}\x00{r.address}\x00{r.generation}\x00{r.incarnation}\x00{int(r.state)}".encode()
    )


def _live_hash(r: MemberRecord) -> int:
    # The members hash covers live records only: two nodes that differ just in
    # which dead they still remember (or have already forgotten) agree.
    return record_hash(r) if r.state <= MemberState.SUSPECT else 0


@dataclass(frozen=True, slots=True)
class SuspicionConfig:
    probe_interval_s: float = 1.0
    suspicion_mult: float = 3.0
    suspicion_max_mult: float = 6.0
    expected_confirmations: int = 3

    def min_timeout(self, n: int) -> float:
        return self.suspicion_mult * max(1.0, math.log10(max(n, 1))) * self.probe_interval_s

    def timeout(self, n: int, confirmations: int) -> float:
        """Lifeguard: from ``hi`` down to ``lo`` as independent confirmations arrive.

        Only ``n - 2`` members can confirm (not the suspect, not the first
        accuser), so a small mesh expects fewer; with none to expect, ``lo``.
        """
        lo = self.min_timeout(n)
        hi = lo * self.suspicion_max_mult
        k = min(self.expected_confirmations, n - 2)
        if k <= 0:
            return lo
        frac = math.log(min(confirmations, k) + 1) / math.log(k + 1)
        return max(lo, hi - (hi - lo) * frac)


@dataclass(slots=True)
class Member:
    record: MemberRecord
    since: float  # local time the current state began
    suspect_start: float = 0.0
    accusers: set[str] = field(default_factory=set)

    @property
    def state(self) -> MemberState:
        return self.record.state


class IndexedSet:
    """A set with O(1) add, remove and uniform random sampling."""

    def __init__(self) -> None:
        self._items: list[str] = []
        self._index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: str) -> bool:
        return item in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def add(self, item: str) -> None:
        if item not in self._index:
            self._index[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: str) -> None:
        i = self._index.pop(item, None)
        if i is None:
            return
        last = self._items.pop()
        if i < len(self._items):
            self._items[i] = last
            self._index[last] = i

    def sample(self, rng: random.Random, k: int, exclude: str | None = None) -> list[str]:
        n = len(self._items)
        if n == 0 or k <= 0:
            return []
        if k >= n:
            out = [x for x in self._items if x != exclude]
            rng.shuffle(out)
            return out[:k]
        picked: set[str] = set()
        tries = 0
        while len(picked) < k and tries < 4 * k + 8:
            tries += 1
            x = self._items[rng.randrange(n)]
            if x != exclude:
                picked.add(x)
        return sorted(picked, key=self._index.__getitem__)


class MemberTable:
    """The member lattice plus suspicion timers.  ``self`` is a member too.

    Indexes kept up to date on every change, so that nothing on the hot path
    walks the whole table: ``live`` (ALIVE or SUSPECT others, the ones we
    probe and gossip with), ``gone`` (DEAD others, re-dialled after a
    partition), ``suspects``.
    """

    def __init__(self, me: MemberRecord, now: float, suspicion: SuspicionConfig) -> None:
        self.me = me.node_id
        self.suspicion = suspicion
        self.members: dict[str, Member] = {me.node_id: Member(me, now)}
        self._hash = _live_hash(me)
        self.live = IndexedSet()
        self.gone = IndexedSet()
        self.suspects: set[str] = set()
        self._recent: dict[str, float] = {me.node_id: now}  # node id -> last change, oldest first
        self._departed: set[str] = set()  # DEAD or LEFT others, the only ones reap can drop

    # -- reading -------------------------------------------------------------

    def __contains__(self, node_id: str) -> bool:
        return node_id in self.members

    def __iter__(self) -> Iterator[Member]:
        return iter(self.members.values())

    def get(self, node_id: str) -> Member | None:
        return self.members.get(node_id)

    @property
    def self_record(self) -> MemberRecord:
        return self.members[self.me].record

    def records(self) -> tuple[MemberRecord, ...]:
        return tuple([m.record for m in self.members.values()])

    def recent_records(self, now: float, window_s: float, limit: int) -> tuple[MemberRecord, ...]:
        """The records that changed in the last ``window_s``, newest first, at most ``limit``.

        O(limit): ``_recent`` keeps members in the order they last changed."""
        out: list[MemberRecord] = []
        for nid in reversed(self._recent):
            if len(out) >= limit or now - self._recent[nid] > window_s:
                break
            m = self.members.get(nid)
            if m is not None:
                out.append(m.record)
        return tuple(out)

    def members_hash(self) -> int:
        """Sum of the hashes of live (ALIVE or SUSPECT) records."""
        return self._hash

    def count_live(self) -> int:
        """Live members, ourselves included."""
        return len(self.live) + 1

    def _index(self, rec: MemberRecord) -> None:
        nid = rec.node_id
        if nid == self.me:
            return
        if rec.state <= MemberState.SUSPECT:
            self.live.add(nid)
        else:
            self.live.discard(nid)
        if rec.state is MemberState.DEAD:
            self.gone.add(nid)
        else:
            self.gone.discard(nid)
        if rec.state is MemberState.SUSPECT:
            self.suspects.add(nid)
        else:
            self.suspects.discard(nid)
        if rec.state >= MemberState.DEAD:
            self._departed.add(nid)
        else:
            self._departed.discard(nid)

    # -- writing -------------------------------------------------------------

    def _replace(self, m: Member | None, rec: MemberRecord, now: float) -> Member:
        if m is not None:
            self._hash = (self._hash - _live_hash(m.record)) & _MASK
        self._hash = (self._hash + _live_hash(rec)) & _MASK
        if m is None:
            m = Member(rec, now)
            self.members[rec.node_id] = m
        else:
            if m.record.state != rec.state or m.record.generation != rec.generation:
                m.since = now
            m.record = rec
        self._index(rec)
        self._recent.pop(rec.node_id, None)
        self._recent[rec.node_id] = now
        return m

    def set_self(self, rec: MemberRecord, now: float) -> None:
        assert rec.node_id == self.me
        self._replace(self.members[self.me], rec, now)

    def merge(self, update: MemberUpdate, now: float) -> bool:
        """Merge a rumour about another member; returns whether it changed our view.

        Rumours about ourselves are the caller's business (it refutes them).
        """
        rec = update.record
        if rec.node_id == self.me:
            return False
        m = self.members.get(rec.node_id)
        if m is None:
            if rec.state >= MemberState.DEAD:
                return False  # do not adopt news of the dead we never knew (or forgot)
            m = self._replace(None, rec, now)
            if rec.state is MemberState.SUSPECT:
                self._start_suspicion(m, update.accuser, now)
            return True
        if rec.rank < m.record.rank:
            return False
        if rec.rank == m.record.rank:
            if rec.address != m.record.address and rec.address > m.record.address:
                self._replace(m, rec, now)  # deterministic tie-break keeps the lattice a lattice
                return True
            if rec.state is MemberState.SUSPECT and update.accuser is not None:
                if update.accuser not in m.accusers:
                    m.accusers.add(update.accuser)
                    return True  # a new, independent confirmation: worth passing on
            return False
        was_suspect = m.state is MemberState.SUSPECT and m.record.generation == rec.generation
        self._replace(m, rec, now)
        if rec.state is MemberState.SUSPECT:
            if not was_suspect:
                m.accusers = set()
                self._start_suspicion(m, update.accuser, now)
            elif update.accuser is not None:
                m.accusers.add(update.accuser)
        else:
            m.accusers = set()
        return True

    def _start_suspicion(self, m: Member, accuser: str | None, now: float) -> None:
        m.suspect_start = now
        m.accusers = {accuser} if accuser else set()

    def suspicion_deadline(self, m: Member, stretch: float = 1.0) -> float:
        """When ``m``'s suspicion runs out; ``stretch`` multiplies the timeout
        (a node that misses its own deadlines gives others longer: Lifeguard)."""
        n = self.count_live()
        # The first accuser is not a confirmation; the ones after it are.
        return m.suspect_start + stretch * self.suspicion.timeout(n, max(len(m.accusers) - 1, 0))

    def expired_suspicions(self, now: float, stretch: float = 1.0) -> list[Member]:
        out = []
        for nid in sorted(self.suspects):  # sorted: the same order whatever the hash seed
            m = self.members[nid]
            if now >= self.suspicion_deadline(m, stretch):
                out.append(m)
        return out

    def reap(self, now: float, after_s: float) -> list[str]:
        gone = [
            nid
            for nid in sorted(self._departed)
            if now - self.members[nid].since >= after_s
        ]
        for nid in gone:
            m = self.members.pop(nid)
            self._recent.pop(nid, None)
            self._hash = (self._hash - _live_hash(m.record)) & _MASK
            self.live.discard(nid)
            self.gone.discard(nid)
            self.suspects.discard(nid)
            self._departed.discard(nid)
        return gone


class BroadcastQueue:
    """Rumours waiting to be piggybacked, least-sent first, one per member."""

    def __init__(self, retransmit_mult: int = 4) -> None:
        self.retransmit_mult = retransmit_mult
        self._items: dict[str, tuple[MemberUpdate, int]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def push(self, update: MemberUpdate) -> None:
        self._items[update.record.node_id] = (update, 0)

    def take(self, n_members: int, max_items: int) -> tuple[MemberUpdate, ...]:
        if not self._items or max_items <= 0:
            return ()
        limit = self.retransmit_mult * max(1, math.ceil(math.log10(n_members + 1)))
        chosen = sorted(self._items.items(), key=lambda kv: kv[1][1])[:max_items]
        out = []
        for nid, (upd, sent) in chosen:
            out.append(upd)
            if sent + 1 >= limit:
                del self._items[nid]
            else:
                self._items[nid] = (upd, sent + 1)
        return tuple(out)
