"""A swarm of receivers pulling one copy, with the daemon's own policy, at scale.

``python -m sim swarm``: seeds hold a copy; N receivers pull it.  Each
receiver runs what the daemon's ``Puller`` runs, unchanged: a ``ChunkPlan``
(rarest first, random first picks, endgame, stalls) and, every
``SOURCE_REFRESH_S``, ``protocol.transfer.swarm.refresh`` (its neighbours
in the swarm's graph, how many requests each, which chunks each may be
asked for).  What the daemon does with sockets is a fluid model here:

* every node has an uplink and a downlink (``link_bps``, a quarter of it for
  the slow ones), as ``bench/swarm_netns.py`` shapes them with tc tbf; in a
  rack topology each rack also has one shared uplink to the core, each way;
* a chunk request is a flow through the links on its path; the flows
  through a link share it equally, and a flow moves at the least of its
  shares.  Event-driven: a flow's rate changes only when a flow starts or
  ends on one of its links, so each event recomputes the flows on those
  links alone, and a heap says which flow ends next;
* a receiver learns a partial holder's chunks when it first asks for them,
  then as the holder tells its neighbours (the daemon's long-poll ``HAVE``);
  a chunk is passed on as it arrives (cut-through), but for one coming from
  a source its plan holds back (``ChunkPlan.held_back``: it lags), which is
  passed on once it is complete (verified);
* a node that dies stops sending (its requests stall until the plan's
  stall timeout or the endgame) and leaves the others' views
  ``DETECT_S`` later; a receiver that joins late starts then.

The reference is the star in the same model: the same receivers with only
the seed as a source, which is what a central server (or scp from one host)
does.  Bounds: S/B (one receiver's own link) and N x S/B (the seed sending
every receiver a copy).  Control-plane bytes are counted beside the data:
chunk requests and reply headers, the ``HAVE`` bitfields neighbours send
each other, and the transfer records every receiver gossips to every node.
"""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass, field

import msgpack

from protocol.keys import XferRecord
from protocol.transfer.chunkplan import ChunkPlan
from protocol.transfer.neighbours import SwarmGraph
from protocol.transfer.states import TransferStatus
from protocol.transfer.swarm import (
    PER_PEER_INFLIGHT,
    STALL_FACTOR,
    UPLOAD_SLOTS,
    progress_interval_s,
    refresh,
)

from .swarmflows import _FLOW, _Flow, _Links, _Node

__all__ = ["SwarmResult", "SwarmSpec", "run_swarm", "simulate"]

SEED = "seed"
SOURCE_REFRESH_S = 0.5  # as the daemon's puller
STALL_S = 10.0  # the daemon's --chunk-stall default
DETECT_S = 10.0  # a dead node leaves the views this long after it died (the failure detector)
START_JITTER_S = 0.1  # receivers asked at once start within this of each other
GOSSIP_S = 1.0  # a transfer or copy record reaches every node this long after it is written
KEY = "5eed" * 8  # the manifest hash: the swarm graph's key
REQUEST_BYTES = 1 + 16 + 4 + 9  # a chunk request and its reply's header
HAVE_BYTES = 1 + 16 + 4 + 4 + 9  # a (long-poll) HAVE request and its reply's header; + the bitfield
XFER_RECORD_BYTES = len(msgpack.packb(XferRecord(
    model="org/some-model", kind="disk", status=TransferStatus.RUNNING, manifest_hash=KEY, bytes_done=1 << 27,
    bytes_total=1 << 28, rate_bps=12_000_000, sources=tuple(f"r{i:04d}" for i in range(8)),
    started_ms=1_760_000_000_000, chunks_total=256, chunks_fetched=128, source="seed:disk").to_value())) + 40


