"""One receiver's source round: which holders to pull from, how hard, and
which chunks to prefer while others pull the same copy.

Theory of operation
-------------------
Every ``SOURCE_REFRESH_S`` a receiver looks at the holders of the manifest
(``sources.holders``: complete copies, and transfers of it that are
running) and ``refresh`` decides, for its ``ChunkPlan``:

* the sources, at most ``MAX_SOURCES`` (``chunkplan.choose_sources``:
  sticky, at least one complete holder, a random slice of a large swarm),
  never a holder the plan banned (``usable`` says which remain: none, and
  the receiver has no source, whatever the catalog lists); a dropped
  source's requests in flight are returned so the caller cancels them;
* how many requests each may have in flight: ``PER_PEER_INFLIGHT`` for a
  receiver alone, but one at a time (``SWARM_INFLIGHT``) while other
  receivers pull the same copy, because each source's upload is then shared
  by all of them and a chunk can be passed on only once it is complete; a
  complete holder also gets one at a time until it has delivered a chunk;
* the chunks to prefer: while ``k`` nodes pull, each prefers every k-th
  chunk from its own index among them (``my_share``), so a complete holder
  they all ask uploads each rare chunk about once, not once per receiver.

Complete holders are declared to the plan here; a partial holder's chunks
arrive by the caller asking it (its bitfield), so the round lists which to
ask and with what cap.  The daemon's ``Puller`` and the simulator's swarm
model (``sim/swarm.py``) both run this, so the simulator measures the
policy the daemon runs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from .chunkplan import ChunkPlan, choose_sources
from .sources import usable_sources

__all__ = ["MAX_SOURCES", "PER_PEER_INFLIGHT", "SWARM_INFLIGHT", "Refresh", "my_share", "refresh"]

PER_PEER_INFLIGHT = 4  # requests in flight per source, for a receiver alone
SWARM_INFLIGHT = 1  # per source while other receivers pull the same copy
MAX_SOURCES = 24  # holders one receiver pulls from at once


@dataclass(frozen=True, slots=True)
class Refresh:
    chosen: frozenset[str]  # the sources from now on
    cancel: list[tuple[str, int]]  # requests in flight to dropped sources
    ask: dict[str, int | None]  # partial holders to ask for their chunks -> their in-flight cap
    pulling: tuple[str, ...]  # the nodes pulling this copy now (this one included), sorted
    usable: frozenset[str] = frozenset()  # the holders found that may serve (none banned): empty, no source
    banned: frozenset[str] = frozenset()  # the holders found that the plan banned: never a source


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
) -> Refresh:
    """Apply one source round to ``plan`` and say what the caller must do.

    ``found``: the holders other than ``me`` (``sources.holders``), of
    which the ones ``plan`` banned are never chosen (``sources.usable_sources``);
    ``complete``: those holding the whole copy; ``delivered(peer)``: whether
    that peer has delivered a chunk to this receiver yet;
    ``pulling_before``: the previous round's ``pulling``."""
    found = set(found)
    usable = usable_sources(found, complete, plan.banned)  # a banned holder is no source
    useless = [nid for nid in plan.sources if nid not in usable.complete and not plan.useful(nid)]
    chosen = choose_sources(usable.nodes, usable.complete, plan.sources, useless, limit, rng)
    cancel: list[tuple[str, int]] = []
    for nid in sorted(plan.sources):
        if nid not in chosen:
            cancel.extend(plan.remove_source(nid))
    pulling = tuple(sorted({me, *found} - set(complete)))
    swarm = len(pulling) > 1
    ask: dict[str, int | None] = {}
    for nid in sorted(chosen):
        if nid in usable.complete:
            shared = swarm or not delivered(nid)
            plan.set_source(nid, None, inflight=SWARM_INFLIGHT if shared else None)
        else:
            ask[nid] = SWARM_INFLIGHT if swarm else None
    if pulling != pulling_before:
        plan.prefer(None if len(pulling) == 1 else my_share(me, pulling, plan.n_chunks))
    return Refresh(frozenset(chosen), cancel, ask, pulling, usable.nodes, usable.banned)
