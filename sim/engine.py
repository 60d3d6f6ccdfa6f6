"""The simulator's event loop: many ``GossipNode``s on one virtual network.

Theory of operation
-------------------
One heap of ``(time, seq, kind, node, payload, extra)`` events drives the run:

* ``DELIVER``: a message lands at ``node`` (sent by ``extra``); the network
  decides again whether the receiver is up and on the sender's side, then the
  node's ``receive`` runs and what it returns is sent.
* ``TICK``: a node timer.  After every step a node's next timer is scheduled at
  ``node.next_deadline()`` (moved from its own clock to true time); a timer
  that was superseded carries an old token and is ignored.
* ``CALL``: a scenario action (crash, restart, partition, a write, a probe).

Everything random comes from one ``random.Random(seed)``: it seeds the network,
the clock skews, the scenario and, per node and generation, the ``Random``
handed to that node.  So a seed replays the same run, which ``trace_hash``
proves: it hashes every delivered message's time, type and endpoints, and the
final digests.

Metrics and invariants are gathered as the run goes (``audit.py``): every
suspicion and death a node declares is checked against the truth (was the
target down, or on the other side of a partition?), updates and crashes can be
watched until they reach everyone.
"""

from __future__ import annotations

import heapq
import math
import random
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import xxhash

from protocol.catalog import Catalog
from protocol.errors import RemoteProtocolError
from protocol.gossip import GossipConfig, GossipNode, Send
from protocol.hlc import HLC, Stamp
from protocol.keys import RegRecord, reg_key
from protocol.registry import Registration, register_write
from protocol.view import resolve_models
from protocol.wire import (
    DeltaEntry,
    Envelope,
    MemberRecord,
    MemberState,
    MemberUpdate,
    MsgType,
    NodeDelta,
    SyncDelta,
    decode,
    encode,
)

from .audit import Audit, CrashWatch, SpreadWatch, Write
from .clock import SimClock
from .network import Network

__all__ = ["SimConfig", "Simulation", "Write"]

_DELIVER = 0
_TICK = 1
_CALL = 2


@dataclass(frozen=True, slots=True)
class SimConfig:
    nodes: int = 50
    seed: int = 1
    loss: float = 0.0
    delay_min_s: float = 0.001
    delay_jitter_s: float = 0.004
    skew_max_s: float = 0.0
    gossip: GossipConfig = field(default_factory=GossipConfig)
    warm: bool = True  # start with every node already knowing every other
    seeds: int = 3  # nodes 0..seeds-1 are the seed list (cold start, restarts)
    join_spread_s: float = 2.0  # cold start: nodes boot at random times in [0, this]
    wire: bool = False  # round-trip every delivered message through encode/decode
    measure_bytes: bool = False  # count len(encode(env)) of every sent message
    check_every_s: float = 1.0  # period of the sampled (expensive) invariant checks
    check_sample: int = 8  # nodes checked in full per period (all when N is small)


