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
from collections import deque
from collections.abc import Callable
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

__all__ = ["SwarmResult", "SwarmSpec", "Target", "run_swarm", "simulate", "swarm_table", "swarm_targets"]

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
_EPS = 1e-9
_INF = float("inf")


def _waterfill(capacity: float, fixed: float, caps: list[float]) -> float:
    """The level L that shares ``capacity - fixed`` among flows each wanting
    at most its cap: sum(min(cap, L)) = what is left (inf: every cap fits)."""
    left = max(0.0, capacity - fixed)
    caps.sort()
    n = len(caps)
    for i, most in enumerate(caps):
        share = left / (n - i)
        if most >= share:
            return share
        left -= most
    return _INF


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


class _Node:
    __slots__ = (
        "active",
        "count",
        "dead",
        "delivered",
        "done_at",
        "down_bps",
        "have",
        "idx",
        "late",
        "name",
        "plan",
        "pulling",
        "queue",
        "rack",
        "rng",
        "seed",
        "seeds",
        "start_s",
        "streaming",
        "up_bps",
        "watching",
    )

    def __init__(self, idx: int, name: str, rack: int | None, bps: float, n: int, whole: bool) -> None:
        self.idx = idx
        self.name = name
        self.rack = rack
        self.up_bps = self.down_bps = bps
        self.have = bytearray(b"\x01" * n if whole else n)
        self.count = n if whole else 0
        self.plan: ChunkPlan | None = None
        self.rng = random.Random(0)
        self.pulling: tuple[str, ...] = (name,)
        self.delivered: dict[str, int] = {}
        self.watching: dict[str, bytes | None] = {}  # partial holders this one follows -> their allowed mask
        self.seeds: frozenset[str] = frozenset()
        self.start_s = 0.0
        self.done_at: float | None = 0.0 if whole else None
        self.dead = False
        self.late = False
        self.active = 0  # uploads in its slots
        self.seed = whole
        self.streaming: dict[int, _Flow] = {}  # cut-through: chunk -> the flow bringing it, passed on as it arrives
        self.queue: deque[_Flow] = deque()  # requests waiting for a slot, first come first served


    def __hash__(self) -> int:
        return self.idx

class _Flow:
    __slots__ = ("alive", "chunk", "delivered", "downs", "dst", "key", "left", "links", "on", "rate", "src", "t", "up",
                 "ver")

    def __init__(self, key: int, src: _Node, dst: _Node, chunk: int, size: float, links: tuple[int, ...]) -> None:
        self.key = key  # hashed by it: sets of flows iterate alike in every run (one seed, one result)
        self.src = src
        self.dst = dst
        self.chunk = chunk
        self.left = size
        self.links = links
        self.rate = 0.0
        self.t = 0.0
        self.ver = 0
        self.alive = True  # requested, not yet delivered nor cancelled
        self.on = False  # in one of its source's upload slots, moving bytes
        self.delivered = False
        self.up: _Flow | None = None  # cut-through: the flow still bringing this chunk to src
        self.downs: list[_Flow] = []  # cut-through: the flows passing this chunk on as it arrives

    def __hash__(self) -> int:
        return self.key


_FLOW, _REFRESH, _DIE, _JOIN, _FORGET, _SEEN, _SEEN_DONE = range(7)


