"""The swarm's neighbour graph (``protocol.transfer.neighbours``) and the
source round that follows it (``swarm.refresh``), as properties (issue 26):

* the graph is symmetric, bounded, racks first, and connected, and stays
  connected with high probability when a tenth of the members vanish
  before the others notice;
* a holder's upload slots are bounded: with every receiver running the
  round, no holder has more requests in flight than it has neighbours;
* no receiver starves: rounds of the pure policy, with racks, one or two
  seeds, and receivers that die, bring every live receiver every chunk;
* a seed sends no chunk twice while its neighbours still pull their
  shares of it.
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.transfer.chunkplan import ChunkPlan
from protocol.transfer.neighbours import (
    FULL_MESH_MAX,
    GATEWAYS,
    MAX_NEIGHBOURS,
    RINGS,
    SwarmGraph,
    allowed_mask,
    connected,
)
from protocol.transfer.swarm import (
    PER_PEER_INFLIGHT,
    PROGRESS_INTERVAL_S,
    PROGRESS_RECORDS_PER_S,
    SWARM_INFLIGHT,
    progress_interval_s,
    refresh,
    restrict,
)

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def swarms(draw: st.DrawFn, most: int = 60) -> tuple[list[str], dict[str, str], list[str]]:
    """Members, their rack labels (maybe none, maybe a few racks, maybe some unlabelled), and the seeds."""
    n = draw(st.integers(2, most))
    members = [f"n{i:03d}" for i in range(n)]
    racks = draw(st.integers(0, 5))
    labels = {}
    if racks:
        unlabelled = draw(st.booleans())
        for m in members:
            r = draw(st.integers(0, racks))
            if r < racks or not unlabelled:
                labels[m] = f"rack{r % racks}"
    seeds = members[: draw(st.integers(1, min(2, n - 1)))]
    return members, labels, seeds


@SETTINGS
@given(swarms(200), st.text("0123456789abcdef", min_size=1, max_size=8))
def test_the_graph_is_symmetric_bounded_racks_first_and_connected(swarm: tuple[list[str], dict[str, str], list[str]],
                                                                  key: str) -> None:
    members, labels, seeds = swarm
    g = SwarmGraph(members, complete=seeds, racks=labels, key=key)
    for m in members:
        nbrs = g.neighbours(m)
        assert m not in nbrs and len(nbrs) <= MAX_NEIGHBOURS
        same = [p for p in nbrs if labels.get(p, "") == labels.get(m, "")]
        cross = [p for p in nbrs if labels.get(p, "") != labels.get(m, "")]
        assert len(same) <= 2 * RINGS + 1  # its own rack first: 2 x RINGS there (one more for a few)
        group = [p for p in members if labels.get(p, "") == labels.get(m, "")]
        if len(group) <= FULL_MESH_MAX:
            assert set(same) == set(group) - {m}  # a small rack is a full mesh
        for p in cross:  # an edge between racks carries only its chunk classes
            classes = nbrs[p]
            assert classes is not None and classes <= set(range(GATEWAYS))
            assert all(g.gateway(g.group(m), c) == m and g.gateway(g.group(p), c) == p for c in classes)
        for p, classes in nbrs.items():  # symmetric, carrying the same classes both ways
            assert g.neighbours(p)[m] == classes
    assert connected(g)
    if g.multi:  # each rack has one gateway per class: a chunk enters a rack through one member
        for grp in {labels.get(m, "") for m in members}:
            for c in range(GATEWAYS):
                gw = g.gateway(grp, c)
                assert gw is not None and labels.get(gw, "") == grp


def test_the_graph_stays_connected_when_members_vanish_unnoticed() -> None:
    """A tenth of the members gone, before anyone recomputes: the others are
    still connected, in every one of 200 draws (w.h.p. for a union of
    random Hamiltonian cycles)."""
    rng = random.Random(7)
    for draw in range(200):
        n = rng.randrange(30, 400)
        members = [f"m{draw}-{i}" for i in range(n)]
        g = SwarmGraph(members, key=f"k{draw}")
        gone = set(rng.sample(members, n // 10))
        assert connected(g, [m for m in members if m not in gone]), (draw, n)


def test_degrees_are_even_in_a_large_rack() -> None:
    """Each member of a large rack has 2 x RINGS neighbours (rings that give
    the same edge twice are made up for): no receiver gets a smaller share
    of the uploads around it."""
    for n in (10, 30, 100, 1000):
        g = SwarmGraph([f"r{i}" for i in range(n)], key="degrees")
        degrees = Counter(len(g.neighbours(m)) for m in g.members)
        assert degrees[2 * RINGS] >= n - 2, degrees


def test_a_member_that_joins_moves_few_edges() -> None:
    members = [f"r{i}" for i in range(300)]
    before = SwarmGraph(members, key="k")
    after = SwarmGraph([*members, "new"], key="k")
    moved = [m for m in members if set(before.neighbours(m)) != set(after.neighbours(m)) - {"new"}]
    assert len(after.neighbours("new")) == 2 * RINGS
    assert len(moved) <= 4 * RINGS, moved  # its ring neighbours, and the few that made up for a double edge


@SETTINGS
@given(swarms(30), st.integers(1, 24))
def test_seed_shares_partition_what_it_sends(swarm: tuple[list[str], dict[str, str], list[str]], n_chunks: int) -> None:
    members, labels, seeds = swarm
    g = SwarmGraph(members, complete=seeds, racks=labels, key="s")
    for seed in seeds:
        pulling = [p for p in g.neighbours(seed) if p not in seeds]
        counts = [0] * n_chunks
        for p in pulling:
            share = g.share(seed, p, n_chunks)
            edge = allowed_mask(g.neighbours(seed)[p], n_chunks)
            assert all(edge[c] for c in range(n_chunks) if share[c]) if edge is not None else True
            for c in range(n_chunks):
                counts[c] += share[c]
        may_send = set()
        for p in pulling:
            edge = allowed_mask(g.neighbours(seed)[p], n_chunks)
            may_send |= set(range(n_chunks)) if edge is None else {c for c in range(n_chunks) if edge[c]}
        assert all(counts[c] == (1 if c in may_send else 0) for c in range(n_chunks))  # once each, no gap


def _rounds(members: list[str], labels: dict[str, str], seeds: list[str], n_chunks: int, rng: random.Random,
            dying: set[str], *, limit: int) -> tuple[int, dict[str, set[int]], list[tuple[Counter[str], SwarmGraph]],
                                                     list[str]]:
    """Rounds of the pure policy, every request done within its round; the
    ``dying`` receivers vanish after the first round (and from the views
    one round later).  Returns the rounds taken, what each node holds, the
    requests in flight per holder in each round (with that round's graph),
    and the seeds' sends in order."""
    receivers = [m for m in members if m not in seeds]
    have: dict[str, set[int]] = {m: set(range(n_chunks)) if m in seeds else set() for m in members}
    plans = {r: ChunkPlan(n_chunks) for r in receivers}
    pulling = {r: (r,) for r in receivers}
    delivered: dict[str, Counter[str]] = {r: Counter() for r in receivers}
    alive, seen = set(members), set(members)
    loads: list[tuple[Counter[str], SwarmGraph]] = []
    seed_sends: list[str] = []
    for round_ in range(limit):
        if round_ == 1:
            alive -= dying
        if round_ == 2:
            seen -= dying
        todo = [r for r in receivers if r in alive and len(have[r]) < n_chunks]
        if not todo:
            return round_, have, loads, seed_sends
        complete = frozenset(m for m in seen if len(have[m]) == n_chunks)
        graph = SwarmGraph(seen, complete=complete, racks=labels, key="rounds")
        load: Counter[str] = Counter()
        asked: list[tuple[str, str, int]] = []
        for r in todo:
            plan = plans[r]
            rr = refresh(plan, seen, complete, r, lambda p, r=r: delivered[r][p] > 0, pulling[r], rng, racks=labels,
                         key="rounds", seeds=seeds, graph=graph)
            pulling[r] = rr.pulling
            for peer, cap in rr.ask.items():
                plan.set_source(peer, restrict(sorted(have[peer]), rr.allowed[peer]), inflight=cap)
            for peer, chunk in plan.next_requests(float(round_), rng):
                load[peer] += 1
                asked.append((r, peer, chunk))
        loads.append((load, graph))
        for r, peer, chunk in asked:
            if peer in alive and chunk in have[peer]:
                if peer in seeds:
                    seed_sends.append(f"{chunk}")
                plans[r].on_verified(peer, chunk, float(round_))
                have[r].add(chunk)
                delivered[r][peer] += 1
            else:
                plans[r].on_failed(peer, chunk, float(round_))
    return limit, have, loads, seed_sends


@settings(SETTINGS, max_examples=40)
@given(swarms(24), st.integers(1, 16), st.integers(0, 2**32), st.integers(0, 3))
def test_no_receiver_starves(swarm: tuple[list[str], dict[str, str], list[str]], n_chunks: int, seed: int,
                             die: int) -> None:
    members, labels, seeds = swarm
    rng = random.Random(seed)
    receivers = [m for m in members if m not in seeds]
    dying = set(rng.sample(receivers, min(die, len(receivers) - 1))) if receivers else set()
    limit = 4 * n_chunks + 40
    rounds, have, loads, _ = _rounds(members, labels, seeds, n_chunks, rng, dying, limit=limit)
    starved = [r for r in receivers if r not in dying and len(have[r]) < n_chunks]
    assert not starved and rounds < limit, (starved, rounds)
    # The upload slots: no holder is asked for more at once than it has neighbours (one request
    # each), or than a receiver alone may ask of it.
    for load, graph in loads:
        for holder, n in load.items():
            assert n <= max(SWARM_INFLIGHT * len(graph.neighbours(holder)), PER_PEER_INFLIGHT) <= MAX_NEIGHBOURS


def test_a_seed_sends_no_chunk_twice_while_its_neighbours_pull_their_shares() -> None:
    for n, chunks in ((12, 64), (40, 96), (80, 128)):
        members = ["seed"] + [f"r{i:03d}" for i in range(n)]
        _, _, _, sends = _rounds(members, {}, ["seed"], chunks, random.Random(n), set(), limit=10 * chunks)
        assert len(sends[:chunks]) == len(set(sends[:chunks])) == chunks, sends[:chunks]  # every chunk once first
        assert len(sends) <= 1.25 * chunks, len(sends)  # then a few more, to neighbours done with their shares


def test_progress_in_the_catalog_does_not_grow_as_n_squared() -> None:
    """A receiver alone publishes its progress every second; in a swarm every
    few seconds, stretched so that every node hears about the same number
    of progress records a second from a swarm of any size."""
    assert progress_interval_s(1) == PROGRESS_INTERVAL_S == 1.0
    heard = [n / progress_interval_s(n) for n in (2, 24, 100, 1000, 10_000)]  # records a node hears a second
    assert max(heard) <= PROGRESS_RECORDS_PER_S and progress_interval_s(24) >= 5.0


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(st.integers(2, 80), st.integers(0, 4), st.integers(0, 12), st.integers(0, 2**16))
def test_stand_ins_are_rack_mates_that_are_no_neighbours_and_every_node_spreads_them(
        n: int, racks: int, k: int, seed: int) -> None:
    nodes = [f"n{i}" for i in range(n)]
    labels = {m: f"r{i % racks}" for i, m in enumerate(nodes)} if racks else {}
    g = SwarmGraph(nodes, racks=labels, key=str(seed))
    skip = set(random.Random(seed).sample(nodes, n // 4))
    for me in nodes[:10]:
        got = g.stand_ins(me, k, skip)
        assert len(got) == len(set(got)) <= k and me not in got
        assert not set(got) & (set(g.neighbours(me)) | skip)
        assert all(g.group(p) == g.group(me) for p in got)
        room = [m for m in nodes if m != me and g.group(m) == g.group(me) and m not in g.neighbours(me)
                and m not in skip]
        assert len(got) == min(k, len(room))  # as many as asked while any is left
        assert got == SwarmGraph(reversed(nodes), racks=labels, key=str(seed)).stand_ins(me, k, skip)  # alike
    if n >= 40 and k:  # each node its own order: the first stand-ins spread over the group
        firsts = Counter(g.stand_ins(m, 1)[0] for m in nodes if g.stand_ins(m, 1))
        assert max(firsts.values()) <= n // 4
