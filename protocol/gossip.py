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
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

from .catalog import Catalog
from .membership import BroadcastQueue, MemberTable, SuspicionConfig
from .wire import (
    INT_MAX,
    Ack,
    Envelope,
    Gossip,
    MemberRecord,
    MemberState,
    MemberUpdate,
    NodeDelta,
    NodeDigest,
    Ping,
    PingReq,
    Sync,
    SyncDelta,
    SyncDigest,
)

__all__ = ["GossipConfig", "GossipNode", "Notice", "Send"]


@dataclass(frozen=True, slots=True)
class GossipConfig:
    cluster: str = "meshnode"
    gossip_interval_s: float = 0.5
    fanout: int = 2
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 0.5
    indirect_checks: int = 3
    suspicion_mult: float = 3.0
    suspicion_max_mult: float = 6.0
    retransmit_mult: int = 4
    piggyback_max: int = 16
    # One random dead member is re-dialled this often: what finds the other side
    # when a partition heals (first contact in about redial_interval_s / side size).
    redial_interval_s: float = 1.0
    reap_after_s: float = 3600.0
    tombstone_grace_s: float = 3600.0
    delta_budget_bytes: int = 256 * 1024
    relays_max: int = 1024
    housekeeping_interval_s: float = 5.0
    health_max: int = 8
    # Lifeguard's local health, for suspicions: a tick later than its deadline
    # by more than ``late_after_s`` (our process was starved) raises ``lag``,
    # up to ``lag_max``, and each probe interval on time lowers it; suspicion
    # timeouts are stretched by (1 + lag), and the probe out gets back the time
    # we lost, so a slow host doubts itself before it accuses others.
    late_after_s: float = 0.25
    lag_max: int = 4
    # Member lists in anti-entropy: the records changed lately (at most
    # ``member_recent_max``), and the whole list with probability
    # member_recent_max / N, so that churn from false suspicions at scale
    # costs about the same bytes per exchange at any N, not O(N).  Small
    # tables always go whole.
    member_recent_s: float = 10.0
    member_recent_max: int = 32
    # Generations are wall-clock ms: one further ahead of ours than this is refused.
    generation_ahead_max_ms: int = 60_000
    # An identity conflict moves our generation at most this often.
    identity_refute_interval_s: float = 5.0
    # A sync cut by the budget resumes at once: the receiver asks again with
    # its new digest while each answer brings it something.  Meanwhile the two
    # open no other sync with each other (it would carry the same keys) for
    # this long after the last step.
    pull_hold_s: float = 1.0
    # Steady gossip carries what changed: a node whose catalog changed opens
    # its round's syncs with the digest entries of the origins that changed,
    # each named ``retransmit_mult * ceil(log10(N + 1))`` times (as a rumour
    # is), at most ``changes_recent_max`` a sync; a node whose members
    # changed in the last ``changes_recent_s`` syncs with ``fanout`` peers
    # too; one with nothing new opens ``idle_sync_fanout``.  A full sync
    # (every digest entry, if the hashes differ) goes to one random peer every
    # ``full_sync_interval_s``, scaled with N as memberlist's push-pull is
    # (x ceil(log2(N / 32)) + 1 above 32 members), and to seeds and the dead.
    changes_recent_s: float = 2.0
    changes_recent_max: int = 32
    full_sync_interval_s: float = 10.0
    # A node with nothing new still opens this many syncs a round (the pull
    # half of push-pull: a peer answers with what changed at it lately).
    idle_sync_fanout: int = 1

    def __post_init__(self) -> None:
        assert self.gossip_interval_s > 0 and self.probe_interval_s > 0
        assert 0 < self.probe_timeout_s < self.probe_interval_s
        assert self.fanout >= 1 and self.indirect_checks >= 0
        assert self.delta_budget_bytes >= 1024

    def suspicion(self) -> SuspicionConfig:
        return SuspicionConfig(
            probe_interval_s=self.probe_interval_s,
            suspicion_mult=self.suspicion_mult,
            suspicion_max_mult=self.suspicion_max_mult,
            expected_confirmations=self.indirect_checks,
        )


@dataclass(frozen=True, slots=True)
class Send:
    to: str  # peer address
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class Notice:
    """Something an operator should hear about (the daemon logs it at WARNING)."""

    kind: str  # "identity_conflict", "future_generation"
    text: str


LEAVE_ROUNDS = 3  # rounds of telling peers we leave, until one acknowledges


@dataclass(slots=True)
class _Leaving:
    record: MemberRecord  # ours, LEFT
    tell: int  # peers told per round
    rounds: int = 0
    next_at: float = 0.0
    told: set[str] = field(default_factory=set)
    pending: dict[int, str] = field(default_factory=dict)  # Ping seq -> the peer it went to
    acked: str | None = None  # the first peer that acknowledged
    gave_up: bool = False


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


@dataclass(slots=True)
class Stats:
    messages_in: int = 0
    messages_out: int = 0
    suspicions_raised: int = 0
    stale_accusations: int = 0
    deaths_declared: int = 0
    refutations: int = 0
    identity_conflicts: int = 0
    generation_moves: int = 0
    future_generations_dropped: int = 0
    syncs_in_agreement: int = 0
    late_ticks: int = 0  # ticks later than our own deadline by more than ``late_after_s``
    gossip_rounds: int = 0
    counters: dict[str, int] = field(default_factory=dict)


class GossipNode:
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
        self._leaving: _Leaving | None = None
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

    def _origin_changed(self, node_id: str, now: float) -> None:
        oc = self._origins_changed
        oc.pop(node_id, None)
        oc[node_id] = 0
        if len(oc) > 4 * self.config.changes_recent_max:
            del oc[next(iter(oc))]

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
        elif isinstance(b, SyncDigest):
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
        elif isinstance(b, SyncDelta):
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
        if self._stale_heard and not isinstance(b, Ping):  # an ack carries it already
            self._send(out, to, Gossip((MemberUpdate(self.members.self_record),)))
        self._due = self.next_deadline()
        return out

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

    # -- leaving ---------------------------------------------------------------------

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
        self._leaving = _Leaving(rec, tell)
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