@dataclass(frozen=True)
class SwarmSpec:
    """One run: ``receivers`` pull ``chunks`` chunks from ``seeds`` seeds."""

    receivers: int
    chunks: int = 256
    chunk_bytes: int = 1 << 20
    link_bps: float = 100e6 / 8
    seeds: int = 1
    slow: float = 0.0  # the share of receivers on ``slow_factor`` of the link rate
    slow_factor: float = 0.25
    die: float = 0.0  # the share of receivers that die between 25% and 75% of S/B
    late: float = 0.0  # the share of receivers that join between 25% and 75% of S/B
    racks: int = 0  # > 0: receivers spread over this many racks, each behind one shared uplink
    rack_uplink_bps: float | None = None  # each way; default link_bps
    rack_labels: bool = True  # the nodes carry rack= labels (False: the same topology, the policy blind to it)
    star: bool = False  # every receiver sees only the seeds
    seed: int = 1
    upload_slots: int = UPLOAD_SLOTS  # chunk sends a holder runs at once; more requests wait their turn
    cut_through: bool = True  # a receiver passes a chunk on as it arrives (its last bytes once verified)
    gossip_s: float = GOSSIP_S
    time_limit_s: float = 100_000.0


@dataclass(frozen=True)
class SwarmResult:
    receivers: int
    chunks: int
    chunk_bytes: int
    link_bps: float
    finish_s: list[float]  # per healthy receiver (not dead), from the common start, sorted
    seed_sent: float  # bytes the seeds uploaded
    duplicates: int  # chunks a receiver got twice (endgame)
    bytes_sent: float = 0.0  # bytes every node uploaded (cancelled requests' bytes too)
    bound_ratio: dict[str, float] = field(default_factory=dict)  # healthy receiver -> its time / its own bound
    rack_in: list[float] = field(default_factory=list)  # bytes into each rack across its uplink
    control: dict[str, float] = field(default_factory=dict)  # control-plane bytes by kind
    healthy: int = 0
    wall_s: float = 0.0

    @property
    def s_over_b(self) -> float:
        return self.chunks * self.chunk_bytes / self.link_bps

    @property
    def last_s(self) -> float:
        return self.finish_s[-1]

    @property
    def size(self) -> int:
        return self.chunks * self.chunk_bytes


_REFRESH, _DIE, _JOIN, _FORGET, _SEEN, _SEEN_DONE = range(1, 7)  # event kinds after _FLOW (0, swarmflows)


