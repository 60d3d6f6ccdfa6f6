"""One receiver's source round: which holders to pull from, how hard, and
which chunks to ask each of them for.

Theory of operation
-------------------
Every ``SOURCE_REFRESH_S`` a receiver looks at the holders of the manifest
(``sources.holders``: complete copies, and transfers of it that are
running) and ``refresh`` decides, for its ``ChunkPlan``:

* the sources: its neighbours in the swarm's graph
  (``neighbours.SwarmGraph``: rendezvous rings, racks first, that every
  node derives alike from the same holders), at most ``limit``, never a
  holder the plan banned (``usable`` says which remain: none, and the
  receiver has no source, whatever the catalog lists); a dropped source's
  requests in flight are returned so the caller cancels them.  A swarm of
  a few nodes is a full mesh, so a small swarm pulls from every holder;
* how many requests each may have in flight: ``PER_PEER_INFLIGHT`` for a
  receiver alone, but one at a time (``SWARM_INFLIGHT``) while other
  receivers pull the same copy, because each holder's upload is then shared
  by its neighbours and a chunk can be passed on only once it is complete;
  a complete holder also gets one at a time until it has delivered a chunk;
* which chunks each may be asked for: an edge between racks carries only
  its chunk classes (``allowed``), and a seed (a holder whose copy is older
  than this transfer) is asked only for this receiver's share of what it
  sends its pulling neighbours until the receiver holds that share, so a
  seed sends each chunk once before it sends any twice.
* stand-ins: while some neighbours lag (their chunks take ``LAG_FACTOR``
  times the others' median, or they stalled: a slow link, or dead and not
  noticed yet), the receiver also pulls from as many other members of its
  group, in its own rendezvous order (``SwarmGraph.stand_ins``), never a
  seed; so a node is not held to the pace of its slowest neighbours.

Complete holders are declared to the plan here; a partial holder's chunks
arrive by the caller asking it (its bitfield, then what it tells its
neighbours as it verifies more), restricted to ``allowed[peer]``
(``restrict``).  No progress goes to anyone but neighbours.  The daemon's
``Puller`` and the simulator's swarm model (``sim/swarm.py``) both run
this, so the simulator measures the policy the daemon runs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from .chunkplan import ChunkPlan, choose_sources
from .neighbours import MAX_NEIGHBOURS, SwarmGraph, allowed_mask
from .sources import usable_sources

__all__ = [
    "LAG_FACTOR",
    "MAX_SOURCES",
    "PER_PEER_INFLIGHT",
    "PROGRESS_INTERVAL_S",
    "STALL_FACTOR",
    "SWARM_INFLIGHT",
    "UPLOAD_SLOTS",
    "Refresh",
    "my_share",
    "progress_interval_s",
    "refresh",
    "restrict",
]

PER_PEER_INFLIGHT = 4  # requests in flight per source, for a receiver alone
SWARM_INFLIGHT = 1  # per source while other receivers pull the same copy
MAX_SOURCES = MAX_NEIGHBOURS  # holders one receiver pulls from at once (24)
LAG_FACTOR = 2.0  # a source whose chunks take this many times the others' median lags
LAG_CHUNKS = 3  # ... measured over this many of its chunks at least (fewer: noise, stand-ins that cost)
STALL_FACTOR = 4.0  # a request is given up after this many times the usual time a chunk takes (ChunkPlan)
UPLOAD_SLOTS = 16  # chunk sends a holder runs at once; more requests wait their turn
PROGRESS_INTERVAL_S = 1.0  # a transfer's record in the catalog, at most this often
SWARM_PROGRESS_INTERVAL_S = 5.0  # the same while other nodes pull the same copy
PROGRESS_RECORDS_PER_S = 10  # what one node hears of one swarm's progress, at most, a second


@dataclass(frozen=True, slots=True)
class Refresh:
    chosen: frozenset[str]  # the sources from now on
    cancel: list[tuple[str, int]]  # requests in flight to dropped sources
    ask: dict[str, int | None]  # partial holders to ask for their chunks -> their in-flight cap
    pulling: tuple[str, ...]  # the nodes pulling this copy now (this one included), sorted
    usable: frozenset[str] = frozenset()  # the holders found that may serve (none banned): empty, no source
    banned: frozenset[str] = frozenset()  # the holders found that the plan banned: never a source
    # partial holders -> the chunks they may be asked for (1 each; None: any), for ``restrict``
    allowed: dict[str, bytes | None] = field(default_factory=dict)


def progress_interval_s(pulling: int) -> float:
    """How often a receiver publishes its transfer record (progress, for
    people) while ``pulling`` nodes pull the same copy.  The catalog goes
    to every node, so N receivers each publishing every second would cost
    N² bytes, and every node's CPU: in a swarm every few seconds, and
    stretched with N so that each node hears at most about
    ``PROGRESS_RECORDS_PER_S`` records a second from a swarm of any size.
    (The node running a transfer shows its progress live.)"""
    if pulling <= 1:
        return PROGRESS_INTERVAL_S
    return max(SWARM_PROGRESS_INTERVAL_S, pulling / PROGRESS_RECORDS_PER_S)


def my_share(me: str, nodes: Collection[str], n_chunks: int) -> range:
    """The chunks ``me`` prefers when ``nodes`` pull the same copy: every
    k-th, from ``me``'s index among them sorted, so shares are disjoint and even."""
    ordered = sorted(nodes)
    return range(ordered.index(me), n_chunks, len(ordered))