class _Swarm:
    """The event loop: flows on links, receivers running the daemon's policy."""

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

    # -- flows -------------------------------------------------------------------------------------

    def _path(self, src: _Node, dst: _Node) -> tuple[int, ...]:
        links = [2 * src.idx]
        if src.rack != dst.rack:
            if src.rack is not None:
                links.append(self.rack_base + 2 * src.rack)
            if dst.rack is not None:
                links.append(self.rack_base + 2 * dst.rack + 1)
        links.append(2 * dst.idx + 1)
        return tuple(links)

    def _settle(self, f: _Flow) -> None:
        dt = self.now - f.t
        if dt > 0 and f.rate > 0:
            moved = min(f.rate * dt, f.left)
            f.left -= moved
            self.sent[f.src.idx] += moved
            for link in f.links:
                if link >= self.rack_base:
                    self.link_bytes[link] += moved
        f.t = self.now

    def _set_rate(self, f: _Flow, rate: float) -> None:
        if abs(rate - f.rate) <= 1e-9 * f.rate:  # the same share, but for rounding: keep its event
            return
        moved = abs(rate - f.rate) > 1e-6 * self.size
        self._settle(f)
        for x in f.links:
            self.load[x] += rate - f.rate
        f.rate = rate
        f.ver += 1
        if rate > 0:
            self.seq += 1
            heapq.heappush(self.heap, (self.now + f.left / rate, self.seq, _FLOW, f, f.ver))
        if moved:
            for g in f.downs:
                if g.on:
                    self.dirty[g.links] = None

    def _reflow(self, links: tuple[int, ...]) -> None:
        """Share ``links`` again before time moves on (``_flush``)."""
        self.dirty[links] = None

    def _flush(self) -> None:
        """Share every link an event touched (and, in turn, the links of the
        flows passing on a chunk whose arrival rate changed)."""
        for _ in range(10_000):  # a chain of passed-on chunks settles in a few rounds
            if not self.dirty:
                return
            links = next(iter(self.dirty))
            del self.dirty[links]
            self._share(links)
        self.dirty.clear()

    def _share(self, links: tuple[int, ...]) -> None:
        """Share ``links`` again, max-min fair (as TCP flows roughly do): the
        flows on them are filled up together until each meets a full link,
        given what the other flows on their paths take (those keep their
        rates until an event on one of their own links).  A flow passing on
        a chunk as it arrives goes no faster than the chunk arrives."""
        lflows, cap, load = self.lflows, self.cap, self.load
        center = [x for x in links if lflows[x]]
        if not center:
            return
        if len(center) <= 2:  # the usual shape: one uplink and one downlink; solved in closed form
            cap, load = self.cap, self.load
            a = center[0]
            b = center[1] if len(center) == 2 else -1
            on_a: dict[int, _Flow] = lflows[a]
            on_b: dict[int, _Flow] = lflows[b] if b >= 0 else {}
            own: dict[int, float] = {}  # flow key -> what its other links (and its source) leave it
            seen: set[int] = set()
            for on in (on_a, on_b):
                for k, f in on.items():
                    if k in own:
                        continue
                    up = f.up
                    most = up.rate if up is not None else _INF
                    for x in f.links:
                        if x == a or x == b:
                            continue
                        if x in seen:  # two of them share another link (a rack uplink): the general case
                            self._share_general(center)
                            return
                        seen.add(x)
                        left = cap[x] - load[x] + f.rate
                        if left < most:
                            most = left
                    own[k] = most if most >= 0.0 else 0.0
            set_rate = self._set_rate
            if b < 0:
                level = _waterfill(cap[a], 0.0, list(own.values()))
                for k, f in on_a.items():
                    r = own[k]
                    if level < r:
                        r = level
                    if abs(r - f.rate) > 1e-9 * f.rate:
                        set_rate(f, r)
                return
            both = [k for k in on_a if k in on_b]
            if both:  # held by the tighter link; the other shares out what they leave
                level_a = _waterfill(cap[a], 0.0, [own[k] for k in on_a])
                level_b = _waterfill(cap[b], 0.0, [own[k] for k in on_b])
                for k in both:
                    own[k] = min(own[k], level_a, level_b)
                fixed = sum(own[k] for k in both)
                level_a = _waterfill(cap[a], fixed, [own[k] for k in on_a if k not in on_b])
                level_b = _waterfill(cap[b], fixed, [own[k] for k in on_b if k not in on_a])
                for k in both:
                    set_rate(on_a[k], own[k])
            else:
                level_a = _waterfill(cap[a], 0.0, list(own.values())[:len(on_a)])
                level_b = _waterfill(cap[b], 0.0, list(own.values())[len(on_a):])
            for k, f in on_a.items():
                if k not in on_b:
                    r = own[k]
                    if level_a < r:
                        r = level_a
                    if abs(r - f.rate) > 1e-9 * f.rate:
                        set_rate(f, r)
            for k, f in on_b.items():
                if k not in on_a:
                    r = own[k]
                    if level_b < r:
                        r = level_b
                    if abs(r - f.rate) > 1e-9 * f.rate:
                        set_rate(f, r)
            return
        self._share_general(center)

    def _share_general(self, links: list[int]) -> None:
        """``_share`` by progressive filling (any shape)."""
        region: dict[_Flow, None] = {}
        for link in links:
            region.update(dict.fromkeys(self.lflows[link].values()))
        mine: dict[int, float] = {}  # region link -> the region's flows' rates on it
        count: dict[int, int] = {}
        for f in region:
            for x in f.links:
                mine[x] = mine.get(x, 0.0) + f.rate
                count[x] = count.get(x, 0) + 1
        cap, load = self.cap, self.load
        residual = {x: max(0.0, cap[x] - (load[x] - mine[x])) for x in mine}
        rates = dict.fromkeys(region, 0.0)
        unfrozen = set(region)
        capped = {f: f.up.rate for f in region if f.up is not None}
        while unfrozen:
            delta = min(residual[x] / c for x, c in count.items() if c)
            for f, most in capped.items():
                if f in unfrozen:
                    delta = min(delta, most - rates[f])
            delta = max(delta, 0.0)
            full = set()
            for x, c in count.items():
                if c:
                    residual[x] -= delta * c
                    if residual[x] <= 1e-9 * cap[x]:
                        full.add(x)
            done = []
            for f in unfrozen:
                rates[f] += delta
                if not full.isdisjoint(f.links) or (f in capped and rates[f] >= capped[f] * (1 - 1e-9)):
                    done.append(f)
            for f in done:
                unfrozen.discard(f)
                for x in f.links:
                    count[x] -= 1
        for f, rate in rates.items():
            self._set_rate(f, rate)

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


