"""One node's whole gossip state machine, sans I/O.

Theory of operation
-------------------
``GossipNode`` combines the member table (SWIM probing with Lifeguard
suspicion, ``membership.py``) and the catalog (scuttlebutt anti-entropy,
``catalog.py``).  It never reads a clock, never draws a random number it was
not handed, and never touches a socket: the caller feeds it

* ``tick(now, rng)`` at or after ``next_deadline()``, and
* ``receive(envelope, now, rng)`` for every decoded peer message,

and sends the ``Send`` items both return.  Messages are one-way (like UDP
datagrams); a lost message is simply never received, and the timers below
deal with it.  The same code runs inside the trio daemon and inside ``sim``.

Every gossip interval a node:

1. opens anti-entropy with ``fanout`` random live peers: ``Sync`` carries
   only the digest and member hashes; a peer that agrees stays silent, one
   that does not answers ``SyncDigest`` (its digest, and its member list if
   those differ), and the two then trade ``SyncDelta``s cut to a byte budget;
2. pushes pending membership rumours (``Gossip``) to ``fanout`` peers;
3. if it knows no live peer, dials its seeds and the dead it remembers; else
   every ``redial_interval_s`` one random dead member (this is what heals a
   partition: each side had declared the other dead).

Every probe interval it pings the next member in a shuffled round-robin
(SWIM).  No ack within ``probe_timeout_s``: it asks ``indirect_checks`` others
to ping the target (``PingReq``) and pings again directly.  Still no ack by
the end of the interval: the target becomes SUSPECT.  A suspect that does not
refute (by bumping its incarnation) before the Lifeguard timeout is declared
DEAD.  ``leave`` marks ourselves LEFT and tells a few peers, so the mesh shows
"left", not "dead".

Forged or mistaken news about ourselves is refuted, never obeyed:

* a record of us at our generation that is not ALIVE, or names another
  address, is refuted by bumping our incarnation (SWIM);
* a record of us at a *higher* generation (another process with our id, or a
  forgery that would evict us: "left" at generation+1), or a peer's digest
  saying our keys go beyond what we wrote, is an identity conflict: we move
  to a generation above it, which supersedes the claim and our old keys
  everywhere, at most once per ``identity_refute_interval_s``, and report it
  in ``notices`` (the daemon logs them at WARNING) and ``stats``;
* generations are wall-clock milliseconds, so a record whose generation is
  more than ``generation_ahead_max_ms`` ahead of the caller's ``wall_ms`` is
  dropped (a forged 2**63-1 would otherwise outrank every restart forever);
* catalog deltas are taken only at the generation our member record holds.

Layout: the settings and returned values are in ``gossipconfig.py``, the
anti-entropy exchange in ``gossipsync.py`` and the leave in ``gossipleave.py``
(mixins of ``GossipNode``); probing, suspicion, rumours and the rounds are
here.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

from .catalog import Catalog
from .gossipconfig import GossipConfig, Notice, Send, Stats
from .gossipleave import LEAVE_ROUNDS, LeaveState, Leaving
from .gossipsync import AntiEntropy
from .membership import BroadcastQueue, MemberTable
from .wire import (
    INT_MAX,
    Ack,
    Envelope,
    Gossip,
    MemberRecord,
    MemberState,
    MemberUpdate,
    NodeDigest,
    Ping,
    PingReq,
    Sync,
    SyncDelta,
    SyncDigest,
)

__all__ = ["LEAVE_ROUNDS", "GossipConfig", "GossipNode", "Notice", "Send", "Stats"]


@dataclass(slots=True)
class _Probe:
    target: str
    address: str
    seq: int
    start: float
    acked: bool = False
    indirect_sent: bool = False


@dataclass(slots=True)
class _Relay:
    origin_addr: str
    origin_seq: int
    target: str
    expires: float


class GossipNode(AntiEntropy, Leaving):
    def __init__(
        self,
        node_id: str,
        address: str,
        generation: int,
        config: GossipConfig,
        now: float,
        seeds: tuple[str, ...] | list[str] = (),
        catalog: Catalog | None = None,
    ) -> None:
        self.id = node_id
        self.address = address
        self.generation = generation
        self.config = config
        me = MemberRecord(node_id, address, generation, 0, MemberState.ALIVE)
        self.members = MemberTable(me, now, config.suspicion())
        self.catalog = catalog or Catalog(
            node_id, generation, tombstone_grace_s=config.tombstone_grace_s
        )
        assert self.catalog.self_id == node_id and self.catalog.own.generation == generation
        # Above all we restored: a peer holding it holds our whole state, and
        # drops what it kept of our previous generation (``Catalog.announce``).
        self.catalog.announce(now)
        self.seeds = tuple(s for s in seeds if s != address)
        self.broadcasts = BroadcastQueue(config.retransmit_mult)
        self.broadcasts.push(MemberUpdate(me))
        self.stats = Stats()
        self.left = False
        self._leaving: LeaveState | None = None
        self._seq = 0
        self._health = 0
        self._probe: _Probe | None = None
        self._probe_order: list[str] = []
        self._relays: dict[int, _Relay] = {}
        self._next_gossip = now
        self._next_probe = now
        self._next_redial = now + config.redial_interval_s
        self._next_housekeeping = now + config.housekeeping_interval_s
        self._started = False
        self.version = 0  # bumped on every change of what we know (persist when it moves)
        self.notices: deque[Notice] = deque(maxlen=64)  # drained by the caller
        self._generation_limit: int | None = None  # set per received message from wall_ms
        self._stale_heard = False  # this message accused us: its sender gets our record straight back
        self._told_dead: dict[str, float] = {}  # node id -> when we last told it that we hold it dead
        self._next_heal_dial = now
        self._due = math.inf  # the deadline we asked for last (``next_deadline``)
        self._lag = 0
        self._on_time_since = now
        self._next_identity_move = now
        self._pulls: dict[str, float] = {}  # peer id -> when a resumed sync with it last moved
        self._origins_changed: dict[str, int] = {}  # origin -> times named since it changed here, oldest first
        self._version_seen = -1  # ``version`` at the last gossip round
        self._active_until = now  # something changed lately: our rounds open syncs until then
        self._next_full_sync = now

    # -- helpers -------------------------------------------------------------

    def _env(self, body: Ping | Ack | PingReq | Gossip | Sync | SyncDigest | SyncDelta) -> Envelope:
        return Envelope(self.config.cluster, self.id, self.generation, self.address, body)

    def _send(self, out: list[Send], to: str, body: Ping | Ack | PingReq | Gossip | Sync | SyncDigest | SyncDelta) -> None:
        self.stats.messages_out += 1
        out.append(Send(to, self._env(body)))

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % 2**62
        return self._seq

    def _piggyback(self) -> tuple[MemberUpdate, ...]:
        return self.broadcasts.take(self.members.count_live(), self.config.piggyback_max)

    def _ping_updates(self, target: str) -> tuple[MemberUpdate, ...]:
        """What a ping to ``target`` carries: Lifeguard's buddy system puts our
        suspicion of the target first, so that it learns of it from the one
        message sure to be addressed to it and refutes in its ack, rather than
        waiting for a rumour whose few retransmissions went elsewhere (a small
        side of a partition under heavy loss)."""
        ups = self._piggyback()
        m = self.members.get(target)
        if m is None or m.state is not MemberState.SUSPECT:
            return ups
        rest = tuple(u for u in ups if u.record.node_id != target)
        return (MemberUpdate(m.record), *rest[: max(self.config.piggyback_max - 1, 0)])

    def _addr(self, node_id: str) -> str:
        m = self.members.get(node_id)
        assert m is not None
        return m.record.address

    def _changed(self) -> None:
        self.version += 1

    @property
    def incarnation(self) -> int:
        return self.members.self_record.incarnation

    # -- local writes ------------------------------------------------------------

    def set(self, key: str, value: object, now: float) -> int:
        v = self.catalog.set(key, value, now)
        self._changed()
        self._origin_changed(self.id, now)
        return v

    def delete(self, key: str, now: float) -> bool:
        done = self.catalog.delete(key, now)
        if done:
            self._changed()
            self._origin_changed(self.id, now)
        return done

    # -- membership changes ------------------------------------------------------

    def _merge_updates(self, updates: tuple[MemberUpdate, ...], now: float) -> None:
        for u in updates:
            self._merge_update(u, now)

    def _merge_update(self, u: MemberUpdate, now: float) -> None:
        rec = u.record
        limit = self._generation_limit
        if limit is not None and rec.generation > limit:
            self.stats.future_generations_dropped += 1
            if self.stats.future_generations_dropped == 1 or self.stats.future_generations_dropped % 1000 == 0:
                self._notice(
                    "future_generation",
                    f"dropped a record of {rec.node_id} at generation {rec.generation}, "
                    f"{(rec.generation - limit + self.config.generation_ahead_max_ms) / 1000:.0f} s ahead of our clock "
                    f"(its clock is wrong, or the record is forged); {self.stats.future_generations_dropped} so far",
                )
            return
        if rec.node_id == self.id:
            self._about_me(rec, now)
            return
        before = self.members.get(rec.node_id)
        old_gen = before.record.generation if before is not None else None
        if self.members.merge(u, now):
            self._changed()
            self.broadcasts.push(u)
            if old_gen is not None and rec.generation > old_gen:
                self.catalog.reset_generation(rec.node_id, rec.generation)
                self._origin_changed(rec.node_id, now)

    def _notice(self, kind: str, text: str) -> None:
        self.notices.append(Notice(kind, text))

    def _about_me(self, rec: MemberRecord, now: float) -> None:
        me = self.members.self_record
        if self.left or rec.generation < me.generation:
            return
        if rec.generation > me.generation:
            self._identity_conflict(
                rec.generation,
                f"the mesh says node {self.id} is at generation {rec.generation} ({rec.state.label}, "
                f"address {rec.address}), above ours ({me.generation}): another process runs with our id, "
                "or the record is forged",
                now,
            )
            return
        wrong = rec.state is not MemberState.ALIVE or rec.address != me.address
        if wrong and rec.incarnation < me.incarnation:
            # A stale accusation: its sender missed our refutation, whose few
            # retransmissions went elsewhere.  Send the refutation again, and
            # straight back to the sender (``receive``), or it declares us dead.
            self.stats.stale_accusations += 1
            self.broadcasts.push(MemberUpdate(me))
            self._stale_heard = True
            return
        if wrong and rec.incarnation >= me.incarnation:
            if rec.incarnation >= INT_MAX:  # no incarnation above it: leave the generation instead
                self._identity_conflict(me.generation, f"a record of us at the last incarnation ({rec.state.label})", now)
                return
            self.stats.refutations += 1
            if rec.state is not MemberState.ALIVE:
                self._health_delta(+1)  # being suspected hints that we are the slow one
            new = MemberRecord(self.id, self.address, self.generation, rec.incarnation + 1, MemberState.ALIVE)
            self.members.set_self(new, now)
            self.broadcasts.push(MemberUpdate(new))
            self._changed()
            # The accuser gets the refutation at once (``receive``): after a
            # partition it may be the only one on its side that hears us.
            self._stale_heard = True

    def _identity_conflict(self, above: int, why: str, now: float) -> None:
        """Someone speaks for us at or above generation ``above``: move past it
        (at most once per ``identity_refute_interval_s``), so our record and our
        keys supersede the claim on every node."""
        self.stats.identity_conflicts += 1
        if now < self._next_identity_move or above >= INT_MAX:
            return
        self._next_identity_move = now + self.config.identity_refute_interval_s
        new_gen = above + 1
        self._notice("identity_conflict", f"{why}; moving to generation {new_gen} to refute it")
        self.stats.generation_moves += 1
        self.generation = new_gen
        self.catalog.move_generation(new_gen)
        self.catalog.announce(now)
        rec = MemberRecord(self.id, self.address, new_gen, 0, MemberState.ALIVE)
        self.members.set_self(rec, now)
        self.broadcasts.push(MemberUpdate(rec))
        self._changed()

    def _check_digest_of_me(self, digest: dict[str, NodeDigest] | None, now: float) -> None:
        """A peer's digest holds more of our keys than we wrote: someone wrote
        in our name (a forged delta at our generation).  Move past it."""
        d = None if digest is None else digest.get(self.id)
        own = self.catalog.own
        if d is None or self.left:
            return
        limit = self._generation_limit
        if limit is not None and d.generation > limit:
            return
        if d.generation > own.generation or (d.generation == own.generation and d.max_version > own.max_version):
            self._identity_conflict(
                max(d.generation, own.generation),
                f"a peer holds keys of node {self.id} (us) at generation {d.generation} version {d.max_version}, "
                f"beyond what we wrote (generation {own.generation} version {own.max_version})",
                now,
            )

    def _learn_sender(self, env: Envelope, now: float) -> None:
        if env.sender == self.id:
            return
        m = self.members.get(env.sender)
        if m is None or env.generation > m.record.generation:
            self._merge_update(
                MemberUpdate(MemberRecord(env.sender, env.sender_addr, env.generation, 0, MemberState.ALIVE)),
                now,
            )

    def _tell_the_dead(self, env: Envelope, now: float, rng: random.Random, out: list[Send]) -> None:
        """A message from a member we hold dead proves it is up (a partition
        healed, or we were wrong): tell it, at most once per probe interval, so
        it refutes at once and its refutation reaches us and, through us, our
        side; and dial ``fanout`` other dead members now (at most once a gossip
        interval), as they may be back too, instead of waiting for the one
        re-dial per ``redial_interval_s``."""
        m = self.members.get(env.sender)
        if m is None or m.state is not MemberState.DEAD or m.record.generation != env.generation:
            return
        if now - self._told_dead.get(env.sender, -math.inf) < self.config.probe_interval_s:
            return
        if len(self._told_dead) >= self.config.relays_max:
            self._told_dead.clear()
        self._told_dead[env.sender] = now
        self._send(out, env.sender_addr, Gossip((MemberUpdate(m.record),)))
        if now >= self._next_heal_dial:
            self._next_heal_dial = now + self.config.gossip_interval_s
            for nid in self.members.gone.sample(rng, self.config.fanout, exclude=env.sender):
                self._send(out, self._addr(nid), self._sync_open())

    def _suspect(self, node_id: str, now: float) -> None:
        m = self.members.get(node_id)
        if m is None or m.state > MemberState.SUSPECT:
            return
        r = m.record
        if m.state is MemberState.ALIVE:
            self.stats.suspicions_raised += 1
        # Already suspect: our own failed probe is an independent confirmation
        # (Lifeguard), which shortens the timeout and is passed on as a rumour.
        self._merge_update(
            MemberUpdate(MemberRecord(r.node_id, r.address, r.generation, r.incarnation, MemberState.SUSPECT), self.id),
            now,
        )

    def _declare_dead(self, node_id: str, now: float) -> None:
        m = self.members.get(node_id)
        if m is None:
            return
        r = m.record
        self.stats.deaths_declared += 1
        self._merge_update(
            MemberUpdate(MemberRecord(r.node_id, r.address, r.generation, r.incarnation, MemberState.DEAD)),
            now,
        )

    # -- time ---------------------------------------------------------------------

    # -- local health (Lifeguard) ---------------------------------------------------

    @property
    def health(self) -> int:
        """Lifeguard's local health score: 0 is healthy, ``health_max`` is struggling."""
        return self._health

    def _health_delta(self, delta: int) -> None:
        self._health = min(max(self._health + delta, 0), self.config.health_max)

    @property
    def lag(self) -> int:
        """How far behind its own deadlines this node has been lately (0: on time)."""
        return self._lag

    def _check_lateness(self, now: float) -> None:
        """Lifeguard: were we late for our own deadline?  Then we are the slow
        one: doubt ourselves (``lag``, ``health``) and give the probe out the
        time we lost, before anyone is accused of our slowness."""
        cfg = self.config
        late = now - self._due
        if late > cfg.late_after_s:
            self.stats.late_ticks += 1
            self._lag = min(self._lag + 1, cfg.lag_max)
            self._health_delta(+1)
            self._on_time_since = now
            p = self._probe
            if p is not None and not p.acked:
                p.start += late
            for nid in self.members.suspects:  # nor do suspicions run while we were stalled
                m = self.members.get(nid)
                if m is not None:
                    m.suspect_start += min(late, max(now - m.suspect_start, 0.0))
        elif self._lag and now - self._on_time_since >= cfg.probe_interval_s:
            self._lag -= 1
            self._on_time_since = now

    def _probe_timeout(self) -> float:
        # A node that misses acks may be the slow one: it gives others longer
        # before it accuses them (Lifeguard's local health multiplier).
        return self.config.probe_timeout_s * (1 + self._health)

    def _probe_interval(self) -> float:
        return self.config.probe_interval_s * (1 + self._health)

    def next_deadline(self) -> float:
        if self.left:  # no more ticks: only the leave's rounds (``leave_deadline``)
            return self.leave_deadline()
        p = self._probe
        # A new probe cannot start while one is out, so its time is no deadline before then.
        next_probe = self._next_probe if p is None else max(self._next_probe, p.start + self._probe_interval())
        t = min(self._next_gossip, next_probe, self._next_housekeeping)
        if p is not None and not p.acked:
            t = min(t, p.start + (self._probe_interval() if p.indirect_sent else self._probe_timeout()))
        return t

    def tick(self, now: float, rng: random.Random) -> list[Send]:
        out: list[Send] = []
        cfg = self.config
        if self.left:
            return out
        if not self._started:
            self._started = True
            # Random phase, so that nodes started together do not gossip in lockstep.
            self._next_gossip = now + rng.random() * cfg.gossip_interval_s
            self._next_probe = now + rng.random() * cfg.probe_interval_s
            if self.seeds:
                for seed in self.seeds:
                    self._send(out, seed, self._sync_open())
        self._check_lateness(now)
        self._tick_probe(now, rng, out)
        if now >= self._next_gossip:
            self._next_gossip = max(self._next_gossip + cfg.gossip_interval_s, now)
            self.stats.gossip_rounds += 1
            self._tick_gossip(now, rng, out)
            for m in self.members.expired_suspicions(now, 1 + self._lag):
                self._declare_dead(m.record.node_id, now)
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + cfg.housekeeping_interval_s
            self._housekeeping(now)
        self._due = self.next_deadline()
        return out

    def _tick_probe(self, now: float, rng: random.Random, out: list[Send]) -> None:
        cfg = self.config
        p = self._probe
        if p is not None:
            if not p.acked and not p.indirect_sent and now >= p.start + self._probe_timeout():
                p.indirect_sent = True
                helpers = self.members.live.sample(rng, cfg.indirect_checks, exclude=p.target)
                for h in helpers:
                    self._send(out, self._addr(h), PingReq(p.seq, p.target, p.address, self._ping_updates(p.target)))
                self._send(out, p.address, Ping(p.seq, p.target, self._ping_updates(p.target)))
            if now >= p.start + self._probe_interval():
                if p.acked:
                    self._health_delta(-1)
                else:
                    self._health_delta(+1)
                    self._suspect(p.target, now)
                self._probe = None
        if self._probe is None and now >= self._next_probe:
            self._next_probe = max(self._next_probe + self._probe_interval(), now)
            target = self._next_probe_target(rng)
            if target is not None:
                addr = self._addr(target)
                p = _Probe(target, addr, self._next_seq(), now)
                self._probe = p
                self._send(out, addr, Ping(p.seq, target, self._ping_updates(target)))

    def _next_probe_target(self, rng: random.Random) -> str | None:
        for _ in range(2):
            while self._probe_order:
                nid = self._probe_order.pop()
                if nid in self.members.live:
                    return nid
            self._probe_order = list(self.members.live)
            rng.shuffle(self._probe_order)
        return None

    def _tick_gossip(self, now: float, rng: random.Random, out: list[Send]) -> None:
        cfg = self.config
        live = self.members.live
        if self.version != self._version_seen:
            self._version_seen = self.version
            self._active_until = now + cfg.changes_recent_s
        full = now >= self._next_full_sync
        active = now < self._active_until or bool(self._origins_changed)
        for nid in live.sample(rng, cfg.fanout if active or full else cfg.idle_sync_fanout):
            if self._pulling(nid, now):  # a resumed sync with it is under way
                continue
            if full:
                full = False
                self._next_full_sync = now + self.full_sync_interval() * (0.5 + rng.random())
                self._send(out, self._addr(nid), self._sync_open())
            else:
                self._send(out, self._addr(nid), self._sync_recent(now))
        if len(self.broadcasts):
            peers = live.sample(rng, cfg.fanout)
            if peers:
                updates = self._piggyback()
                for nid in peers:
                    self._send(out, self._addr(nid), Gossip(updates))
        gone = self.members.gone
        if len(live) == 0:
            # Alone: keep re-dialling the seeds and the dead we remember.
            if self.seeds:
                self._send(out, rng.choice(self.seeds), self._sync_open())
            for nid in gone.sample(rng, 1):
                self._send(out, self._addr(nid), self._sync_open())
        elif now >= self._next_redial:
            self._next_redial = now + cfg.redial_interval_s
            for nid in gone.sample(rng, 1):
                self._send(out, self._addr(nid), self._sync_open())

    def _housekeeping(self, now: float) -> None:
        for nid in self.members.reap(now, self.config.reap_after_s):
            self.catalog.forget(nid)
            self._changed()
        if self.catalog.collect_tombstones(now):
            self._changed()
        for seq in [s for s, r in self._relays.items() if r.expires <= now]:
            del self._relays[seq]
        for nid in [n for n, t in self._pulls.items() if now - t >= self.config.pull_hold_s]:
            del self._pulls[nid]
        for nid in [n for n, t in self._told_dead.items() if now - t >= self.config.probe_interval_s]:
            del self._told_dead[nid]

    # -- messages -------------------------------------------------------------------

    def receive(self, env: Envelope, now: float, rng: random.Random, wall_ms: int | None = None) -> list[Send]:
        """Take one decoded message; what to send in answer.  ``wall_ms`` (the
        caller's wall clock) bounds the generations taken from it; None takes
        any (the simulator's generations are not clocks)."""
        out: list[Send] = []
        if self.left:
            self._leave_acked(env)  # the only message a leaving node still takes
            return out
        self._generation_limit = None if wall_ms is None else wall_ms + self.config.generation_ahead_max_ms
        self.stats.messages_in += 1
        self._stale_heard = False
        self._learn_sender(env, now)
        b = env.body
        to = env.sender_addr
        self._tell_the_dead(env, now, rng, out)
        if isinstance(b, Ping):
            self._merge_updates(b.updates, now)
            if b.target == self.id:
                self._send(out, to, Ack(b.seq, self.id, self._piggyback()))
        elif isinstance(b, Ack):
            self._merge_updates(b.updates, now)
            p = self._probe
            if p is not None and b.seq == p.seq and b.target == p.target:
                p.acked = True
            else:
                r = self._relays.pop(b.seq, None)
                if r is not None and r.target == b.target:
                    self._send(out, r.origin_addr, Ack(r.origin_seq, b.target, self._piggyback()))
        elif isinstance(b, PingReq):
            self._merge_updates(b.updates, now)
            if len(self._relays) < self.config.relays_max:
                seq = self._next_seq()
                self._relays[seq] = _Relay(to, b.seq, b.target, now + self.config.probe_interval_s)
                self._send(out, b.target_addr, Ping(seq, b.target, self._ping_updates(b.target)))
        elif isinstance(b, Gossip):
            self._merge_updates(b.updates, now)
        elif isinstance(b, Sync):
            self._on_sync(env, b, now, rng, out)
        elif isinstance(b, SyncDigest):
            self._on_sync_digest(b, to, now, rng, out)
        elif isinstance(b, SyncDelta):
            self._on_sync_delta(env, b, now, rng, out)
        if self._stale_heard and not isinstance(b, Ping):  # an ack carries it already
            self._send(out, to, Gossip((MemberUpdate(self.members.self_record),)))
        self._due = self.next_deadline()
        return out
