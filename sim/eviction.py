"""``python -m sim eviction``: one node's tier under a stream of model reads,
with the eviction rule (``protocol.eviction.plan_eviction``) against the same
watermarks evicting in random order instead.

The model: M models of random sizes (1 to 20 units); reads follow a Zipf
law (a few models are hot) whose ranking reshuffles now and then (what is
hot changes).  A read of a model the tier holds is a hit; a miss fetches it
(its bytes count) into the tier, making room first as the node does
(``incoming``).  A fetch writes ``rate`` units a read, so several run side
by side; what each still has to write is reserved (``reserved``), as the
node's evictor does, unless ``reserve`` is off (the rule before: each
fetch alone).  A read of a model being fetched joins its fetch.  A few
models are pinned and a few are served at any time: their copies must
stay.  Another tenant's files come and go on the same filesystem, and a
background sweep runs every fifth read.

Checked (violations): no kept copy is ever evicted; after a sweep the tier
is at or below its high watermark unless only kept copies are left to
evict; a miss fails ``NO_SPACE`` only when evicting every evictable copy
would not be enough; a fetch ends with the tier at or below its high
watermark unless the other tenant's files grew while it ran (counted as
``overfilled``: with reservations a violation, without them the old bug).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.eviction import Resident, Watermarks, plan_eviction

__all__ = ["EvictionSimResult", "simulate_eviction"]

Order = Callable[[list[Resident], random.Random], list[Resident]]


@dataclass
class EvictionSimResult:
    reads: int = 0
    hits: int = 0
    fetched: int = 0  # units fetched on misses
    evicted: int = 0
    no_space: int = 0
    overfilled: int = 0  # fetches that ended above high, the other tenant's files unchanged since they began
    joined: int = 0  # reads of a model already being fetched
    violations: list[str] = field(default_factory=list)


def _lru(res: list[Resident], rng: random.Random) -> list[Resident]:
    return res  # plan_eviction orders by last use itself


def _random(res: list[Resident], rng: random.Random) -> list[Resident]:
    """The baseline: the same rule with the last uses shuffled (random order)."""
    stamps = [r.last_used for r in res]
    rng.shuffle(stamps)
    return [Resident(r.model, r.size, s, r.keep) for r, s in zip(res, stamps, strict=True)]


def simulate_eviction(seed: int = 1, models: int = 200, capacity: int = 600, steps: int = 10_000,
                      order: Order = _lru, rate: int = 4, reserve: bool = True) -> EvictionSimResult:
    rng = random.Random(seed)
    marks = Watermarks(0.85, 0.70)
    sizes = {f"m{i:03d}": rng.randint(1, 20) for i in range(models)}
    names = list(sizes)
    popularity = names[:]
    weights = [1 / (k + 1) ** 1.1 for k in range(models)]
    pinned = set(rng.sample(names, 4))
    held: dict[str, float] = {}  # model -> last used
    flight: dict[str, list[int]] = {}  # model being fetched -> [units written, tenant change count at its start]
    other = 0  # another tenant's bytes on the filesystem
    changes = 0  # how many times the other tenant's files grew
    out = EvictionSimResult()

    def residents(served: set[str], writing: str | None = None) -> list[Resident]:
        return [Resident(m, sizes[m], t, "the model being written" if m == writing else
                         "pinned" if m in pinned else "served" if m in served else None)
                for m, t in held.items()]

    def used() -> int:
        return sum(sizes[m] for m in held) + sum(w for w, _ in flight.values()) + other

    def reserved() -> int:
        return sum(sizes[m] - w for m, (w, _) in flight.items()) if reserve else 0

    def apply(res: list[Resident], e_evict: tuple[str, ...], kept: set[str]) -> None:
        for m in e_evict:
            if m in kept:
                out.violations.append(f"evicted {m}, which had to stay")
            held.pop(m, None)
            out.evicted += 1

    for step in range(steps):
        if step % 1000 == 0:
            rng.shuffle(popularity)  # what is hot changes
        if step % 500 == 0:
            was, other = other, rng.choice([0, 0, capacity // 10, capacity // 5])
            changes += other > was
        for f, st in list(flight.items()):  # the fetches in flight write
            st[0] = min(st[0] + rate, sizes[f])
            if st[0] == sizes[f]:
                del flight[f]
                held[f] = step
                if used() > marks.high * capacity and st[1] == changes:
                    out.overfilled += 1
                    if reserve:
                        out.violations.append(f"step {step}: the fetch of {f} ended above high beside others")
        served = set(rng.sample(names, 3))
        m = rng.choices(popularity, weights)[0]
        out.reads += 1
        if m in held:
            out.hits += 1
            held[m] = step
        elif m in flight:
            out.joined += 1
        else:
            res = residents(served, writing=m)
            kept = {r.model for r in res if r.keep is not None}
            e = plan_eviction(used(), max(capacity - used(), 0), order(res, rng), marks, sizes[m], reserved())
            if e.fits:
                apply(res, e.evict, kept)
                flight[m] = [0, changes]
                out.fetched += sizes[m]
            else:
                out.no_space += 1
                evictable = sum(r.size for r in res if r.keep is None)
                need = sizes[m] + reserved()
                if used() + need - evictable <= marks.high * capacity and need <= capacity - used() + evictable:
                    out.violations.append(f"step {step}: NO_SPACE for {m} although evicting would have made room")
        if step % 5:
            continue
        # The background sweep, every fifth read.
        res = residents(served)
        kept = {r.model for r in res if r.keep is not None}
        e = plan_eviction(used(), max(capacity - used(), 0), order(res, rng), marks, reserved=reserved())
        apply(res, e.evict, kept)
        if used() > marks.high * capacity and any(r.keep is None for r in residents(served)):
            out.violations.append(f"step {step}: above high after a sweep with copies it could evict")
    return out


def eviction_table(seeds: int) -> tuple[list[list[str]], list[str]]:
    lru = [simulate_eviction(seed) for seed in range(1, seeds + 1)]
    rnd = [simulate_eviction(seed, order=_random) for seed in range(1, seeds + 1)]
    alone = [simulate_eviction(seed, reserve=False) for seed in range(1, seeds + 1)]

    def total(rs: list[EvictionSimResult], f: Callable[[EvictionSimResult], int]) -> int:
        return sum(f(r) for r in rs)

    hits = [total(rs, lambda r: r.hits) / max(total(rs, lambda r: r.reads), 1) for rs in (lru, rnd)]
    fetched = [total(rs, lambda r: r.fetched) for rs in (lru, rnd)]
    rows = [
        ["hit ratio", f"{hits[0]:.3f}", f"{hits[1]:.3f}"],
        ["units fetched on misses", str(fetched[0]), str(fetched[1])],
        ["copies evicted", str(total(lru, lambda r: r.evicted)), str(total(rnd, lambda r: r.evicted))],
        ["misses refused NO_SPACE", str(total(lru, lambda r: r.no_space)), str(total(rnd, lambda r: r.no_space))],
        ["fetched, LRU / random", f"{fetched[0] / max(fetched[1], 1):.2f}x", ""],
        ["fetches ending above high", str(total(lru, lambda r: r.overfilled)), str(total(rnd, lambda r: r.overfilled))],
        ["  the same, each fetch alone (no reservation)", str(total(alone, lambda r: r.overfilled)), ""],
    ]
    return rows, [v for r in lru + rnd for v in r.violations]
