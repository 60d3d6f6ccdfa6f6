"""Invariants and measurements, checked against the simulator's ground truth.

* Every suspicion and every death a node declares (in its own ``tick``) is
  checked against the truth: was the target's generation down, or was it on
  the other side of a partition from the observer, at some time between
  ``2 * probe_interval_s`` before the observer began suspecting and now?  If
  not, it is a *false* suspicion or a *false* death.
* ``check_node`` recomputes a node's incremental hashes from scratch (sampled
  every simulated second: it is O(N)).
* ``check_converged`` (end of a run, after heal and quiet time): every live
  node has the same catalog digest hash and the same resolved models, sees
  every live node ALIVE, and no acknowledged registration is lost unless a
  later-stamped write superseded it.
* ``SpreadWatch`` and ``CrashWatch`` time an update reaching every live node
  and a crash being agreed by every live node.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol.catalog import digest_entry_hash
from protocol.gossip import GossipNode
from protocol.hlc import Stamp
from protocol.membership import record_hash
from protocol.view import resolve_models
from protocol.wire import MemberState

from .clock import SimClock
from .network import Network

__all__ = ["Audit", "CrashWatch", "Event", "Simulated", "SpreadWatch", "Write"]


@dataclass(frozen=True, slots=True)
class Write:
    """An acknowledged registration: it must survive on every node that lives."""

    model: str
    node: int
    generation: int
    stamp: Stamp
    t: float


class Simulated(Protocol):
    """What the audit reads of a simulation (``engine.Simulation`` is one)."""

    n: int
    ids: list[str]
    id_index: dict[str, int]
    gens: list[int]
    left: list[bool]
    left_acked: list[bool]
    writes: list[Write]
    spread: SpreadWatch | None
    net: Network
    clock: SimClock

    @property
    def now(self) -> float: ...

    def node(self, i: int) -> GossipNode: ...

    def is_up(self, i: int) -> bool: ...

    def live(self) -> Sequence[int]: ...

_MASK = 2**64 - 1


@dataclass(frozen=True, slots=True)
class Event:
    t: float
    observer: int
    target: int
    generation: int


@dataclass(slots=True)
class Audit:
    sim: Simulated
    suspicions: int = 0
    false_suspicions: list[Event] = field(default_factory=list)
    deaths: int = 0
    false_deaths: list[Event] = field(default_factory=list)
    # Per node: (generation, up_at, down_at) for every process it has run.
    lives: list[list[tuple[int, float, float]]] = field(default_factory=list)
    suspected_at_end: int = 0

    def __post_init__(self) -> None:
        self.lives = [[] for _ in range(self.sim.n)]

    # -- ground truth ------------------------------------------------------------

    def on_up(self, i: int) -> None:
        self.lives[i].append((self.sim.gens[i], self.sim.now, math.inf))

    def on_down(self, i: int) -> None:
        gen, up_at, _ = self.lives[i][-1]
        self.lives[i][-1] = (gen, up_at, self.sim.now)

    def was_up_throughout(self, j: int, generation: int, start: float, end: float) -> bool:
        for gen, up_at, down_at in reversed(self.lives[j]):
            if gen == generation:
                return up_at <= start and down_at >= end
        return False

    def justified(self, observer: int, target: int, generation: int, since: float) -> bool:
        """Was ``target``'s ``generation`` down, or cut off from ``observer``, in ``[since, now]``?"""
        now = self.sim.now
        if not self.was_up_throughout(target, generation, since, now):
            return True
        return self.sim.net.separated_during(observer, target, since, now)

    # -- declarations (called from the tick that made them) -----------------------

    def on_suspicions(self, i: int, node: GossipNode, local: float) -> None:
        sim = self.sim
        slack = 2 * node.config.probe_interval_s
        for nid in sorted(node.members.suspects):
            m = node.members.members[nid]
            if m.suspect_start != local or node.id not in m.accusers:
                continue
            self.suspicions += 1
            j = sim.id_index[nid]
            if not self.justified(i, j, m.record.generation, sim.now - slack):
                self.false_suspicions.append(Event(sim.now, i, j, m.record.generation))

    def on_deaths(self, i: int, node: GossipNode, suspects: list[str], local: float) -> None:
        sim = self.sim
        slack = 2 * node.config.probe_interval_s
        for nid in suspects:
            m = node.members.members.get(nid)
            if m is None or m.state is not MemberState.DEAD or m.since != local:
                continue
            self.deaths += 1
            j = sim.id_index[nid]
            since = sim.clock.to_global(i, m.suspect_start) - slack
            if not self.justified(i, j, m.record.generation, since):
                self.false_deaths.append(Event(sim.now, i, j, m.record.generation))

    # -- state checks ---------------------------------------------------------------

    def check_node(self, i: int) -> list[str]:
        """Recompute node ``i``'s incremental hashes; O(N), so sampled."""
        node = self.sim.node(i)
        out = []
        cat = node.catalog
        h = 0
        for nid, d in cat.digest().items():
            h = (h + digest_entry_hash(nid, d)) & _MASK
            st = cat.nodes.get(nid)
            if st is None or st.digest() != d:
                out.append(f"t={self.sim.now:.3f} node {i}: digest entry for {nid} is stale")
        if h != cat.digest_hash() or len(cat.digest()) != len(cat.nodes):
            out.append(f"t={self.sim.now:.3f} node {i}: catalog digest hash is stale")
        mh = 0
        for m in node.members:
            if m.state <= MemberState.SUSPECT:
                mh = (mh + record_hash(m.record)) & _MASK
        if mh != node.members.members_hash():
            out.append(f"t={self.sim.now:.3f} node {i}: members hash is stale")
        if cat.own.generation != self.sim.gens[i]:
            out.append(f"t={self.sim.now:.3f} node {i}: catalog generation {cat.own.generation}")
        return out

    def check_converged(self) -> list[str]:
        """End-of-run agreement; call after the faults are over and a quiet time."""
        sim = self.sim
        live = sim.live()
        out: list[str] = []
        if not live:
            return out
        digests = {sim.node(i).catalog.digest_hash() for i in live}
        if len(digests) != 1:
            out.append(f"{len(digests)} distinct catalog digests among {len(live)} live nodes")
        views: dict[int, dict[str, tuple[str, Any]]] = {}
        for i in live:
            models = resolve_models(sim.node(i).catalog.items("reg/"))
            views[i] = {name: (mv.registered_by, mv.stamp) for name, mv in models.items()}
        distinct = {tuple(sorted(v.items())) for v in views.values()}
        if len(distinct) != 1:
            out.append(f"{len(distinct)} distinct resolved model views among {len(live)} live nodes")
        unseen, suspected = self.membership_gaps()
        if unseen:
            out.append(f"{unseen} (observer, live node) pairs: the live node is unknown, dead or an old generation")
        self.suspected_at_end = suspected
        out.extend(self.lost_writes(views))
        return out

    def membership_gaps(self) -> tuple[int, int]:
        """(pairs where a live node is unknown, DEAD/LEFT or an old generation to a live
        observer; pairs where it is merely SUSPECT, which a lossy network always has a few of)."""
        sim = self.sim
        live = sim.live()
        unseen = suspected = 0
        for i in live:
            members = sim.node(i).members
            for j in live:
                if j == i:
                    continue
                m = members.get(sim.ids[j])
                if m is None or m.record.generation != sim.gens[j] or m.state >= MemberState.DEAD:
                    unseen += 1
                elif m.state is MemberState.SUSPECT:
                    suspected += 1
        return unseen, suspected

    def lost_writes(self, views: dict[int, dict[str, tuple[str, Any]]]) -> list[str]:
        """Acknowledged registrations that no later-stamped write superseded must survive.

        A write counts as acknowledged when its writer is up at the end (its
        catalog was restored from disk on restart), or when some live node
        other than the writer holds it (it left the writer before a crash).
        """
        sim = self.sim
        out = []
        for w in sim.writes:
            key = "reg/" + w.model
            durable = sim.is_up(w.node)
            if not durable:
                for i in views:
                    v = sim.node(i).catalog.get(sim.ids[w.node], key)
                    if isinstance(v, dict) and v.get("stamp") == w.stamp.to_wire():
                        durable = True
                        break
                    if isinstance(v, dict) and isinstance(v.get("stamp"), list) and v["stamp"] > w.stamp.to_wire():
                        durable = True  # the writer wrote again later: that is the write to keep
                        break
            if not durable:
                continue
            for i, view in views.items():
                got = view.get(w.model)
                if got is None or got[1] < w.stamp:
                    out.append(f"node {i} lost registration {w.model} stamped {w.stamp} (has {got})")
                    break
        return out

    def left_seen_as_left(self) -> list[str]:
        """A clean leave (one a peer acknowledged) ends as ``left`` on every live
        node that remembers it, while any live node still knows of it.  A leave nobody heard (the node was cut off from
        every peer; the daemon logs that it was not acknowledged) is a crash to
        the rest: ``dead`` or ``left``, never alive."""
        sim = self.sim
        out = []
        for j in range(sim.n):
            if not sim.left[j]:
                continue
            witnessed = any(
                (m := sim.node(i).members.get(sim.ids[j])) is not None and m.state is MemberState.LEFT
                and m.record.generation == sim.gens[j] for i in sim.live())
            for i in sim.live():
                m = sim.node(i).members.get(sim.ids[j])
                if m is None or m.record.generation != sim.gens[j] or m.state is MemberState.LEFT:
                    continue
                # Acknowledged, but every node that knew has since crashed and restarted
                # knowing nothing of it (member tables are not kept on disk): lost news, a crash to the rest.
                if (sim.left_acked[j] and witnessed) or m.state is not MemberState.DEAD:
                    out.append(f"node {i} sees left node {j} as {m.state.label}")
        return out


