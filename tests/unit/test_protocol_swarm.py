"""One receiver's source round (``protocol.transfer.swarm``), and the swarm
model that runs it at scale (``sim.swarm``)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.transfer.chunkplan import ChunkPlan
from protocol.transfer.neighbours import FULL_MESH_MAX, RINGS, SwarmGraph
from protocol.transfer.swarm import (
    LAG_CHUNKS,
    LAG_FACTOR,
    MAX_SOURCES,
    PER_PEER_INFLIGHT,
    SWARM_INFLIGHT,
    my_share,
    refresh,
)
from sim.swarm import run_swarm

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)
peers = st.sets(st.sampled_from([f"p{i:02d}" for i in range(40)]), max_size=40)


@SETTINGS
@given(peers, peers, st.integers(1, 30), st.integers(0, 2**32))
def test_a_round_keeps_its_bounds_and_says_what_to_cancel(found: set[str], complete: set[str], limit: int,
                                                         seed: int) -> None:
    complete &= found
    rng = random.Random(seed)
    plan = ChunkPlan(16)
    first = refresh(plan, found, complete, "me", lambda _p: False, ("me",), rng, limit=limit)
    assert first.chosen <= found and len(first.chosen) <= limit
    nbrs = set(SwarmGraph(found | {"me"}, complete=complete).neighbours("me"))  # its neighbours, no others
    assert first.chosen <= nbrs and len(first.chosen) == min(limit, len(nbrs))
    if complete and len(found) < FULL_MESH_MAX and limit >= len(found):
        assert first.chosen & complete  # a small swarm is a full mesh: every holder is a source
    assert set(first.ask) == first.chosen - complete  # partial holders are asked for their chunks
    assert first.pulling == tuple(sorted({"me", *found} - complete))
    swarm = len(first.pulling) > 1
    assert all(cap == (SWARM_INFLIGHT if swarm else None) for cap in first.ask.values())
    for p in first.ask:
        plan.set_source(p, range(16), inflight=first.ask[p])
    sent = plan.next_requests(0.0, rng)
    # The holders change: requests to a dropped source are handed back, and only those.
    second = refresh(plan, found - set(list(first.chosen)[:3]), complete, "me", lambda _p: True, first.pulling, rng,
                     limit=limit)
    dropped = first.chosen - second.chosen
    assert {peer for peer, _ in second.cancel} <= dropped
    assert set(second.cancel) == {(peer, c) for peer, c in sent if peer in dropped}
    assert not plan.sources & dropped


def test_a_complete_holder_gets_one_request_at_a_time_until_it_delivers_while_alone() -> None:
    plan = ChunkPlan(8)
    refresh(plan, {"full"}, {"full"}, "me", lambda _p: False, ("me",), random.Random(1))
    assert len(plan.next_requests(0.0, random.Random(1))) == 1
    plan2 = ChunkPlan(8)
    refresh(plan2, {"full"}, {"full"}, "me", lambda _p: True, ("me",), random.Random(1))
    assert len(plan2.next_requests(0.0, random.Random(1))) == PER_PEER_INFLIGHT


@given(st.sets(st.text("abc", min_size=1, max_size=3), min_size=1, max_size=12), st.integers(1, 64))
def test_shares_are_disjoint_and_cover_every_chunk(nodes: set[str], n: int) -> None:
    shares = [set(my_share(me, nodes, n)) for me in nodes]
    assert sum(len(s) for s in shares) == n and set().union(*shares) == set(range(n))


def test_the_sim_swarm_shares_uploads_and_beats_the_star() -> None:
    """Six receivers: each ends with every chunk, the seed uploads well under
    six copies, and the last receiver finishes well before the star's."""
    sw = run_swarm(6, chunks=32)
    star = run_swarm(6, chunks=32, star=True)
    size = sw.chunks * sw.chunk_bytes
    assert len(sw.finish_s) == len(star.finish_s) == 6
    assert sw.seed_sent < 2 * size
    assert abs(star.seed_sent - 6 * size) < 0.01 * size  # the star: the seed sends everyone a copy
    assert star.last_s > 3 * sw.last_s
    assert run_swarm(6, chunks=32).finish_s == sw.finish_s  # one seed, one result


