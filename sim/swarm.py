"""A swarm of receivers pulling one copy, with the daemon's own policy, at scale.

``python -m sim swarm``: one seed holds a copy; N receivers start pulling it
at once.  Each receiver runs what the daemon's ``Puller`` runs, unchanged:
a ``ChunkPlan`` (rarest first, random first picks, endgame, stalls) and,
every ``SOURCE_REFRESH_S``, ``protocol.transfer.swarm.refresh`` (which
holders, how many requests each, which chunks to prefer).  What the daemon
does with sockets is a fluid model here:

* every node has an uplink and a downlink of ``link_bps`` (as
  ``bench/swarm_netns.py`` shapes them with tc tbf);
* a chunk request is a flow from its holder to its receiver; the flows
  through a link share it equally, and a flow moves at the lesser of its
  two shares (recomputed whenever a flow starts or ends);
* a receiver learns a partial holder's chunks when it asks for them, once
  per refresh, and serves a chunk once it is complete (verified).

The reference is the star in the same model: the same receivers with only
the seed as a source, which is what a central server (or scp from one host)
does.  Both are printed beside the bounds S/B (one receiver's own link) and
N x S/B (the seed sending every receiver a copy).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from protocol.transfer.chunkplan import ChunkPlan
from protocol.transfer.swarm import PER_PEER_INFLIGHT, refresh

__all__ = ["SwarmResult", "run_swarm", "swarm_table"]

SEED = "seed"
SOURCE_REFRESH_S = 0.5  # as the daemon's puller
STALL_S = 10.0  # the daemon's --chunk-stall default
_EPS = 1e-9


@dataclass
class _Receiver:
    name: str
    plan: ChunkPlan
    rng: random.Random
    next_refresh: float
    pulling: tuple[str, ...]
    have: set[int] = field(default_factory=set)
    delivered: dict[str, int] = field(default_factory=dict)
    done_at: float | None = None


@dataclass(eq=False)  # compared by identity: two requests may look alike
class _Flow:
    src: str
    dst: str
    chunk: int
    left: float  # bytes


@dataclass(frozen=True)
class SwarmResult:
    receivers: int
    chunks: int
    chunk_bytes: int
    link_bps: float
    finish_s: list[float]  # per receiver, sorted
    seed_sent: float  # bytes the seed uploaded
    duplicates: int  # chunks a receiver got twice (endgame)

    @property
    def s_over_b(self) -> float:
        return self.chunks * self.chunk_bytes / self.link_bps

    @property
    def last_s(self) -> float:
        return self.finish_s[-1]


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
    rng = random.Random(seed)
    rs = {
        f"r{i:04d}": _Receiver(
            f"r{i:04d}",
            ChunkPlan(chunks, per_peer_inflight=PER_PEER_INFLIGHT, stall_timeout_s=STALL_S),
            random.Random(rng.getrandbits(64)),
            rng.uniform(0, SOURCE_REFRESH_S),
            (f"r{i:04d}",),
        )
        for i in range(receivers)
    }
    flows: list[_Flow] = []
    seed_sent = 0.0
    duplicates = 0
    now = 0.0

    def holds(node: str) -> set[int] | None:  # None: the whole copy
        if node == SEED:
            return None
        r = rs[node]
        return None if r.done_at is not None else r.have

    def drop(pairs: list[tuple[str, int]], dst: str) -> None:
        gone = set(pairs)
        flows[:] = [f for f in flows if not (f.dst == dst and (f.src, f.chunk) in gone)]

    def start(r: _Receiver) -> None:
        if r.done_at is not None:
            return
        drop(r.plan.expire(now), r.name)
        for peer, chunk in r.plan.next_requests(now, r.rng):
            flows.append(_Flow(peer, r.name, chunk, float(chunk_bytes)))

    def source_round(r: _Receiver) -> None:
        # The star's sources never change: one round is all it needs.
        r.next_refresh = float("inf") if star else now + SOURCE_REFRESH_S
        if r.done_at is not None:
            return
        if star:
            found, complete = {SEED}, {SEED}
        else:
            found = {SEED} | {n for n in rs if n != r.name}
            complete = {n for n in found if holds(n) is None}
        round_ = refresh(r.plan, found, complete, r.name, lambda n: bool(r.delivered.get(n)), r.pulling, r.rng)
        r.pulling = round_.pulling
        drop(round_.cancel, r.name)
        for peer, cap in round_.ask.items():
            have = holds(peer)
            r.plan.set_source(peer, have if have is not None else None, inflight=cap)
        start(r)

    while any(r.done_at is None for r in rs.values()):
        if now > time_limit_s:
            raise RuntimeError(f"the swarm did not finish in {time_limit_s} simulated seconds")
        up: dict[str, int] = {}
        down: dict[str, int] = {}
        for f in flows:
            up[f.src] = up.get(f.src, 0) + 1
            down[f.dst] = down.get(f.dst, 0) + 1
        rates = [min(link_bps / up[f.src], link_bps / down[f.dst]) for f in flows]
        t_flow = min((f.left / v for f, v in zip(flows, rates, strict=True)), default=float("inf"))
        t_ref = min(r.next_refresh for r in rs.values() if r.done_at is None)
        if t_flow == t_ref == float("inf"):
            raise RuntimeError("the swarm is stuck: no request in flight and no round to come")
        dt = max(0.0, min(t_flow, t_ref - now))
        now += dt
        finished: list[_Flow] = []
        for f, v in zip(flows, rates, strict=True):
            f.left -= v * dt
            if f.src == SEED:
                seed_sent += v * dt
            if f.left <= _EPS * chunk_bytes:
                finished.append(f)
        touched: set[str] = set()
        for f in finished:
            if f not in flows:  # cancelled by an earlier completion in this step
                continue
            flows.remove(f)
            r = rs[f.dst]
            if f.chunk in r.have:
                duplicates += 1
                continue
            r.have.add(f.chunk)
            r.delivered[f.src] = r.delivered.get(f.src, 0) + 1
            drop(r.plan.on_verified(f.src, f.chunk, now), r.name)
            if r.plan.complete:
                r.done_at = now
                flows[:] = [g for g in flows if g.dst != r.name]
            touched.add(r.name)
        for r in rs.values():
            if r.done_at is None and r.next_refresh <= now + _EPS:
                source_round(r)
            elif r.name in touched:
                start(r)
    done = sorted(r.done_at for r in rs.values() if r.done_at is not None)
    return SwarmResult(receivers, chunks, chunk_bytes, link_bps, done, seed_sent, duplicates)


def swarm_table(sizes: list[int], chunks: int = 64, seed: int = 1) -> list[list[str]]:
    """For each swarm size: the last receiver's time against S/B, the star's
    (simulated) time, and how much the seed uploaded."""
    rows = [["receivers", "swarm last / (S/B)", "star last / (S/B)", "star / swarm", "seed sent / S", "endgame dups"]]
    for n in sizes:
        sw = run_swarm(n, chunks=chunks, seed=seed)
        st = run_swarm(n, chunks=chunks, seed=seed, star=True)
        size = sw.chunks * sw.chunk_bytes
        rows.append([
            str(n),
            f"{sw.last_s / sw.s_over_b:.2f}",
            f"{st.last_s / st.s_over_b:.2f}",
            f"{st.last_s / sw.last_s:.1f}x",
            f"{sw.seed_sent / size:.2f}",
            str(sw.duplicates),
        ])
    return rows