class SpreadWatch:
    """When does a key written at ``origin`` reach each live node?"""

    def __init__(self, sim: Simulated, origin: int, key: str, version: int) -> None:
        self.sim = sim
        self.origin_id = sim.ids[origin]
        self.generation = sim.gens[origin]
        self.key = key
        self.version = version
        self.t0 = sim.now
        self.targets = len(sim.live())
        self.reached = [False] * sim.n
        self.reached[origin] = True
        self.times: list[float] = [0.0]

    @property
    def done(self) -> bool:
        return len(self.times) >= self.targets

    def on_delta(self, i: int, node: GossipNode) -> None:
        if self.reached[i]:
            return
        st = node.catalog.nodes.get(self.origin_id)
        if st is None or st.generation != self.generation or st.max_version < self.version:
            return
        e = st.keys.get(self.key)
        if e is None or e.version < self.version:
            return
        self.reached[i] = True
        self.times.append(self.sim.now - self.t0)
        if self.done and self.sim.spread is self:
            self.sim.spread = None

    def time_to(self, fraction: float) -> float | None:
        """Seconds until ``fraction`` of the live nodes had it (None: not yet)."""
        need = max(1, math.ceil(fraction * self.targets - 1e-9))
        return self.times[need - 1] if len(self.times) >= need else None


class CrashWatch:
    """When does every live node agree that crashed node ``target`` is dead?"""

    def __init__(self, sim: Simulated, target: int) -> None:
        self.sim = sim
        self.target = target
        self.target_id = sim.ids[target]
        self.generation = sim.gens[target]
        self.t0 = sim.now
        self.first_dead: float | None = None
        self.all_dead: float | None = None
        self.abandoned = False

    def poll(self) -> bool:
        """True when finished (agreed, or the node came back first)."""
        sim = self.sim
        if sim.is_up(self.target) or sim.gens[self.target] != self.generation:
            self.abandoned = True
            return True
        agree = 0
        live = 0
        for i in range(sim.n):
            if i == self.target or not sim.net.up[i]:
                continue
            live += 1
            m = sim.node(i).members.get(self.target_id)
            if m is None or m.record.generation > self.generation or m.state >= MemberState.DEAD:
                agree += 1
        if agree and self.first_dead is None:
            self.first_dead = sim.now - self.t0
        if agree == live:
            self.all_dead = sim.now - self.t0
            return True
        return False