class Simulation:
    def __init__(self, cfg: SimConfig) -> None:
        n = cfg.nodes
        assert n >= 1
        self.cfg = cfg
        master = random.Random(cfg.seed)
        self._node_seed = master.getrandbits(64)
        self.clock = SimClock(n, cfg.skew_max_s, random.Random(master.getrandbits(64)))
        self.net = Network(
            n,
            random.Random(master.getrandbits(64)),
            loss=cfg.loss,
            delay_min_s=cfg.delay_min_s,
            delay_jitter_s=cfg.delay_jitter_s,
        )
        self.rng = random.Random(master.getrandbits(64))  # scenario choices
        self._check_rng = random.Random(master.getrandbits(64))
        self.n = n
        self.ids = [f"n{i:05d}" for i in range(n)]
        self.addrs = [f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:7946" for i in range(n)]
        self.index = {a: i for i, a in enumerate(self.addrs)}
        self.id_index = {nid: i for i, nid in enumerate(self.ids)}
        self.seed_addrs = self.addrs[: max(0, min(cfg.seeds, n))]
        self.gens = [0] * n
        self.nodes: list[GossipNode | None] = [None] * n
        self.node_rngs: list[random.Random] = [random.Random(0)] * n
        self.hlcs = [HLC(nid) for nid in self.ids]
        self.left = [False] * n
        self.left_acked = [False] * n  # a peer acknowledged the leave: a clean one
        self.snapshots: list[dict[str, Any] | None] = [None] * n
        self._heap: list[tuple[float, int, int, int, Any, int]] = []
        self._seq = 0
        self._timer_tok = [0] * n
        self._timer_at = [math.inf] * n
        self._trace = xxhash.xxh3_64()
        self._trace_buf = array("q")
        self.delivered = 0
        self.bytes_total = 0
        self.writes: list[Write] = []
        self.violations: list[str] = []
        self.audit = Audit(self)
        self.spread: SpreadWatch | None = None
        self.crash_watches: list[CrashWatch] = []
        for i in range(n):
            self.net.up[i] = False
        if cfg.warm:
            self._warm_start()
        else:
            for i in range(n):
                at = 0.0 if i < cfg.seeds else self.rng.uniform(0.0, cfg.join_spread_s)
                self.at(at, partial(self.boot, i))
        if cfg.check_every_s > 0:
            self.at(cfg.check_every_s, self._periodic_check)

    # -- scheduling ------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.clock.now

    def at(self, t: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` at simulated time ``t`` (not before now)."""
        self._seq += 1
        heapq.heappush(self._heap, (max(t, self.clock.now), self._seq, _CALL, -1, fn, 0))

    def node(self, i: int) -> GossipNode:
        nd = self.nodes[i]
        assert nd is not None, f"node {i} never booted"
        return nd

    def is_up(self, i: int) -> bool:
        return self.net.up[i]

    def live(self) -> list[int]:
        return [i for i in range(self.n) if self.net.up[i]]

    def local(self, i: int) -> float:
        return self.clock.now + self.clock.skews[i]

    def _resched(self, i: int, node: GossipNode) -> None:
        if node.left:
            return  # a leaving node does not tick: its rounds run in _leave_step
        t = node.next_deadline() - self.clock.skews[i]
        if t < self._timer_at[i]:
            tok = self._timer_tok[i] + 1
            self._timer_tok[i] = tok
            self._timer_at[i] = t
            self._seq += 1
            now = self.clock.now
            heapq.heappush(self._heap, (t if t > now else now, self._seq, _TICK, i, tok, 0))

    def run_until(self, t_end: float) -> None:
        heap = self._heap
        clock = self.clock
        pop = heapq.heappop
        deliver = self._deliver
        tick = self._tick
        while heap and heap[0][0] <= t_end:
            t, _, kind, i, payload, extra = pop(heap)
            clock.now = t
            if kind == _DELIVER:
                deliver(i, payload, extra)
            elif kind == _TICK:
                if payload == self._timer_tok[i]:
                    tick(i)
            else:
                payload()
        clock.now = max(clock.now, t_end)

    def run_for(self, duration_s: float) -> None:
        self.run_until(self.clock.now + duration_s)

    # -- the hot path ------------------------------------------------------------

    def _dispatch(self, src: int, sends: list[Send]) -> None:
        net = self.net
        index = self.index
        heap = self._heap
        now = self.clock.now
        measure = self.cfg.measure_bytes
        for s in sends:
            dst = index.get(s.to)
            if dst is None:
                continue
            if measure:
                size = len(encode(s.envelope))
                self.bytes_total += size
            d = net.admit(src, dst)
            if d is None:
                continue
            self._seq += 1
            heapq.heappush(heap, (now + d, self._seq, _DELIVER, dst, s.envelope, src))

    def _deliver(self, dst: int, env: Envelope, src: int) -> None:
        if not self.net.arrives(src, dst):
            return
        node = self.nodes[dst]
        assert node is not None
        if self.cfg.wire:
            try:
                env = decode(encode(env), node.config.cluster)
            except RemoteProtocolError as e:  # the codec refused what the protocol sent
                self.violations.append(f"t={self.clock.now:.3f} wire round trip failed: {e}")
                return
        out = node.receive(env, self.clock.now + self.clock.skews[dst], self.node_rngs[dst])
        tcode = int(env.type)
        self.delivered += 1
        buf = self._trace_buf
        buf.append(int(self.clock.now * 1e6))
        buf.append((tcode << 40) | (src << 20) | dst)
        if len(buf) >= 8192:
            self._trace.update(buf.tobytes())
            del buf[:]
        spread = self.spread
        if spread is not None and tcode == MsgType.SYNC_DELTA:
            assert isinstance(env.body, SyncDelta)
            spread.on_delta(dst, node)
        if out:
            self._dispatch(dst, out)
        self._resched(dst, node)

    def _tick(self, i: int) -> None:
        self._timer_at[i] = math.inf
        if not self.net.up[i]:
            return
        node = self.nodes[i]
        assert node is not None
        local = self.clock.now + self.clock.skews[i]
        deadline = node.next_deadline()
        if local < deadline:
            if deadline - local > 1e-9:
                self._resched(i, node)
                return
            local = deadline
        st = node.stats
        s0, d0 = st.suspicions_raised, st.deaths_declared
        suspects = sorted(node.members.suspects) if node.members.suspects else []
        out = node.tick(local, self.node_rngs[i])
        if st.suspicions_raised != s0:
            self.audit.on_suspicions(i, node, local)
        if st.deaths_declared != d0:
            self.audit.on_deaths(i, node, suspects, local)
        me = node.members.self_record
        if me.state is not MemberState.ALIVE or me.generation != self.gens[i]:
            self.violations.append(f"t={self.clock.now:.3f} node {i} sees itself {me.state.label} gen {me.generation}")
        if out:
            self._dispatch(i, out)
        self._resched(i, node)

    # -- node lifecycle ------------------------------------------------------------

    def _new_rng(self, i: int, generation: int) -> random.Random:
        return random.Random(f"{self._node_seed}:{i}:{generation}")

    def _start(self, i: int, node: GossipNode) -> None:
        self.nodes[i] = node
        self.node_rngs[i] = self._new_rng(i, node.generation)
        self.gens[i] = node.generation
        self.net.up[i] = True
        self.audit.on_up(i)
        self._timer_at[i] = math.inf
        self._timer_tok[i] += 1
        self._resched(i, node)

    def boot(self, i: int, seeds: list[str] | None = None) -> None:
        """Cold start: a fresh node that knows only the seed list."""
        gen = self.gens[i] + 1
        node = GossipNode(
            self.ids[i],
            self.addrs[i],
            gen,
            self.cfg.gossip,
            self.local(i),
            seeds=self.seed_addrs if seeds is None else seeds,
        )
        self._start(i, node)

    def _warm_start(self) -> None:
        """Every node up at t=0, already knowing every other (as after a long quiet run)."""
        cfg = self.cfg.gossip
        recs = [MemberUpdate(MemberRecord(self.ids[i], self.addrs[i], 1, 0, MemberState.ALIVE)) for i in range(self.n)]
        made = [GossipNode(self.ids[i], self.addrs[i], 1, cfg, self.local(i)) for i in range(self.n)]
        # Each node's whole state (its start announcement) is already everywhere.
        resets = [
            NodeDelta(self.ids[i], 1, 0, nd.catalog.own.max_version, 0, True,
                      tuple(DeltaEntry(k, e.version, e.value, e.tombstone) for k, e in nd.catalog.own.keys.items()))
            for i, nd in enumerate(made)
        ]
        for i in range(self.n):
            local = self.local(i)
            node = made[i]
            merge = node.members.merge
            apply = node.catalog.apply_delta
            for j in range(self.n):
                if j != i:
                    merge(recs[j], local)
                    apply(resets[j], local)
            # The cluster has been quiet: nothing left to rumour about ourselves.
            node.broadcasts = type(node.broadcasts)(cfg.retransmit_mult)
            self._start(i, node)

    def crash(self, i: int) -> None:
        """The host dies: it drops everything; its catalog survives on disk."""
        if not self.net.up[i]:
            return
        node = self.node(i)
        self.snapshots[i] = node.catalog.snapshot()
        self.net.up[i] = False
        self.audit.on_down(i)
        self._timer_tok[i] += 1
        self._timer_at[i] = math.inf

    def restart(self, i: int, *, restore: bool = True) -> None:
        """A new process with a higher generation, its catalog restored from disk."""
        if self.net.up[i]:
            return
        gen = self.gens[i] + 1
        local = self.local(i)
        cat = Catalog(self.ids[i], gen, tombstone_grace_s=self.cfg.gossip.tombstone_grace_s)
        snap = self.snapshots[i]
        if restore and snap is not None:
            cat.restore(snap, local, gen)
        self.hlcs[i] = HLC(self.ids[i])
        seeds = [a for a in self.seed_addrs if a != self.addrs[i]] or [
            self.addrs[(i + 1) % self.n]
        ]
        node = GossipNode(self.ids[i], self.addrs[i], gen, self.cfg.gossip, local, seeds=seeds, catalog=cat)
        self._start(i, node)

    def leave(self, i: int) -> None:
        """Graceful leave: tell a few peers, stay reachable until one of them
        acknowledges (or every round was tried), then the process exits."""
        if not self.net.up[i]:
            return
        node = self.node(i)
        out = node.leave(self.local(i), self.node_rngs[i])
        self._dispatch(i, out)
        self.left[i] = True
        self._timer_tok[i] += 1  # no more ticks: only the leave's own rounds
        self._timer_at[i] = math.inf
        self._leave_step(i, node)

    def _leave_step(self, i: int, node: GossipNode) -> None:
        if not self.net.up[i] or self.nodes[i] is not node:
            return  # crashed while leaving
        if not node.leave_settled:
            local = self.local(i)
            # As for ticks: a deadline a rounding error away counts as reached (else
            # ``now + wait == now`` in floating point, and the step repeats forever).
            local = max(local, min(node.leave_deadline(), local + 1e-9))
            self._dispatch(i, node.leave_tick(local, self.node_rngs[i]))
        if node.leave_settled:
            self.left_acked[i] = node.leaving_ack is not None
            self.net.up[i] = False
            self.audit.on_down(i)
            return
        wait = node.leave_deadline() - self.local(i)
        self.at(self.clock.now + min(max(wait, 1e-6), 0.05), partial(self._leave_step, i, node))

    def partition(self, groups: list[int]) -> None:
        self.net.partition(groups, self.clock.now)

    def heal(self) -> None:
        self.net.heal(self.clock.now)

    # -- writes ----------------------------------------------------------------------

    def register(self, i: int, model: str, metadata: dict[str, Any] | None = None) -> Stamp:
        """Register ``model`` through node ``i``, by the rules ``POST /models`` follows."""
        node = self.node(i)
        existing = resolve_models(node.catalog.items(reg_key(model))).get(model)
        reg = Registration("llm", None, metadata or {})
        [(key, value)], _warning = register_write(model, reg, existing, self.hlcs[i], self.clock.local_ms(i))
        stamp = RegRecord.from_value(value).stamp
        node.set(key, value, self.local(i))
        self.writes.append(Write(model, i, self.gens[i], stamp, self.clock.now))
        self._resched(i, node)
        return stamp

    def write_probe(self, i: int, key: str, value: Any) -> SpreadWatch:
        """Write one key on node ``i`` and watch it spread to every live node."""
        node = self.node(i)
        version = node.set(key, value, self.local(i))
        self.spread = SpreadWatch(self, i, key, version)
        self._resched(i, node)
        return self.spread

    def watch_crash(self, i: int) -> CrashWatch:
        w = CrashWatch(self, i)
        self.crash_watches.append(w)
        if len(self.crash_watches) == 1:
            self.at(self.clock.now + 0.1, self._poll_crashes)
        return w

    def _poll_crashes(self) -> None:
        pending = [w for w in self.crash_watches if not w.poll()]
        self.crash_watches = pending
        if pending:
            self.at(self.clock.now + 0.1, self._poll_crashes)

    # -- checks ------------------------------------------------------------------------

    def _periodic_check(self) -> None:
        live = self.live()
        k = self.cfg.check_sample
        sample = live if len(live) <= k else self._check_rng.sample(live, k)
        for i in sample:
            self.violations.extend(self.audit.check_node(i))
        self.at(self.clock.now + self.cfg.check_every_s, self._periodic_check)

    def trace_hash(self) -> str:
        h = self._trace.copy()
        h.update(self._trace_buf.tobytes())
        for i in range(self.n):
            nd = self.nodes[i]
            up = self.net.up[i]
            cat = nd.catalog.digest_hash() if nd is not None else 0
            mem = nd.members.members_hash() if nd is not None else 0
            h.update(f"{i}:{int(up)}:{self.gens[i]}:{cat}:{mem};".encode())
        return h.hexdigest()