class _Swarm(_Links):
    """The event loop: flows on links (``_Links``), receivers running the daemon's policy."""

    sweep_at = 4096  # the heap's size (at least) at which the outdated flow ends are swept out

    def __init__(self, spec: SwarmSpec) -> None:
        self.spec = spec
        n = self.n = spec.chunks
        self.size = float(spec.chunk_bytes)
        rng = random.Random(spec.seed)
        self.nodes: list[_Node] = []
        self.by_name: dict[str, _Node] = {}
        racked = spec.racks > 0
        for s in range(spec.seeds):
            self._add(SEED if s == 0 else f"{SEED}{s + 1}", None, spec.link_bps, whole=True)
        order = list(range(spec.receivers))
        rng.shuffle(order)  # which receivers are slow, die, join late: a random draw
        n_slow, n_die, n_late = (round(x * spec.receivers) for x in (spec.slow, spec.die, spec.late))
        slow, die, late = set(order[:n_slow]), set(order[n_slow:n_slow + n_die]), \
            set(order[n_slow + n_die:n_slow + n_die + n_late])
        for i in range(spec.receivers):
            bps = spec.link_bps * (spec.slow_factor if i in slow else 1.0)
            self._add(f"r{i:04d}", i % spec.racks if racked else None, bps, whole=False)
        self.seeds = [nd for nd in self.nodes if nd.done_at is not None]
        m = len(self.nodes)
        # links: node i's uplink 2i, downlink 2i+1; rack r's uplink to the core 2m+2r (out), 2m+2r+1 (in)
        self.cap = [0.0] * (2 * m + 2 * max(spec.racks, 0))
        for nd in self.nodes:
            self.cap[2 * nd.idx] = nd.up_bps
            self.cap[2 * nd.idx + 1] = nd.down_bps
        self.rack_base = 2 * m
        for r in range(spec.racks):
            self.cap[2 * m + 2 * r] = self.cap[2 * m + 2 * r + 1] = spec.rack_uplink_bps or spec.link_bps
        self.lflows: list[dict[int, _Flow]] = [{} for _ in self.cap]  # link -> its flows, by key
        self.link_bytes = [0.0] * len(self.cap)
        self.load = [0.0] * len(self.cap)  # the sum of the rates of the flows on each link
        self.dirty: dict[tuple[int, ...], None] = {}  # links to share again before time moves on
        self.kick: set[_Node] = set()  # receivers to ask for more requests after this event
        self.left = 0  # receivers still pulling
        self.sent = [0.0] * m
        self.flows: dict[tuple[int, int, int], _Flow] = {}  # (dst, src, chunk) -> its flow
        self.watchers: list[dict[_Node, bytes | None]] = [{} for _ in range(m)]  # holder -> who follows it
        self.labels = {nd.name: f"rack{nd.rack}" for nd in self.nodes if nd.rack is not None} \
            if spec.rack_labels else {}
        self.heap: list[tuple[float, int, int, object, int]] = []
        self.seq = 0
        self.sweeps = 0  # times the heap was swept (``run``)
        self.now = 0.0
        self.duplicates = 0
        self.control = {"requests": 0.0, "have": 0.0, "progress gossip": 0.0}
        self.members: set[str] = {nd.name for nd in self.seeds}
        self.complete: set[str] = set(self.members)
        self._view: tuple[frozenset[str], frozenset[str], SwarmGraph] | None = None
        s_over_b = n * self.size / spec.link_bps
        for nd in self.nodes:
            if nd.done_at is not None:
                continue
            i = int(nd.name[1:])
            nd.rng = random.Random(rng.getrandbits(64))
            if i in late:
                nd.late = True
                self._push(rng.uniform(0.25, 0.75) * s_over_b, _JOIN, nd, 0)
            else:
                self._join(nd, rng.uniform(0, START_JITTER_S))
            if i in die:
                self._push(rng.uniform(0.25, 0.75) * s_over_b, _DIE, nd, 0)

    def _add(self, name: str, rack: int | None, bps: float, *, whole: bool) -> None:
        nd = _Node(len(self.nodes), name, rack, bps, self.n, whole)
        self.nodes.append(nd)
        self.by_name[name] = nd

    def _push(self, t: float, kind: int, a: object, b: int) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b))

    # -- the views every receiver reads (the catalog, as gossip has it) --------------------------

    def view(self) -> tuple[frozenset[str], frozenset[str], SwarmGraph]:
        if self._view is None:
            members, complete = frozenset(self.members), frozenset(self.complete)
            graph = SwarmGraph(members, complete=complete, racks=self.labels, key=KEY)
            self._view = (members, complete, graph)
        return self._view

    def _changed(self) -> None:
        self._view = None

    def _open(self, dst: _Node, src: _Node, chunk: int) -> bool:
        """Request ``chunk`` of ``src`` for ``dst``; False when ``src`` refuses it at once."""
        self.seq += 1
        f = _Flow(self.seq, src, dst, chunk, self.size, self._path(src, dst))
        f.t = self.now
        self.flows[(dst.idx, src.idx, chunk)] = f
        self.control["requests"] += REQUEST_BYTES
        if src.dead:  # unknown to dst yet: the request hangs until a stall or the endgame
            return True
        if not src.have[chunk]:
            up = src.streaming.get(chunk)
            if up is None:  # told of a chunk whose arrival then failed: refused
                del self.flows[(dst.idx, src.idx, chunk)]
                f.alive = False
                assert dst.plan is not None
                dst.plan.on_failed(src.name, chunk, self.now)
                return False
            f.up = up
            up.downs.append(f)
        if src.active < self.spec.upload_slots:
            self._activate(f)
        else:
            src.queue.append(f)
        return True

    def _activate(self, f: _Flow) -> None:
        d, c = f.dst, f.chunk
        if self.spec.cut_through and d.plan is not None and d.done_at is None and not d.have[c] \
                and c not in d.streaming and f.src.name not in d.plan.held_back:
            d.streaming[c] = f  # passed on as it arrives: its neighbours hear of it now
            self._tell(d, c)
        f.src.active += 1
        f.on = True
        f.t = self.now
        for link in f.links:
            self.lflows[link][f.key] = f
        self._reflow(f.links)

    def _stop(self, f: _Flow) -> None:
        """Take ``f`` off its links (delivered, cancelled, or its source died)."""
        self._set_rate(f, 0.0)
        f.on = False
        f.src.active -= 1
        for link in f.links:
            del self.lflows[link][f.key]
        self._reflow(f.links)

    def _close(self, f: _Flow) -> None:
        f.alive = False
        if f.up is not None:
            f.up.downs.remove(f)
            f.up = None
        d = f.dst
        if d.streaming.get(f.chunk) is f:
            del d.streaming[f.chunk]
            downs, f.downs = f.downs, []
            for g in downs:
                g.up = None
                if not f.delivered and not d.have[f.chunk] and not d.dead:  # it will not come: passing it on fails
                    if g.alive:
                        self._close(g)
                    if g.dst.plan is not None and g.dst.done_at is None:
                        g.dst.plan.on_failed(d.name, f.chunk, self.now)
                        self.kick.add(g.dst)
                elif g.on:
                    self.dirty[g.links] = None
            if not f.delivered and not d.have[f.chunk]:
                self._untell(d, f.chunk)
        del self.flows[(f.dst.idx, f.src.idx, f.chunk)]
        if f.on:
            self._stop(f)
            src = f.src
            while src.queue and src.active < self.spec.upload_slots and not src.dead:
                g = src.queue.popleft()  # first come, first served (a cancelled request is skipped)
                if g.alive:
                    self._activate(g)

    def _cancel(self, dst: _Node, pairs: list[tuple[str, int]]) -> None:
        for peer, chunk in pairs:
            f = self.flows.get((dst.idx, self.by_name[peer].idx, chunk))
            if f is not None:
                self._close(f)

    # -- receivers ---------------------------------------------------------------------------------

    def _join(self, nd: _Node, t: float) -> None:
        nd.start_s = t
        nd.plan = ChunkPlan(self.n, per_peer_inflight=PER_PEER_INFLIGHT, stall_timeout_s=STALL_S,
                            stall_factor=STALL_FACTOR)
        nd.seeds = frozenset(self.complete)  # the copies older than its transfer
        self._push(t, _REFRESH, nd, 0)
        self._push(t + self.spec.gossip_s, _SEEN, nd, 0)  # its transfer record reaches the others

    def _start(self, nd: _Node) -> None:
        if nd.done_at is not None or nd.dead or nd.plan is None:
            return
        for _ in range(8):  # again when a source refused at once (a chunk whose arrival failed)
            refused = False
            for peer, chunk in nd.plan.next_requests(self.now, nd.rng):
                if not self._open(nd, self.by_name[peer], chunk):
                    refused = True
            if not refused:
                break

    def _refresh(self, nd: _Node) -> None:
        if nd.done_at is not None or nd.dead or nd.plan is None:
            return
        plan = nd.plan
        self._cancel(nd, plan.expire(self.now))
        if self.spec.star:
            found: frozenset[str] = frozenset(s.name for s in self.seeds if not s.dead)
            complete, graph = found, None
        else:
            found, complete, g = self.view()
            graph = g
        r = refresh(plan, found, complete, nd.name, lambda p: nd.delivered.get(p, 0) > 0, nd.pulling, nd.rng,
                    racks=self.labels, key=KEY, seeds=nd.seeds, graph=graph)
        nd.pulling = r.pulling
        self._cancel(nd, r.cancel)
        for peer in [p for p in nd.watching if p not in r.ask]:
            del nd.watching[peer]
            self.watchers[self.by_name[peer].idx].pop(nd, None)
        bitfield = (self.n + 7) // 8
        for peer, cap in r.ask.items():
            holder = self.by_name[peer]
            mask = r.allowed.get(peer)
            bits = bytes(holder.have) if mask is None else \
                (int.from_bytes(holder.have, "little") & int.from_bytes(mask, "little")).to_bytes(self.n, "little")
            if peer not in nd.watching or nd.watching[peer] != mask:
                self.control["have"] += HAVE_BYTES + bitfield
                nd.watching[peer] = mask
                self.watchers[holder.idx][nd] = mask
            plan.set_source_mask(peer, bits, inflight=cap)
        pulling = len(nd.pulling)
        self.control["progress gossip"] += SOURCE_REFRESH_S / progress_interval_s(pulling) \
            * XFER_RECORD_BYTES * (len(self.members) - 1)
        self._push(self.now + SOURCE_REFRESH_S, _REFRESH, nd, 0)
        self._start(nd)

    def _deliver(self, f: _Flow, touched: set[_Node]) -> None:
        nd, c = f.dst, f.chunk
        f.delivered = True
        told = c in nd.streaming  # cut-through: its neighbours heard of it as it began to arrive
        self._close(f)
        if nd.dead or nd.done_at is not None or nd.plan is None:
            return
        if nd.have[c]:
            self.duplicates += 1
            return
        nd.have[c] = 1
        nd.count += 1
        src = f.src.name
        nd.delivered[src] = nd.delivered.get(src, 0) + 1
        self._cancel(nd, nd.plan.on_verified(src, c, self.now))
        touched.add(nd)
        if not told:
            self._tell(nd, c)
        if nd.count == self.n:
            nd.done_at = self.now
            self.left -= 1
            self._push(self.now + self.spec.gossip_s, _SEEN_DONE, nd, 0)  # its copy record reaches the others
            for peer in nd.watching:
                self.watchers[self.by_name[peer].idx].pop(nd, None)
            nd.watching.clear()
            for key in [k for k in self.flows if k[0] == nd.idx]:  # endgame twins
                self._close(self.flows[key])

    def _tell(self, nd: _Node, c: int) -> None:
        """``nd`` tells the neighbours that follow it that it holds chunk ``c``."""
        for w, mask in self.watchers[nd.idx].items():
            if mask is None or mask[c]:
                assert w.plan is not None
                w.plan.add_source_chunks(nd.name, (c,))
                self.control["have"] += HAVE_BYTES + (self.n + 7) // 8
                self.kick.add(w)

    def _untell(self, nd: _Node, c: int) -> None:
        """Cut-through: chunk ``c`` will not reach ``nd`` this way after all."""
        for w, mask in self.watchers[nd.idx].items():
            if mask is None or mask[c]:
                assert w.plan is not None
                w.plan.remove_source_chunks(nd.name, (c,))
                self.control["have"] += HAVE_BYTES + (self.n + 7) // 8

    def _die(self, nd: _Node) -> None:
        nd.dead = True
        for f in list(self.flows.values()):
            if f.dst is nd:
                self._close(f)
            elif f.src is nd and f.on:
                self._stop(f)  # its receiver waits for a stall, or the endgame
        nd.queue.clear()
        for peer in nd.watching:
            self.watchers[self.by_name[peer].idx].pop(nd, None)
        nd.watching.clear()
        self._push(self.now + DETECT_S, _FORGET, nd, 0)

    def _forget(self, nd: _Node) -> None:
        """The failure detector: ``nd`` leaves every view."""
        self.members.discard(nd.name)
        self.complete.discard(nd.name)
        self._changed()
        for w in list(self.watchers[nd.idx]):
            w.watching.pop(nd.name, None)
        self.watchers[nd.idx].clear()

    def run(self) -> None:
        heap = self.heap
        pop = heapq.heappop
        limit = self.spec.time_limit_s
        mark = self.sweep_at  # the heap's size at which its outdated entries are swept out
        self.left = sum(1 for nd in self.nodes if nd.done_at is None)
        while self.left:
            if not heap:
                raise RuntimeError("the swarm is stuck: nothing in flight and nothing to come")
            if len(heap) > mark:  # a flow's every rate change pushes its end anew: drop the outdated ends
                heap = self.heap = [e for e in heap if e[2] != _FLOW or (e[3].alive and e[3].ver == e[4])]  # type: ignore[attr-defined]
                heapq.heapify(heap)  # (time, seq) keys are unique: the same order as before
                mark = max(self.sweep_at, 2 * len(heap))
                self.sweeps += 1
            t, _, kind, a, b = pop(heap)
            if kind == _FLOW:
                assert isinstance(a, _Flow)
                if not a.alive or a.ver != b:
                    continue
            if t > limit:
                raise RuntimeError(f"the swarm did not finish in {limit:g} simulated seconds")
            if kind == _FLOW:
                assert isinstance(a, _Flow)
                self.now = max(self.now, t)
                self._deliver(a, self.kick)
            else:
                self.now = max(self.now, t)
                assert isinstance(a, _Node)
                self._event(kind, a)
            while self.kick:
                self._start(self.kick.pop())
            self._flush()

    def _event(self, kind: int, a: _Node) -> None:
        if kind == _REFRESH:
            self._refresh(a)
        elif kind == _JOIN:
            self._join(a, self.now)
        elif kind == _DIE:
            if a.done_at is None:
                self.left -= 1
            self._die(a)
        elif kind == _FORGET:
            self._forget(a)
        elif kind == _SEEN:
            if not a.dead:
                self.members.add(a.name)
                self._changed()
        elif kind == _SEEN_DONE:
            if not a.dead:
                self.complete.add(a.name)
                self._changed()

    def result(self, wall_s: float) -> SwarmResult:
        spec = self.spec
        healthy = [nd for nd in self.nodes if nd.plan is not None and not nd.dead]
        finish = sorted(nd.done_at for nd in healthy if nd.done_at is not None)
        bound = {nd.name: (nd.done_at - nd.start_s) / (self.n * self.size / nd.down_bps)
                 for nd in healthy if nd.done_at is not None}
        rack_in = [self.link_bytes[self.rack_base + 2 * r + 1] for r in range(spec.racks)]
        return SwarmResult(spec.receivers, self.n, spec.chunk_bytes, spec.link_bps, finish,
                           sum(self.sent[s.idx] for s in self.seeds), self.duplicates, sum(self.sent), bound,
                           rack_in, dict(self.control), len(healthy), wall_s)


def simulate(spec: SwarmSpec) -> SwarmResult:
    """Run one swarm to the end (every healthy receiver complete)."""
    t = time.perf_counter()
    sw = _Swarm(spec)
    sw.run()
    return sw.result(time.perf_counter() - t)


def run_swarm(
    receivers: int,
    *,
    chunks: int = 64,
    chunk_bytes: int = 1 << 20,
    link_bps: float = 100e6 / 8,
    star: bool = False,
    seed: int = 1,
    time_limit_s: float = 100_000.0,
) -> SwarmResult:
    """Pull one copy of ``chunks`` chunks onto ``receivers`` nodes from one
    seed; ``star``: the receivers see only the seed."""
    return simulate(SwarmSpec(receivers, chunks, chunk_bytes, link_bps, star=star, seed=seed,
                              time_limit_s=time_limit_s))
