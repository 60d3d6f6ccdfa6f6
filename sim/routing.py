"""``python -m sim routing``: inference routed by every node alone, with the
daemon's own decision (``protocol.routing.route`` and ``affinity_key``), in
simulated time.

Theory of operation
-------------------
``nodes`` nodes accept requests for one model; ``services`` engines of it
run on the first nodes, each with ``slots`` requests at once (more wait)
and a prompt cache of ``cache_prompts`` prefixes (least recently used
out).  Requests arrive at random nodes (Poisson, ``rate`` a second); most
carry one of ``prompts`` long system prompts, drawn with a Zipf skew, so
one prompt is hot; the rest are short (no prefix: load alone decides).  A
request's time to first token is its wait for a slot plus its prefill:
short when its engine holds the prefix, long when not; then it decodes.

What a node knows is what the daemon knows: its own requests in flight to
each service (fresh), and each service's record from the catalog, whose
``load`` (running, waiting) the engine's node reads at every probe
(``LifePolicy().probe_interval_s``) and gossip brings after up to
``gossip_s`` (a node sees its own services' records at once).  So a node
routes on figures stale by up to one interval plus the gossip delay.

The same arrivals run under three policies: the daemon's (``route`` with
the request's affinity key), least loaded only (``route`` with no key), and
round-robin at each node.  Reported: how evenly the in-flight requests
spread (max over mean, across services, sampled every second), the share of
prefixed requests that found their prefix cached where they ran, and times
to first token.  Checked (violations), for the daemon's policy:

* every decision picks a healthy service whose load, as the deciding node
  sees it, is within ``SLACK`` of the least loaded;
* every node routes alike: sampled every second, for every prompt, the
  nodes that see the prefix's rendezvous choice not overloaded all pick
  that same service (no node its own), and every node's rendezvous choice
  is the same;
* when a service dies (``kill_at_s``) its node publishes it at once, and
  after the catalog has brought that everywhere no request goes to it; the
  prompts whose choice moves are only those that were its own.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from protocol.routing import SLACK, affinity_key, load_of, route
from protocol.serving import LifePolicy, ServiceRecord, ServiceState

from .report import percentile

__all__ = ["POLICIES", "RoutingResult", "RoutingSpec", "routing_table", "simulate_routing"]

MODEL = "sim/model"
POLICIES = ("affinity (the daemon's route)", "least loaded, no affinity", "round-robin")
Route = Callable[..., list[ServiceRecord]]  # ``protocol.routing.route``'s signature


@dataclass(frozen=True, slots=True)
class RoutingSpec:
    nodes: int = 8
    services: int = 4
    prompts: int = 8
    rate: float = 6.0  # requests per second, all nodes together
    duration_s: float = 600.0
    seed: int = 1
    slots: int = 4  # requests an engine runs at once
    cache_prompts: int = 3  # prefixes an engine's cache holds
    zipf: float = 0.8  # prompt i drawn with weight 1 / (i + 1) ** zipf
    short_share: float = 0.1  # requests with no long prefix
    publish_s: float = LifePolicy().probe_interval_s  # how often a node reads and publishes its engines' load
    gossip_s: float = 1.0  # the catalog brings a record to another node within this
    prefill_cold_s: float = 0.5  # a long prompt evaluated whole
    prefill_warm_s: float = 0.03  # the same with its prefix cached
    decode_s: float = 1.0  # the answer's tokens
    kill_at_s: float | None = None  # the first service dies then


@dataclass
class RoutingResult:
    policy: str
    requests: int = 0
    prefixed: int = 0
    warm: int = 0  # prefixed requests that found their prefix cached
    failed: int = 0  # cut off by a service's death, or no service to go to
    retried: int = 0  # refused by a dead service, sent to the next
    ttft_s: list[float] = field(default_factory=list)
    max_sum: float = 0.0
    mean_sum: float = 0.0
    peak: int = 0
    alike_checks: int = 0
    alike_overloaded: int = 0  # checks where some node saw the choice overloaded (and may route by load)
    moved_prompts: int = 0  # prompts whose choice moved when a service died
    violations: list[str] = field(default_factory=list)

    @property
    def imbalance(self) -> float:
        """Max over mean in-flight requests across services, time-averaged."""
        return self.max_sum / self.mean_sum if self.mean_sum else 1.0

    @property
    def warm_share(self) -> float:
        return self.warm / self.prefixed if self.prefixed else 0.0


@dataclass
class _Engine:
    rec: ServiceRecord
    alive: bool = True
    running: list[int] = field(default_factory=list)
    waiting: deque[int] = field(default_factory=deque)
    cache: OrderedDict[int, None] = field(default_factory=OrderedDict)
    version: int = 0

    @property
    def inflight(self) -> int:
        return len(self.running) + len(self.waiting)


@dataclass
class _Request:
    node: int
    prompt: int | None  # which system prompt, None: a short one
    key: str | None
    arrived: float
    engine: int = -1
    done_seq: int = 0


def _prompts(n: int, rng: random.Random) -> list[str]:
    words = ("the", "model", "answers", "briefly", "and", "cites", "its", "sources", "in", "order")
    return [f"You are assistant {i}. " + " ".join(rng.choice(words) for _ in range(300)) for i in range(n)]


def simulate_routing(spec: RoutingSpec, policy: str = POLICIES[0], route_fn: Route = route) -> RoutingResult:
    """One run of ``spec`` under ``policy``; ``route_fn``: the decision (the
    daemon's own unless a test swaps in a broken one)."""
    if policy not in POLICIES:
        raise ValueError(f"policy: one of {POLICIES}")
    if not 1 <= spec.services <= spec.nodes:
        raise ValueError("services: 1 to nodes (one per node)")
    return _Run(spec, policy, route_fn).run()


class _Run:
    """One simulated run: the engines, each node's view of them, the events."""

    def __init__(self, spec: RoutingSpec, policy: str, route_fn: Route) -> None:
        self.spec, self.policy, self.route_fn = spec, policy, route_fn
        self.rng = random.Random(spec.seed)  # the arrivals: the same for every policy
        texts = _prompts(spec.prompts, self.rng)
        self.keys = [affinity_key({"prompt": t}, None) for t in texts]
        assert all(k is not None for k in self.keys), "a system prompt too short for affinity"
        assert affinity_key({"prompt": "hello"}, None) is None
        self.weights = [1 / (i + 1) ** spec.zipf for i in range(spec.prompts)]
        self.names = [f"n{i:03d}" for i in range(spec.nodes)]
        self.engines = [
            _Engine(ServiceRecord(MODEL, self.names[i], 8000 + i, "llama.cpp", (0,), ServiceState.HEALTHY, 1000 + i, 0))
            for i in range(spec.services)
        ]
        # What each node's catalog holds of each service: (version, record).
        self.views: list[list[tuple[int, ServiceRecord]]] = [[(0, e.rec) for e in self.engines] for _ in self.names]
        self.inflight: list[Counter[tuple[str, int]]] = [Counter() for _ in self.names]
        self.rr_next = [i % spec.services for i in range(spec.nodes)]
        self.res = RoutingResult(policy)
        self.reqs: list[_Request] = []
        self.events: list[tuple[float, int, str, int, int]] = []
        self.seq = 0
        self.delays = random.Random(spec.seed * 7919 + 1)  # gossip delays: the same for every policy
        self.draws = random.Random(spec.seed * 104729 + 2)  # each request's draw (``route``'s two choices)
        self.pubs: dict[tuple[int, int], ServiceRecord] = {}
        self.before_kill: dict[int, tuple[str, int] | None] = {}
        self.known_dead_at: float | None = None
        self.dead_version = 0

    def at(self, t: float, what: str, a: int = 0, b: int = 0) -> int:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, what, a, b))
        return self.seq

    def publish(self, now: float, i: int) -> None:
        e = self.engines[i]
        e.version += 1
        state = ServiceState.HEALTHY if e.alive else ServiceState.ERROR
        load = (len(e.running), len(e.waiting)) if e.alive else None
        e.rec = replace(e.rec, state=state, load=load)
        self.pubs[(i, e.version)] = e.rec
        for n in range(self.spec.nodes):
            delay = 0.0 if self.names[n] == e.rec.node else self.delays.uniform(0.05, self.spec.gossip_s)
            self.at(now + delay, "deliver", n, i * 1_000_000 + e.version)

    def records(self, n: int) -> list[ServiceRecord]:
        return [rec for _v, rec in self.views[n]]

    def start(self, now: float, i: int, r: int) -> None:
        spec, res = self.spec, self.res
        e, q = self.engines[i], self.reqs[r]
        e.running.append(r)
        prefill = spec.prefill_warm_s * 0.2
        if q.prompt is not None:
            res.prefixed += 1
            if q.prompt in e.cache:
                res.warm += 1
                e.cache.move_to_end(q.prompt)
                prefill = spec.prefill_warm_s
            else:
                prefill = spec.prefill_cold_s
                e.cache[q.prompt] = None
                while len(e.cache) > spec.cache_prompts:
                    e.cache.popitem(last=False)
        res.ttft_s.append(now + prefill - q.arrived)
        q.done_seq = self.at(now + prefill + spec.decode_s, "done", i, r)

    def finish(self, i: int, r: int) -> None:
        q = self.reqs[r]
        self.inflight[q.node][(self.engines[i].rec.node, self.engines[i].rec.port)] -= 1

    def choose(self, n: int, q: _Request) -> list[int]:
        recs, names, inflight = self.records(n), self.names, self.inflight
        if self.policy == POLICIES[2]:
            healthy = [k for k, rec in enumerate(recs) if rec.state is ServiceState.HEALTHY]
            if not healthy:
                return []
            k = self.rr_next[n] % len(healthy)
            self.rr_next[n] = k + 1
            return healthy[k:] + healthy[:k]
        key = q.key if self.policy == POLICIES[0] else None
        k = self.spec.nodes
        order = self.route_fn(recs, MODEL, names[n], set(names), inflight[n], key, draw=self.draws.getrandbits(32),
                              routers=k)
        if order and self.policy == POLICIES[0]:
            # The warm service within SLACK of the least loaded, or (load deciding) one
            # never more loaded than every other: the less loaded of two.
            loads = [load_of(s, inflight[n], k) for s in order]
            choice = self.warm_choice(n, key) if key is not None else None
            warm = choice is not None and (order[0].node, order[0].port) == (choice.node, choice.port)
            ok = (warm and loads[0] <= min(loads) + SLACK) or len(loads) == 1 or loads[0] <= max(loads[1:])
            if order[0].state is not ServiceState.HEALTHY or not ok:
                self.res.violations.append(f"{names[n]} sent a request to {order[0].node}:{order[0].port}, "
                                           f"{order[0].state.value}, load {loads[0]} with the least at {min(loads)}")
        index = {(e.rec.node, e.rec.port): k for k, e in enumerate(self.engines)}
        return [index[(s.node, s.port)] for s in order]

    def warm_choice(self, n: int, key: str) -> ServiceRecord | None:
        """The prefix's rendezvous choice as node ``n`` sees the services: the
        route with every load alike (so no service is overloaded)."""
        flat = [replace(rec, load=None) for rec in self.records(n)]
        got = self.route_fn(flat, MODEL, self.names[n], set(self.names), {}, key)
        return got[0] if got else None

    def check_alike(self, now: float) -> None:
        if self.policy != POLICIES[0]:
            return
        spec, res, names, inflight = self.spec, self.res, self.names, self.inflight
        for p, key in enumerate(self.keys):
            assert key is not None
            warms = {(w.node, w.port) if w else None for w in (self.warm_choice(n, key) for n in range(spec.nodes))}
            picks: set[tuple[str, int] | None] = set()
            overloaded = False
            for n in range(spec.nodes):
                w = self.warm_choice(n, key)
                recs = self.records(n)
                ok = [s for s in recs if s.state is ServiceState.HEALTHY]
                if w is None or not ok:
                    picks.add(None)
                    continue
                least = min(load_of(s, inflight[n], spec.nodes) for s in ok)
                real = next(s for s in ok if (s.node, s.port) == (w.node, w.port))
                if load_of(real, inflight[n], spec.nodes) > least + SLACK:
                    overloaded = True
                    continue
                got = self.route_fn(recs, MODEL, names[n], set(names), inflight[n], key, routers=spec.nodes)
                picks.add((got[0].node, got[0].port) if got else None)
            res.alike_checks += 1
            res.alike_overloaded += overloaded
            settled = len({tuple(sorted((s.node, s.port, s.state.value) for s in self.records(n)))
                           for n in range(spec.nodes)}) == 1
            if settled and len(warms) > 1:
                res.violations.append(f"t={now:.1f}: prompt {p} has rendezvous choices {sorted(map(str, warms))} "
                                      "on nodes that see the same services")
            if len(picks) > 1 or (picks and not picks <= warms):
                res.violations.append(f"t={now:.1f}: prompt {p} routed to {sorted(map(str, picks))} by nodes "
                                      f"that see it not overloaded (its choice {sorted(map(str, warms))})")

    def schedule(self) -> None:
        """The arrivals, drawn up front so every policy sees the same ones; the
        first publications, the samples and the kill."""
        spec, rng = self.spec, self.rng
        t = 0.0
        while True:
            t += rng.expovariate(spec.rate)
            if t >= spec.duration_s:
                break
            node = rng.randrange(spec.nodes)
            prompt = None if rng.random() < spec.short_share else rng.choices(range(spec.prompts), self.weights)[0]
            key = self.keys[prompt] if prompt is not None else affinity_key({"prompt": "hello"}, None)
            self.reqs.append(_Request(node, prompt, key, t))
            self.at(t, "arrive", len(self.reqs) - 1)
        for i in range(spec.services):
            self.at(self.delays.uniform(0, spec.publish_s), "publish", i)
        s = 1.0
        while s < spec.duration_s:
            self.at(s, "sample")
            s += 1.0
        if spec.kill_at_s is not None:
            self.at(spec.kill_at_s, "kill", 0)

    def run(self) -> RoutingResult:
        self.schedule()
        handlers = {"arrive": self.on_arrive, "done": self.on_done, "publish": self.on_publish,
                    "deliver": self.on_deliver, "sample": self.on_sample, "kill": self.on_kill}
        while self.events:
            now, evseq, what, a, b = heapq.heappop(self.events)
            handlers[what](now, evseq, a, b)
        self.judge_the_end()
        return self.res

    def on_arrive(self, now: float, _seq: int, a: int, _b: int) -> None:
        q, res = self.reqs[a], self.res
        res.requests += 1
        order = self.choose(q.node, q)
        for tries, i in enumerate(order[:3]):  # the proxy's TRIES: a refused connection goes to the next
            e = self.engines[i]
            if e.alive:
                if tries:
                    res.retried += 1
                q.engine = i
                self.inflight[q.node][(e.rec.node, e.rec.port)] += 1
                if len(e.running) < self.spec.slots:
                    self.start(now, i, a)
                else:
                    e.waiting.append(a)
                return
            if self.known_dead_at is not None and now > self.known_dead_at:
                res.violations.append(f"t={now:.1f}: {self.names[q.node]} routed to a service dead and published "
                                      f"dead everywhere since {self.known_dead_at:.1f}")
        res.failed += 1

    def on_done(self, now: float, evseq: int, a: int, b: int) -> None:
        e = self.engines[a]
        if not e.alive or self.reqs[b].done_seq != evseq:
            return
        e.running.remove(b)
        self.finish(a, b)
        if e.waiting:
            self.start(now, a, e.waiting.popleft())

    def on_publish(self, now: float, _seq: int, a: int, _b: int) -> None:
        self.publish(now, a)
        if self.engines[a].alive and now < self.spec.duration_s:
            self.at(now + self.spec.publish_s, "publish", a)

    def on_deliver(self, now: float, _seq: int, a: int, b: int) -> None:
        i, version = divmod(b, 1_000_000)
        if version > self.views[a][i][0]:  # the catalog keeps the higher version
            self.views[a][i] = (version, self.pubs[(i, version)])
        if (self.known_dead_at is None and self.dead_version
                and all(v[0][0] >= self.dead_version for v in self.views)):
            self.known_dead_at = now

    def on_sample(self, now: float, _seq: int, _a: int, _b: int) -> None:
        res = self.res
        loads = [e.inflight for e in self.engines if e.alive]
        if loads:
            res.max_sum += max(loads)
            res.mean_sum += sum(loads) / len(loads)
            res.peak = max(res.peak, max(loads))
        self.check_alike(now)

    def on_kill(self, now: float, _seq: int, a: int, _b: int) -> None:
        e = self.engines[a]
        if self.policy == POLICIES[0]:
            self.before_kill = {p: _pair(self.warm_choice(0, k)) for p, k in enumerate(self.keys) if k is not None}
        for r in [*e.running, *e.waiting]:
            self.finish(a, r)
            self.res.failed += 1
        e.running.clear()
        e.waiting.clear()
        e.alive = False
        self.publish(now, a)  # the process exits: its node hears at once and writes the record
        self.dead_version = e.version

    def judge_the_end(self) -> None:
        res = self.res
        if self.policy == POLICIES[0] and self.before_kill:
            dead = (self.engines[0].rec.node, self.engines[0].rec.port)
            after = {p: _pair(self.warm_choice(0, k)) for p, k in enumerate(self.keys) if k is not None}
            for p, was in self.before_kill.items():
                if after[p] != was:
                    res.moved_prompts += 1
                    if was != dead:
                        res.violations.append(f"prompt {p} moved from {was} to {after[p]} when {dead} died")
        for n in range(self.spec.nodes):
            if any(v for v in self.inflight[n].values()):
                res.violations.append(f"{self.names[n]}: requests still counted in flight at the end: "
                                      f"{dict(self.inflight[n])}")
                break


