"""Anti-entropy: the ``GossipNode`` half that trades catalog digests and deltas.

A round opens ``Sync``s (``_tick_gossip`` in ``gossip.py``): a full one
carries only the digest and member hashes, a recent one the digest entries of
the origins that changed here lately.  A peer that agrees stays silent; one
that does not answers ``SyncDigest`` (or, to a recent one, only the origins
that differ), and the two then trade ``SyncDelta``s cut to a byte budget,
resuming while each step brings something.  A mixin of ``GossipNode``: it
works on the node's own state.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

from .wire import (
    Envelope,
    MemberRecord,
    MemberUpdate,
    NodeDelta,
    NodeDigest,
    Sync,
    SyncDelta,
    SyncDigest,
)

if TYPE_CHECKING:
    from .catalog import Catalog
    from .gossipconfig import GossipConfig, Send, Stats
    from .membership import MemberTable
    from .wire import Ack, Gossip, Ping, PingReq

__all__ = ["AntiEntropy"]


class AntiEntropy:
    """``GossipNode``'s anti-entropy (a mixin: the node holds the state it reads)."""

    if TYPE_CHECKING:
        id: str
        generation: int
        config: GossipConfig
        catalog: Catalog
        members: MemberTable
        stats: Stats
        left: bool
        _pulls: dict[str, float]
        _origins_changed: dict[str, int]

        def _send(self, out: list[Send], to: str, body: Ping | Ack | PingReq | Gossip | Sync | SyncDigest | SyncDelta) -> None: ...
        def _addr(self, node_id: str) -> str: ...
        def _changed(self) -> None: ...
        def _merge_update(self, u: MemberUpdate, now: float) -> None: ...
        def _check_digest_of_me(self, digest: dict[str, NodeDigest] | None, now: float) -> None: ...

    def _origin_changed(self, node_id: str, now: float) -> None:
        oc = self._origins_changed
        oc.pop(node_id, None)
        oc[node_id] = 0
        if len(oc) > 4 * self.config.changes_recent_max:
            del oc[next(iter(oc))]

    def sync_with(self, node_id: str) -> list[Send]:
        """Open anti-entropy with ``node_id`` now (a reader waiting for its write)."""
        out: list[Send] = []
        if not self.left and node_id != self.id and self.members.get(node_id) is not None:
            self._send(out, self._addr(node_id), self._sync_open())
        return out

    def _sync_open(self) -> Sync:
        return Sync(self.catalog.digest_hash(), self.members.members_hash())

    def _recent(self, now: float, skip: dict[str, NodeDigest] | None = None) -> dict[str, NodeDigest]:
        """Our digest entries of the origins that changed here lately, newest
        first, at most ``changes_recent_max``, leaving out those in ``skip``;
        each is named a rumour's number of times, then no more."""
        cfg = self.config
        digest = self.catalog.digest()
        changed = self._origins_changed
        limit = cfg.retransmit_mult * max(1, math.ceil(math.log10(self.members.count_live() + 1)))
        recent: dict[str, NodeDigest] = {}
        done = []
        for nid in reversed(changed):
            if len(recent) >= cfg.changes_recent_max:
                break
            d = digest.get(nid)
            if d is None:
                done.append(nid)
            elif skip is None or nid not in skip:
                recent[nid] = d
                changed[nid] += 1
                if changed[nid] >= limit:
                    done.append(nid)
        for nid in done:
            del changed[nid]
        return recent

    def _sync_recent(self, now: float) -> Sync:
        """A sync that carries only the digest entries of what changed lately."""
        return Sync(self.catalog.digest_hash(), self.members.members_hash(), self._recent(now))

    def full_sync_interval(self) -> float:
        """memberlist's push-pull scale: the interval, times ceil(log2(N / 32)) + 1 above 32 members."""
        n = self.members.count_live()
        scale = 1 if n <= 32 else math.ceil(math.log2(n / 32)) + 1
        return self.config.full_sync_interval_s * scale

    # -- answering syncs (``receive``) ------------------------------------------------

    def _on_sync(self, env: Envelope, b: Sync, now: float, rng: random.Random, out: list[Send]) -> None:
        to = env.sender_addr
        members_differ = b.members_hash != self.members.members_hash()
        if b.digest_hash == self.catalog.digest_hash() and not members_differ:
            self.stats.syncs_in_agreement += 1
        elif self._pulling(env.sender, now):
            pass  # a resumed sync with it is under way: it would carry the same keys
        elif b.recent is not None:
            self._sync_what_changed(b, b.recent, members_differ, to, now, rng, out)
        else:
            self._send(
                out,
                to,
                SyncDigest(
                    # Only member lists differ: no O(N) catalog digest.
                    None if b.digest_hash == self.catalog.digest_hash() else dict(self.catalog.digest()),
                    self._member_list(now, rng) if members_differ else None,
                ),
            )

    def _on_sync_digest(self, b: SyncDigest, to: str, now: float, rng: random.Random, out: list[Send]) -> None:
        self._check_digest_of_me(b.digest, now)
        theirs_sent = b.members is not None
        if b.members is not None:
            self._merge_records(b.members, now)
        mine = self.catalog.digest()
        # Often only the member lists differ: equal digests need no delta.
        same = b.digest is None or b.digest == mine
        deltas = () if b.digest is None or same else self.catalog.delta_for(b.digest, self.config.delta_budget_bytes, rng)
        self._send(
            out,
            to,
            SyncDelta(
                deltas,
                None if same else dict(mine),
                self._member_list(now, rng) if theirs_sent else None,
            ),
        )

    def _on_sync_delta(self, env: Envelope, b: SyncDelta, now: float, rng: random.Random, out: list[Send]) -> None:
        to = env.sender_addr
        self._check_digest_of_me(b.digest, now)
        if b.members is not None:
            self._merge_records(b.members, now)
        moved = self._apply_deltas(b, now)
        if b.digest is not None:
            deltas, more = self.catalog.delta_and_more(b.digest, self.config.delta_budget_bytes, rng)
            # Resume: it holds more than it sent and this step brought something,
            # so ask again with our new digest (each step is one budget; a lost
            # one ends the chain, and the next round's sync starts from the digest).
            again = moved and self.catalog.behind(b.digest)
            if again:
                self._pulls[env.sender] = now
            if deltas or again:
                self._send(out, to, SyncDelta(deltas, dict(self.catalog.digest()) if again or more else None))

    def _sync_what_changed(self, b: Sync, recent: dict[str, NodeDigest], members_differ: bool, to: str,
                           now: float, rng: random.Random, out: list[Send]) -> None:
        """A sync that names only some origins (what changed at its sender; in an
        answer, what its sender lacks or offers): send the keys of those we hold
        newer, and answer with our entries for those it holds newer (to ask for
        them) and, to an opening, with what changed here lately (an offer).  An
        answer gets at most an answer that asks, which gets only keys: at most
        four messages."""
        if members_differ and not b.answer:  # member lists as a full sync has them, without the catalog digest
            self._send(out, to, SyncDigest(None, self._member_list(now, rng)))
        if b.digest_hash == self.catalog.digest_hash():
            return
        self._check_digest_of_me(recent, now)
        digest = self.catalog.digest()
        theirs_newer: dict[str, NodeDigest] = {}
        mine_newer: dict[str, NodeDigest] = {}
        for nid, d in recent.items():
            if nid == self.id and d.generation <= self.generation:
                if d != digest[nid]:
                    mine_newer[nid] = d
                continue
            m = digest.get(nid)
            if m is None or (d.generation, d.max_version) > (m.generation, m.max_version):
                theirs_newer[nid] = m if m is not None else NodeDigest(0, 0, 0)
            elif m != d:
                mine_newer[nid] = d
        deltas: tuple[NodeDelta, ...] = ()
        if mine_newer:
            deltas, more = self.catalog.delta_and_more(mine_newer, self.config.delta_budget_bytes, rng, only=True)
            if deltas:
                # Cut to the budget: our whole digest, so that it resumes (``SyncDelta``).
                self._send(out, to, SyncDelta(deltas, dict(digest) if more else None))
        if not b.answer:
            theirs_newer.update(self._recent(now, skip=recent))
        if theirs_newer:
            self._send(out, to, Sync(self.catalog.digest_hash(), self.members.members_hash(), theirs_newer, True))
        elif not deltas and not b.answer:
            # The catalogs differ in nothing either of us changed lately (a
            # rumour lost, a node back from a partition): the whole digest, as
            # a full sync would, so that no difference waits for one.
            self._send(out, to, SyncDigest(dict(digest), None))

    def _member_list(self, now: float, rng: random.Random) -> tuple[MemberRecord, ...]:
        cfg = self.config
        n = len(self.members.members)
        if n <= cfg.member_recent_max or rng.random() * n < cfg.member_recent_max:
            return self.members.records()
        return self.members.recent_records(now, cfg.member_recent_s, cfg.member_recent_max)

    def _merge_records(self, records: tuple[MemberRecord, ...], now: float) -> None:
        # Full member lists are O(N) and mostly what we already hold: skip a record
        # equal to ours, or lower in the lattice, before building an update for it
        # (the same outcome ``MemberTable.merge`` would reach, without its cost).
        get = self.members.members.get
        me = self.id
        for r in records:
            m = get(r.node_id)
            if m is not None and r.node_id != me:
                cur = m.record
                if cur is r:
                    continue
                if r.generation != cur.generation:
                    if r.generation < cur.generation:
                        continue
                elif r.incarnation != cur.incarnation:
                    if r.incarnation < cur.incarnation:
                        continue
                elif r.state < cur.state or (r.state == cur.state and r.address <= cur.address):
                    continue
            self._merge_update(MemberUpdate(r), now)

    def _pulling(self, node_id: str, now: float) -> bool:
        t = self._pulls.get(node_id)
        return t is not None and now - t < self.config.pull_hold_s

    def _apply_deltas(self, b: SyncDelta, now: float) -> bool:
        moved = False
        for d in b.deltas:
            m = self.members.get(d.node_id)
            if m is None:
                # An origin we hold no member record for (a restarted node knows the dead
                # only from its restored catalog): catch up on what we already hold, at
                # that generation, but never adopt an origin we do not hold.
                st = self.catalog.nodes.get(d.node_id)
                if st is None or d.generation != st.generation:
                    continue
            elif d.generation != m.record.generation:
                # Only at the generation its member record holds: an older one is
                # stale, and a newer one waits for the record (which the bound on
                # generations checks), so a forged delta cannot install a
                # generation that outranks the real node's keys.
                continue
            if self.catalog.apply_delta(d, now):
                self._changed()
                self._origin_changed(d.node_id, now)
                moved = True
        return moved