def refresh(
    plan: ChunkPlan,
    found: Iterable[str],
    complete: Collection[str],
    me: str,
    delivered: Callable[[str], bool],
    pulling_before: tuple[str, ...],
    rng: random.Random,
    *,
    limit: int = MAX_SOURCES,
    racks: Mapping[str, str] | None = None,
    key: str = "",
    seeds: Collection[str] | None = None,
    graph: SwarmGraph | None = None,
) -> Refresh:
    """Apply one source round to ``plan`` and say what the caller must do.

    ``found``: the holders other than ``me`` (``sources.holders``), of
    which the ones ``plan`` banned are never chosen (``sources.usable_sources``);
    ``complete``: those holding the whole copy; ``delivered(peer)``: whether
    that peer has delivered a chunk to this receiver yet;
    ``pulling_before``: the previous round's ``pulling``; ``racks``: node
    -> its ``rack`` label; ``key``: the manifest hash; ``seeds``: the
    complete holders whose copy is older than this transfer (default: every
    complete holder); ``graph``: the swarm's graph when the caller already
    built it from the same holders (the simulator), else it is built here.
    While neighbours lag (``ChunkPlan.lagging``) (slow links, or
    dead and not noticed yet) the receiver also pulls from as many
    stand-ins (``SwarmGraph.stand_ins``: never a seed), so a node with
    slow neighbours is not slowed down with them."""
    found = frozenset(found) - {me}
    usable = usable_sources(found, complete, plan.banned)  # a banned holder is no source
    if graph is None or me not in graph.members:
        graph = SwarmGraph(usable.nodes | {me}, complete=usable.complete, racks=racks, key=key)
    nbrs = {p: c for p, c in graph.neighbours(me).items() if p in usable.nodes}
    if not nbrs and usable.nodes and usable.nodes | {me} != graph.members:
        # The given graph's neighbours are all banned or gone: this node's own view.
        graph = SwarmGraph(usable.nodes | {me}, complete=usable.complete, racks=racks, key=key)
        nbrs = {p: c for p, c in graph.neighbours(me).items() if p in usable.nodes}
    seed_set = usable.complete if seeds is None else frozenset(seeds)
    lag = plan.lagging(LAG_FACTOR, chunks=LAG_CHUNKS)
    plan.hold_back(lag - seed_set)  # a lagging source gives only what no other source holds
    lagging_nbrs = len(lag & nbrs.keys())
    if lagging_nbrs:  # stand-ins beside them, never a seed (each chunk once from it) nor one that lags too
        skip = lag | seed_set | (graph.members - usable.nodes)
        for p in graph.stand_ins(me, lagging_nbrs, skip):
            nbrs[p] = None
    chosen: set[str] = set(nbrs)
    if len(chosen) > limit:
        chosen = choose_sources(chosen, usable.complete & chosen, plan.sources, (), limit, rng)
    cancel: list[tuple[str, int]] = []
    for nid in sorted(plan.sources):
        if nid not in chosen:
            cancel.extend(plan.remove_source(nid))
    now_pulling = (found - frozenset(complete)) | {me}
    same = len(now_pulling) == len(pulling_before) and now_pulling.issuperset(pulling_before)
    pulling = pulling_before if same else tuple(sorted(now_pulling))  # no sort per round in a steady swarm
    swarm = len(pulling) > 1
    n = plan.n_chunks
    ask: dict[str, int | None] = {}
    allowed: dict[str, bytes | None] = {}
    for nid in sorted(chosen):
        base = allowed_mask(nbrs[nid], n)
        if nid in usable.complete:
            shared = swarm or not delivered(nid)
            mask = base
            if swarm and nid in seed_set:
                share = graph.share(nid, me, n)
                if base is not None:
                    share = (int.from_bytes(share, "little") & int.from_bytes(base, "little")).to_bytes(n, "little")
                if plan.lacks_any(share):  # its share first, until this node holds it
                    mask = share
            plan.set_source_mask(nid, mask, inflight=SWARM_INFLIGHT if shared else None)
        else:
            ask[nid] = SWARM_INFLIGHT if swarm else None
            allowed[nid] = base
    return Refresh(frozenset(chosen), cancel, ask, pulling, usable.nodes, usable.banned, allowed)


def restrict(chunks: Iterable[int], allowed: bytes | None) -> Iterable[int]:
    """The chunks a partial holder may be asked for: those of ``chunks`` its
    edge carries (``Refresh.allowed``)."""
    if allowed is None:
        return chunks
    return [c for c in chunks if 0 <= c < len(allowed) and allowed[c]]