def _pair(rec: ServiceRecord | None) -> tuple[str, int] | None:
    return (rec.node, rec.port) if rec is not None else None


def routing_table(spec: RoutingSpec) -> tuple[list[list[str]], list[RoutingResult]]:
    """The same arrivals under each policy: one row per measure, one column per policy."""
    runs = [simulate_routing(spec, p) for p in POLICIES]

    def ms(xs: list[float], q: float) -> str:
        return f"{percentile(xs, q) * 1000:.0f}"

    mine = runs[0]
    rows = [
        ["max / mean in flight across services", *[f"{r.imbalance:.2f}" for r in runs]],
        ["most in flight at one service", *[str(r.peak) for r in runs]],
        ["prefixed requests that found their prefix cached", *[f"{r.warm_share * 100:.1f}%" for r in runs]],
        ["time to first token p50 / p99, ms", *[f"{ms(r.ttft_s, 50)} / {ms(r.ttft_s, 99)}" for r in runs]],
        ["requests cut off or with nowhere to go / retried", *[f"{r.failed} / {r.retried}" for r in runs]],
        ["every node routes alike: prompts x seconds checked", f"{mine.alike_checks}", "", ""],
        ["  of which some node saw the choice overloaded", f"{mine.alike_overloaded}", "", ""],
        ["prompts that moved when a service died", f"{mine.moved_prompts}", "", ""],
    ]
    return rows, runs
