"""Restarts hide nothing: a restarted node's new generation supersedes its
old keys at its peers, and never blanks them meanwhile (``Catalog``'s shadow
and ``GENERATION_KEY``)."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.catalog import GENERATION_KEY, Catalog
from protocol.gossip import GossipConfig, GossipNode

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ORIGIN = "o"
PEERS = ("p", "q")
KEYS = tuple(f"k{i}" for i in range(8))


def sync(src: Catalog, dst: Catalog, budget: int, seed: int) -> None:
    for d in src.delta_for(dict(dst.digest()), budget, random.Random(seed)):
        dst.apply_delta(d, 0.0)


def restored(snap: dict[str, Any], generation: int, now: float, rng: random.Random) -> Catalog:
    """The origin's next process: its saved keys under versions of the new
    generation's own (the daemon's log replay numbers them afresh), then its
    start announcement, as ``GossipNode`` writes it."""
    raw = snap[ORIGIN]
    entries = list(raw["entries"])
    rng.shuffle(entries)
    renumbered = [[k, i + 1, v, t] for i, (k, _ver, v, t) in enumerate(entries)]
    c = Catalog(ORIGIN, generation)
    c.restore({ORIGIN: {"generation": generation, "max_version": len(renumbered), "last_gc_version": 0,
                        "entries": renumbered}}, now, generation)
    c.announce(now)
    return c


op = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEYS), st.integers(0, 9)),
    st.tuples(st.just("delete"), st.sampled_from(KEYS), st.none()),
    st.tuples(st.just("sync"), st.integers(0, 8), st.sampled_from([64, 200, 1 << 20])),
    st.tuples(st.just("save"), st.none(), st.none()),
    st.tuples(st.just("restart"), st.integers(0, 2**32 - 1), st.none()),
    st.tuples(st.just("news"), st.integers(0, 1), st.none()),
)


@SETTINGS
@given(st.lists(op, max_size=60))
def test_a_restart_never_hides_a_key_a_peer_saw(ops: list[tuple[str, Any, Any]]) -> None:
    """Whatever the order of deltas, budgets, member news and lost writes: a
    key a peer showed when the origin restarted, and that the origin's new
    generation still holds, is shown by that peer at every later step; and
    once everyone has exchanged everything, every peer shows exactly the
    origin's state (the old generation's keys gone)."""
    origin = Catalog(ORIGIN, 1)
    origin.announce(0.0)
    peers = [Catalog(p, 1) for p in PEERS]
    saved = origin.snapshot([ORIGIN])
    protected: dict[str, set[str]] = {p: set() for p in PEERS}  # keys each peer must keep showing
    restarted = False
    for step, (kind, a, b) in enumerate(ops):
        now = float(step)
        if kind == "set":
            origin.set(a, b, now)
        elif kind == "delete" and not restarted:  # deletes after a restart would hide keys rightly
            origin.delete(a, now)
        elif kind == "sync":
            cats = [origin, *peers]
            src, dst = cats[a % 3], cats[(a // 3) % 3]
            if src is not dst:
                sync(src, dst, b, step)
        elif kind == "save":
            saved = origin.snapshot([ORIGIN])  # what reached the disk; later writes may be lost
        elif kind == "restart":
            gen = origin.own.generation + 1
            origin = restored(saved, gen, now, random.Random(a))
            saved = origin.snapshot([ORIGIN])
            restarted = True
            now_held = {k for _, k, _ in origin.items()}
            for p in peers:
                shown = {k for nid, k, _ in p.items() if nid == ORIGIN}
                protected[p.self_id] = (protected[p.self_id] | shown) & now_held
        elif kind == "news":  # a member record of the new generation arrives before any delta
            peers[a].reset_generation(ORIGIN, origin.own.generation)
        for p in peers:
            for k in protected[p.self_id]:
                assert p.get(ORIGIN, k) is not None, f"{p.self_id} hides {k} after step {step} ({kind})"
    for r in range(3):  # everything to everyone, through the other peer too
        for i, src in enumerate([origin, *peers]):
            for dst in [origin, *peers]:
                if src is not dst:
                    sync(src, dst, 1 << 20, r * 10 + i)
    want = {k: v for nid, k, v in origin.items() if nid == ORIGIN}
    for p in peers:
        assert {k: v for nid, k, v in p.items() if nid == ORIGIN} == want
        assert p.shadowed() == []


def test_the_shadow_goes_only_when_the_announcement_arrives() -> None:
    """Deltas are gap-free prefixes, so the restarted node's announcement,
    written above all it restored, arrives last: until then the old keys
    stand; listeners hear nothing of them until they really go."""
    old = Catalog(ORIGIN, 1)
    for k in KEYS:
        old.set(k, "old", 0.0)
    p = Catalog("p", 1)
    sync(old, p, 1 << 20, 0)
    heard: list[tuple[str, Any]] = []

    class Listener:
        def key_changed(self, node_id: str, key: str, value: Any | None) -> None:
            heard.append((key, value))

        def node_cleared(self, node_id: str) -> None:
            heard.append(("*cleared*", None))

    p.subscribe(Listener())
    new = Catalog(ORIGIN, 2)
    new.set("k0", "new", 1.0)  # restored: k0 only (the rest were lost)
    new.announce(1.0)
    assert new.get(ORIGIN, GENERATION_KEY) == {"generation": 2, "version": 1}
    p.reset_generation(ORIGIN, 2)
    assert heard == [] and all(p.get(ORIGIN, k) == "old" for k in KEYS)
    sync(new, p, 60, 0)  # a budget that lets one entry through per message: k0 first
    assert p.get(ORIGIN, "k0") == "new" and p.get(ORIGIN, "k1") == "old" and p.shadowed() == [ORIGIN]
    assert heard == [("k0", "new")]
    sync(new, p, 60, 1)  # then the announcement: the lost keys go, and readers hear so
    assert p.shadowed() == [] and p.get(ORIGIN, "k1") is None
    assert ("*cleared*", None) not in heard and {k for k, v in heard if v is None} == set(KEYS[1:])


def test_a_restarted_gossip_node_announces_what_it_restored() -> None:
    """``GossipNode`` writes the announcement on start, above the restored keys,
    and writes it again when its generation moves."""
    first = Catalog("n", 1)
    for k in KEYS:
        first.set(k, 1, 0.0)
    c = Catalog("n", 2)
    c.restore(first.snapshot(), 5.0, 2)
    g = GossipNode("n", "127.0.0.1:7000", 2, GossipConfig(cluster="t"), 5.0, catalog=c)
    e = g.catalog.own.keys[GENERATION_KEY]
    assert e.value == {"generation": 2, "version": len(KEYS)} and e.version == len(KEYS) + 1
    full = Catalog("n", 1, keys_per_node_max=1)  # at its key limit, the announcement still goes in
    full.set("only", 1, 0.0)
    assert GossipNode("n", "127.0.0.1:7000", 1, GossipConfig(cluster="t"), 0.0, catalog=full).catalog.own.whole