def swarm_table(sizes: list[int], chunks: int = 256, seed: int = 1,
                progress: Callable[[SwarmResult], None] | None = None) -> list[list[str]]:
    """For each swarm size: the last receiver's time against S/B, the star's
    (simulated) time, and how much the seed and everyone uploaded."""
    rows = [["receivers", "swarm last / (S/B)", "star last / (S/B)", "star / swarm", "seed sent / S",
             "all sent / (N x S)", "endgame dups", "wall s"]]
    for n in sizes:
        sw = run_swarm(n, chunks=chunks, seed=seed)
        st = run_swarm(n, chunks=chunks, seed=seed, star=True)
        if progress is not None:
            progress(sw)
        rows.append([
            str(n),
            f"{sw.last_s / sw.s_over_b:.2f}",
            f"{st.last_s / st.s_over_b:.2f}",
            f"{st.last_s / sw.last_s:.1f}x",
            f"{sw.seed_sent / sw.size:.2f}",
            f"{sw.bytes_sent / (n * sw.size):.3f}",
            str(sw.duplicates),
            f"{sw.wall_s + st.wall_s:.1f}",
        ])
    return rows


@dataclass(frozen=True)
class Target:
    what: str
    measured: float
    limit: float
    unit: str = "x"

    @property
    def met(self) -> bool:
        return self.measured <= self.limit

    def row(self) -> list[str]:
        if self.unit == "%":
            m, lim = f"{100 * self.measured:.2f}%", f"{100 * self.limit:g}%"
        elif self.unit == "s":
            m, lim = f"{self.measured:.0f} s", f"{self.limit:g} s"
        else:
            m, lim = f"{self.measured:.3f}{self.unit}", f"{self.limit:g}{self.unit}"
        return [self.what, m, f"<= {lim}", "MET" if self.met else "MISSED"]


def _worst(r: SwarmResult) -> float:
    return max(r.bound_ratio.values())


def swarm_targets(*, seed: int = 1, big: int = 1000,
                  progress: Callable[[str, SwarmResult], None] | None = None) -> list[Target]:
    """Issue 26's targets in the simulator: one seed, equal links, 256
    chunks at 100 and ``big`` receivers; 10% slow receivers; 10% dying and
    10% joining late; two seeds; four racks of 25 behind one shared uplink
    each; the control plane against the data at 100."""
    def run(name: str, spec: SwarmSpec) -> SwarmResult:
        r = simulate(spec)
        if progress is not None:
            progress(name, r)
        return r

    out = []
    r100 = run("100 receivers", SwarmSpec(100, seed=seed))
    out += [
        Target("slowest / (S/B), 100 receivers", r100.last_s / r100.s_over_b, 1.10),
        Target("seed sent / S, 100 receivers", r100.seed_sent / r100.size, 1.10),
        Target("all bytes sent / (N x S), 100 receivers", r100.bytes_sent / (100 * r100.size), 1.02),
        Target("control plane / data bytes, 100 receivers", sum(r100.control.values()) / r100.bytes_sent, 0.01,
               "%"),
    ]
    rbig = run(f"{big} receivers", SwarmSpec(big, seed=seed))
    out += [
        Target(f"slowest / (S/B), {big:,} receivers", rbig.last_s / rbig.s_over_b, 1.25),
        Target(f"seed sent / S, {big:,} receivers", rbig.seed_sent / rbig.size, 1.10),
        Target(f"all bytes sent / (N x S), {big:,} receivers", rbig.bytes_sent / (big * rbig.size), 1.02),
        Target(f"wall time of the {big:,}-receiver run", rbig.wall_s, 180.0, "s"),
    ]
    slow = run("10% slow", SwarmSpec(100, seed=seed, slow=0.1))
    out.append(Target("10% on a quarter of the link: slowest / its own bound", _worst(slow), 1.15))
    churn = run("10% die, 10% late", SwarmSpec(100, seed=seed, die=0.1, late=0.1))
    out.append(Target("10% die, 10% join late: slowest healthy / its own bound", _worst(churn), 1.15))
    two = run("two seeds", SwarmSpec(100, seed=seed, seeds=2))
    out.append(Target("two seeds: slowest / its own bound", _worst(two), 1.15))
    racks = run("4 racks", SwarmSpec(100, seed=seed, racks=4))
    out.append(Target("4 racks of 25: the most a rack pulled across its uplink / S",
                      max(racks.rack_in) / racks.size, 1.10))
    return out