def test_the_limit_holds_in_a_swarm_larger_than_it() -> None:
    """A receiver in a large swarm pulls from its neighbours only (2 x RINGS
    in one rack), and never more than the limit."""
    plan = ChunkPlan(64)
    found = {f"p{i}" for i in range(3 * MAX_SOURCES)}
    r = refresh(plan, found, {"p0"}, "me", lambda _p: False, ("me",), random.Random(3))
    assert len(r.chosen) == 2 * RINGS <= MAX_SOURCES
    assert len(refresh(ChunkPlan(64), found, {"p0"}, "me", lambda _p: False, ("me",), random.Random(3),
                       limit=3).chosen) == 3



def _deliver_rounds(plan: ChunkPlan, slow: set[str], rounds: int) -> None:
    """Every source delivers what it is asked for, those in ``slow`` four times slower."""
    t, rng = 0.0, random.Random(7)
    for _ in range(rounds):
        for peer, chunk in plan.next_requests(t, rng):
            plan.on_verified(peer, chunk, t + (4.0 if peer in slow else 1.0))
        t += 4.0


def test_a_receiver_whose_neighbours_lag_pulls_from_stand_ins_too_never_a_seed() -> None:
    found = {f"p{i:02d}" for i in range(40)}
    graph = SwarmGraph(found | {"me"})
    nbrs = frozenset(graph.neighbours("me"))
    seeds = set(graph.stand_ins("me", 1))  # the first stand-in it would take, were it no seed
    plan = ChunkPlan(256)
    first = refresh(plan, found, seeds, "me", lambda _p: True, ("me",), random.Random(5), seeds=seeds)
    assert first.chosen == nbrs
    for p in nbrs:
        plan.set_source(p, None, inflight=SWARM_INFLIGHT)
    _deliver_rounds(plan, set(), LAG_CHUNKS + 1)
    again = refresh(plan, found, seeds, "me", lambda _p: True, first.pulling, random.Random(5), seeds=seeds)
    assert again.chosen == nbrs  # nobody lags: its neighbours only
    slow = set(sorted(nbrs)[:2])
    _deliver_rounds(plan, slow, 2 * LAG_CHUNKS)
    assert plan.lagging(LAG_FACTOR, chunks=LAG_CHUNKS) == slow
    r = refresh(plan, found, seeds, "me", lambda _p: True, first.pulling, random.Random(5), seeds=seeds)
    stand_ins = r.chosen - nbrs
    assert r.chosen >= nbrs and len(stand_ins) == 2  # one beside each neighbour that lags
    assert not stand_ins & seeds and stand_ins == set(graph.stand_ins("me", 2, skip=seeds))
    assert set(r.ask) >= stand_ins  # followed like neighbours


def test_a_round_holds_back_the_neighbours_that_lag_but_not_a_seed() -> None:
    """``refresh`` tells the plan which sources lag (``ChunkPlan.hold_back``):
    those are asked only for what no other source holds; a seed never is."""
    found = {f"p{i:02d}" for i in range(40)}
    graph = SwarmGraph(found | {"me"})
    nbrs = sorted(graph.neighbours("me"))
    seeds = {nbrs[-1]}
    plan = ChunkPlan(256)
    first = refresh(plan, found, seeds, "me", lambda _p: True, ("me",), random.Random(5), seeds=seeds)
    for p in nbrs:
        plan.set_source(p, None, inflight=SWARM_INFLIGHT)
    slow = {nbrs[0], nbrs[-1]}
    _deliver_rounds(plan, slow, 2 * LAG_CHUNKS)
    assert plan.lagging(LAG_FACTOR, chunks=LAG_CHUNKS) == slow
    refresh(plan, found, seeds, "me", lambda _p: True, first.pulling, random.Random(5), seeds=seeds)
    assert plan.held_back == {nbrs[0]}  # the lagging seed is not held back: it sends each chunk once
