"""Leaving the mesh gracefully: the ``GossipNode`` half that says goodbye.

``leave`` marks our own record LEFT and tells a few peers in Pings; until one
of them acknowledges, ``leave_tick`` tells others, for at most
``LEAVE_ROUNDS`` rounds, so the mesh shows us "left", not "dead".  A mixin of
``GossipNode`` (``gossip.py``): it works on the node's own state.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .wire import Ack, Envelope, MemberRecord, MemberState, MemberUpdate, Ping

if TYPE_CHECKING:
    from .gossipconfig import GossipConfig, Send
    from .membership import MemberTable
    from .wire import Gossip, PingReq, Sync, SyncDelta, SyncDigest

__all__ = ["LEAVE_ROUNDS", "Leaving"]


LEAVE_ROUNDS = 3  # rounds of telling peers we leave, until one acknowledges


@dataclass(slots=True)
class LeaveState:
    record: MemberRecord  # ours, LEFT
    tell: int  # peers told per round
    rounds: int = 0
    next_at: float = 0.0
    told: set[str] = field(default_factory=set)
    pending: dict[int, str] = field(default_factory=dict)  # Ping seq -> the peer it went to
    acked: str | None = None  # the first peer that acknowledged
    gave_up: bool = False


class Leaving:
    """``GossipNode``'s leave (a mixin: the node holds the state it reads)."""

    if TYPE_CHECKING:
        id: str
        address: str
        config: GossipConfig
        members: MemberTable
        left: bool
        _leaving: LeaveState | None

        def _send(self, out: list[Send], to: str, body: Ping | Ack | PingReq | Gossip | Sync | SyncDigest | SyncDelta) -> None: ...
        def _next_seq(self) -> int: ...
        def _addr(self, node_id: str) -> str: ...
        def _changed(self) -> None: ...

    def leave(self, now: float, rng: random.Random, tell: int = 4) -> list[Send]:
        """Mark ourselves LEFT and tell up to ``tell`` live peers.

        The news travels in Pings, so a peer that takes it answers with an
        Ack: until one does, ``leave_tick`` tells ``tell`` other peers every
        probe timeout, at most ``LEAVE_ROUNDS`` rounds (a lost message, or a
        partition around us, would otherwise leave the whole mesh to declare
        us dead).  The caller keeps us reachable until ``leave_settled``."""
        out: list[Send] = []
        if self.left:
            return out
        me = self.members.self_record
        rec = MemberRecord(self.id, self.address, me.generation, me.incarnation, MemberState.LEFT)
        self.members.set_self(rec, now)
        self._changed()
        self.left = True
        self._leaving = LeaveState(rec, tell)
        self._leave_round(now, rng, out)
        return out

    def _leave_round(self, now: float, rng: random.Random, out: list[Send]) -> None:
        lv = self._leaving
        assert lv is not None
        lv.rounds += 1
        lv.next_at = now + self.config.probe_timeout_s
        # Nobody live (a partition around us, or we declared them dead wrongly):
        # the dead we remember, who may hear us yet.
        pool = self.members.live if len(self.members.live) else self.members.gone
        shuffled = pool.sample(rng, len(pool))
        # Peers not told yet first; in a small mesh, the same ones again.
        order = [n for n in shuffled if n not in lv.told] + [n for n in shuffled if n in lv.told]
        for nid in order[: lv.tell]:
            seq = self._next_seq()
            lv.told.add(nid)
            lv.pending[seq] = nid
            self._send(out, self._addr(nid), Ping(seq, nid, (MemberUpdate(lv.record),)))

    def leave_tick(self, now: float, rng: random.Random) -> list[Send]:
        """While leaving: tell more peers if none has acknowledged yet."""
        out: list[Send] = []
        lv = self._leaving
        if lv is None or self.leave_settled or now < lv.next_at:
            return out
        if lv.rounds < LEAVE_ROUNDS:
            self._leave_round(now, rng, out)
        else:
            lv.next_at = math.inf  # given up: the peers that heard spread it, or we are dead to them
            lv.gave_up = True
        return out

    @property
    def leave_settled(self) -> bool:
        """Left, and a peer acknowledged it (or every round was tried)."""
        lv = self._leaving
        return lv is not None and (lv.acked is not None or lv.gave_up)

    @property
    def leaving_ack(self) -> str | None:
        """The peer that acknowledged our leave, if one did."""
        return None if self._leaving is None else self._leaving.acked

    def leave_deadline(self) -> float:
        lv = self._leaving
        return math.inf if lv is None or self.leave_settled else lv.next_at

    def _leave_acked(self, env: Envelope) -> None:
        lv = self._leaving
        b = env.body
        if lv is not None and isinstance(b, Ack) and lv.pending.get(b.seq) == b.target:
            lv.acked = b.target
