"""The swarm simulator's network: nodes, flows and the links they share.

A chunk request is a ``_Flow`` through the links on its path (the source's
uplink, a rack's uplink to the core each way where the path leaves a rack,
the receiver's downlink).  ``_Links`` shares the links max-min fair and keeps
each flow's rate, the bytes it moved and the event of its end; ``_Swarm``
(``sim.swarm``) is built on it and drives the receivers."""

from __future__ import annotations

import heapq
import random
from collections import deque

from protocol.transfer.chunkplan import ChunkPlan

_FLOW = 0  # the event kind of a flow's end (``sim.swarm`` numbers the others after it)
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


class _Links:
    """The link model: ``_Swarm``'s state that it reads and its methods on flows and links."""

    size: float  # a chunk's bytes
    now: float
    seq: int
    heap: list[tuple[float, int, int, object, int]]
    cap: list[float]  # link -> its capacity, bytes/s
    rack_base: int  # the first rack link
    lflows: list[dict[int, _Flow]]  # link -> its flows, by key
    link_bytes: list[float]
    load: list[float]  # the sum of the rates of the flows on each link
    dirty: dict[tuple[int, ...], None]  # links to share again before time moves on
    sent: list[float]  # node -> the bytes it sent

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
            for here, there, level in ((on_a, on_b, level_a), (on_b, on_a, level_b)):
                for k, f in here.items():
                    if k not in there:
                        r = own[k] if own[k] <= level else level
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
