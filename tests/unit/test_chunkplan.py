"""ChunkPlan: which chunk to fetch from which peer.

Unit tests pin each policy (rarest first, random first picks, load
spreading, endgame, stalls, bans, stuck); a small discrete-event swarm
driven by hypothesis checks the invariants under delays, failures, stalls,
growing partial holders, a dying peer and a corrupting one.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError
from protocol.transfer.chunkplan import ChunkPlan, ChunkState, PeerState

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _drain(plan: ChunkPlan, now: float = 0.0) -> None:
    """Verify every in-flight request (the first copy wins)."""
    for peer, c in plan.inflight():
        if plan.chunk_state(c) is not ChunkState.VERIFIED:
            plan.on_verified(peer, c, now)


# -- basics -----------------------------------------------------------------


def test_single_full_source_completes() -> None:
    plan = ChunkPlan(10, per_peer_inflight=4)
    rng = random.Random(1)
    assert plan.next_requests(0.0, rng) == []  # no source yet
    assert plan.stuck(0.0)
    plan.set_source("a", None)
    assert not plan.stuck(0.0)
    seen: set[int] = set()
    t = 0.0
    while not plan.complete:
        reqs = plan.next_requests(t, rng)
        assert 0 < len(reqs) <= 4
        assert len(plan.inflight("a")) <= 4
        for peer, c in reqs:
            assert peer == "a" and c not in seen
            seen.add(c)
        for peer, c in reqs:
            assert plan.on_verified(peer, c, t) == []
        t += 1.0
    assert seen == set(range(10))
    assert plan.missing() == set() and plan.verified_count == 10
    assert plan.next_requests(t, rng) == []
    assert not plan.stuck(t)
    assert plan.next_deadline() is None


def test_have_is_never_requested() -> None:
    plan = ChunkPlan(8, have=[0, 2, 4, 6, 6], per_peer_inflight=8)
    plan.set_source("a", None)
    assert plan.verified_count == 4
    assert plan.missing() == {1, 3, 5, 7}
    reqs = plan.next_requests(0.0, random.Random(0))
    assert sorted(c for _, c in reqs) == [1, 3, 5, 7]
    assert plan.missing() == {1, 3, 5, 7}  # in flight is still missing
    assert plan.chunk_state(1) is ChunkState.INFLIGHT
    assert plan.chunk_state(0) is ChunkState.VERIFIED
    _drain(plan)
    assert plan.complete


def test_empty_plan_is_complete() -> None:
    plan = ChunkPlan(0)
    plan.set_source("a", None)
    assert plan.complete and not plan.stuck(0.0)
    assert plan.next_requests(0.0, random.Random(0)) == []


def test_argument_checks() -> None:
    for kwargs in (
        {"per_peer_inflight": 0},
        {"stall_timeout_s": 0.0},
        {"stall_timeout_s": float("inf")},
        {"ban_after_bad": 0},
        {"random_first": -1},
    ):
        with pytest.raises(LocalProtocolError):
            ChunkPlan(4, **kwargs)
    with pytest.raises(LocalProtocolError):
        ChunkPlan(-1)
    with pytest.raises(LocalProtocolError):
        ChunkPlan(4, have=[4])
    plan = ChunkPlan(4)
    with pytest.raises(LocalProtocolError):
        plan.set_source("a", [0, 4])
    with pytest.raises(LocalProtocolError):
        plan.set_source("", None)
    with pytest.raises(LocalProtocolError):
        plan.on_verified("a", -1, 0.0)
    with pytest.raises(LocalProtocolError):
        plan.on_bad("a", 99, 0.0)
    with pytest.raises(LocalProtocolError):
        plan.on_failed("a", True, 0.0)


# -- policy -----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_rarest_first(seed: int) -> None:
    # rarity: chunks 0-4 held by 3 sources, 5-9 by 2, 10-19 by 1 (only "a")
    plan = ChunkPlan(20, per_peer_inflight=1, random_first=0)
    plan.set_source("a", None)
    plan.set_source("b", range(10))
    plan.set_source("c", range(5))
    assert [plan.rarity(c) for c in (0, 5, 10)] == [3, 2, 1]
    reqs = dict(plan.next_requests(0.0, random.Random(seed)))
    assert set(reqs) == {"a", "b", "c"}
    assert 10 <= reqs["a"] < 20
    assert 5 <= reqs["b"] < 10
    assert 0 <= reqs["c"] < 5


def test_rarest_first_ties_are_random() -> None:
    firsts = set()
    for seed in range(30):
        plan = ChunkPlan(50, per_peer_inflight=1, random_first=0)
        plan.set_source("a", None)
        plan.set_source("b", range(25))
        ((peer, c),) = plan.next_requests(0.0, random.Random(seed))[:1]
        assert peer == "a" and c >= 25  # rarity 1 before rarity 2
        firsts.add(c)
    assert len(firsts) > 5


def test_random_first_picks_ignore_rarity() -> None:
    def first_picks(random_first: int, seed: int) -> list[int]:
        plan = ChunkPlan(100, per_peer_inflight=4, random_first=random_first)
        plan.set_source("a", None)
        plan.set_source("b", range(50))  # 0-49 are common, 50-99 rare
        return [c for p, c in plan.next_requests(0.0, random.Random(seed)) if p == "a"]

    assert all(c >= 50 for seed in range(20) for c in first_picks(0, seed))
    common = [c for seed in range(20) for c in first_picks(4, seed) if c < 50]
    assert common  # random picks land on common chunks too
    # once the random picks are used up, rarest first takes over
    plan = ChunkPlan(100, per_peer_inflight=4, random_first=2)
    plan.set_source("a", None)
    plan.set_source("b", range(50))
    rng = random.Random(3)
    plan.next_requests(0.0, rng)
    _drain(plan)
    later = [c for p, c in plan.next_requests(1.0, rng) if p == "a"]
    assert len(later) == 4 and all(c >= 50 for c in later)


def test_load_goes_to_least_busy_holder() -> None:
    plan = ChunkPlan(20, per_peer_inflight=4, random_first=0)
    rng = random.Random(5)
    plan.set_source("a", None)
    first = plan.next_requests(0.0, rng)
    assert [p for p, _ in first] == ["a"] * 4
    plan.on_verified(*first[0], 0.0)  # a: 3 in flight
    plan.set_source("b", None)  # b: 0 in flight
    reqs = plan.next_requests(1.0, rng)
    assert [p for p, _ in reqs[:3]] == ["b", "b", "b"]
    assert sorted(p for p, _ in reqs) == ["a", "b", "b", "b", "b"]
    assert len(plan.inflight("a")) == len(plan.inflight("b")) == 4
    # an even start spreads evenly
    even = ChunkPlan(20, per_peer_inflight=4)
    for p in "abcd":
        even.set_source(p, None)
    counts: dict[str, int] = {}
    for p, _ in even.next_requests(0.0, random.Random(9)):
        counts[p] = counts.get(p, 0) + 1
    assert counts == dict.fromkeys("abcd", 4)


def test_only_holders_get_requests() -> None:
    plan = ChunkPlan(6, per_peer_inflight=6, random_first=3)
    plan.set_source("a", [0, 1])
    plan.set_source("b", [4])
    reqs = plan.next_requests(0.0, random.Random(2))
    assert sorted(reqs) == [("a", 0), ("a", 1), ("b", 4)]


# -- endgame ----------------------------------------------------------------


def test_endgame_duplicates_once_everything_is_in_flight() -> None:
    plan = ChunkPlan(3, per_peer_inflight=4, random_first=0)
    plan.set_source("a", None)
    plan.set_source("b", None)
    reqs = plan.next_requests(0.0, random.Random(1))
    assert len(reqs) == 6
    by_chunk: dict[int, list[str]] = {}
    for p, c in reqs:
        by_chunk.setdefault(c, []).append(p)
    assert sorted(by_chunk) == [0, 1, 2]
    assert all(sorted(ps) == ["a", "b"] for ps in by_chunk.values())
    assert plan.next_requests(0.5, random.Random(1)) == []  # at most 2 per chunk
    redundant = plan.on_verified("a", 1, 1.0)
    assert redundant == [("b", 1)]
    assert ("b", 1) not in plan.inflight()
    assert plan.on_verified("b", 1, 1.0) == []  # late duplicate: harmless
    assert plan.verified_count == 1
    assert plan.statistics()["duplicates"] == 3


def test_endgame_off_never_duplicates() -> None:
    plan = ChunkPlan(3, per_peer_inflight=4, random_first=0, endgame=False)
    plan.set_source("a", None)
    plan.set_source("b", None)
    reqs = plan.next_requests(0.0, random.Random(1))
    assert len(reqs) == 3 and len({c for _, c in reqs}) == 3


def test_no_endgame_while_a_chunk_is_idle() -> None:
    plan = ChunkPlan(3, per_peer_inflight=1, random_first=0)
    plan.set_source("a", None)
    plan.set_source("b", None)
    rng = random.Random(4)
    first = dict(plan.next_requests(0.0, rng))
    (idle,) = {0, 1, 2} - set(first.values())
    plan.set_source("c", [first["a"]])  # c could duplicate a's chunk...
    assert plan.next_requests(1.0, rng) == []  # ...but chunk `idle` is not in flight
    plan.on_verified("b", first["b"], 2.0)
    assert plan.next_requests(3.0, rng) == [("b", idle), ("c", first["a"])]
    assert plan.on_verified("c", first["a"], 4.0) == [("a", first["a"])]


# -- failures, stalls, bans -------------------------------------------------


def test_failed_returns_chunk_without_strike() -> None:
    plan = ChunkPlan(1, per_peer_inflight=1)
    plan.set_source("a", None)
    rng = random.Random(0)
    assert plan.next_requests(0.0, rng) == [("a", 0)]
    plan.on_failed("a", 0, 1.0)
    assert plan.strikes("a") == 0 and plan.chunk_state(0) is ChunkState.MISSING
    assert plan.next_requests(1.0, rng) == [("a", 0)]
    plan.on_failed("a", 0, 2.0, backoff_s=5.0)
    assert plan.peer_state("a", 2.0) is PeerState.STALLED
    assert plan.next_requests(6.9, rng) == []
    assert plan.next_deadline() == 7.0
    assert plan.next_requests(7.0, rng) == [("a", 0)]


def test_expire_moves_stalled_request_to_another_source() -> None:
    plan = ChunkPlan(2, per_peer_inflight=1, stall_timeout_s=10.0, random_first=0, endgame=False)
    rng = random.Random(0)
    plan.set_source("a", None)
    ((_, x),) = plan.next_requests(0.0, rng)
    plan.set_source("b", None)
    ((_, y),) = plan.next_requests(5.0, rng)
    assert {x, y} == {0, 1}
    assert plan.next_deadline() == 10.0
    assert plan.expire(9.9) == []
    assert plan.expire(10.0) == [("a", x)]
    assert plan.peer_state("a", 10.0) is PeerState.STALLED
    assert plan.chunk_state(x) is ChunkState.MISSING
    assert plan.next_deadline() == 15.0  # b's request
    plan.on_verified("b", y, 10.0)
    assert plan.next_requests(10.0, rng) == [("b", x)]  # not a: it is stalled
    assert plan.next_deadline() == 20.0  # a's stall ends; b's new request expires at 20 too
    plan.on_verified("b", x, 11.0)
    assert plan.complete
    assert plan.statistics()["expired"] == 1


def test_stalled_peer_gets_work_again_after_the_stall() -> None:
    plan = ChunkPlan(4, per_peer_inflight=1, stall_timeout_s=2.0, endgame=False)
    plan.set_source("a", None)
    rng = random.Random(0)
    ((_, c),) = plan.next_requests(0.0, rng)
    assert plan.expire(2.0) == [("a", c)]
    assert plan.next_requests(3.9, rng) == []
    assert plan.stuck(3.9)  # the only source is stalled...
    assert plan.next_deadline() == 4.0
    assert not plan.stuck(4.0)  # ...until its stall ends
    assert len(plan.next_requests(4.0, rng)) == 1
    assert plan.peer_state("a", 4.0) is PeerState.BUSY


def test_bad_chunks_ban_a_peer() -> None:
    plan = ChunkPlan(10, per_peer_inflight=2, ban_after_bad=2)
    plan.set_source("evil", None)
    plan.set_source("good", [0, 1, 2])
    rng = random.Random(0)
    plan.next_requests(0.0, rng)
    evil = plan.inflight("evil")
    assert len(evil) == 2
    assert plan.on_bad(*evil[0], 1.0) is False
    assert plan.strikes("evil") == 1
    assert plan.chunk_state(evil[0][1]) is ChunkState.MISSING
    assert plan.on_bad(*evil[1], 2.0) is True
    assert plan.banned == frozenset({"evil"})
    assert plan.sources == frozenset({"good"})
    assert plan.inflight("evil") == []
    assert plan.peer_state("evil", 2.0) is PeerState.BANNED
    assert plan.rarity(5) == 0 and plan.rarity(0) == 1
    plan.set_source("evil", None)  # a banned peer stays banned
    assert plan.sources == frozenset({"good"})
    for _ in range(5):
        assert all(p == "good" for p, _ in plan.next_requests(3.0, rng))
        _drain(plan, 3.0)
    assert plan.missing() == set(range(3, 10))
    assert plan.stuck(3.0)
    assert plan.on_bad("evil", 3, 4.0) is True  # still banned


def test_ban_releases_in_flight_chunks() -> None:
    plan = ChunkPlan(4, per_peer_inflight=4, ban_after_bad=1)
    plan.set_source("a", None)
    rng = random.Random(0)
    reqs = plan.next_requests(0.0, rng)
    assert len(reqs) == 4
    assert plan.on_bad(*reqs[0], 1.0)
    assert plan.inflight() == []
    assert plan.missing() == {0, 1, 2, 3}
    assert all(plan.chunk_state(c) is ChunkState.MISSING for c in range(4))
    plan.set_source("b", None)
    assert len(plan.next_requests(1.0, rng)) == 4


def test_stuck_when_the_only_holder_is_gone() -> None:
    plan = ChunkPlan(6, per_peer_inflight=2)
    plan.set_source("full", None)
    plan.set_source("part", [0, 1, 2])
    rng = random.Random(0)
    plan.next_requests(0.0, rng)
    assert not plan.stuck(0.0)
    released = plan.remove_source("full")
    assert released and all(p == "full" for p, _ in released)
    assert plan.inflight("full") == []
    assert not plan.stuck(0.0)  # part still has chunks we miss
    for _ in range(3):
        plan.next_requests(1.0, rng)
        _drain(plan, 1.0)
    assert plan.missing() == {3, 4, 5}
    assert plan.stuck(1.0)
    assert plan.next_requests(1.0, rng) == []
    plan.add_source_chunks("part", [4])  # the partial holder made progress
    assert not plan.stuck(1.0)
    assert plan.next_requests(1.0, rng) == [("part", 4)]
    assert plan.remove_source("nobody") == []


# -- sources and rarity bookkeeping -----------------------------------------


_ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "set_full", "add", "remove", "bad", "request", "fail", "verify"]),
        st.sampled_from(["p0", "p1", "p2", "p3"]),
        st.frozensets(st.integers(0, 15), max_size=16),
    ),
    max_size=30,
)


@given(_ops)
@SETTINGS
def test_bookkeeping_matches_brute_force(ops: list[tuple[str, str, frozenset[int]]]) -> None:
    n = 16
    plan = ChunkPlan(n, ban_after_bad=2)
    held: dict[str, set[int]] = {}
    strikes: dict[str, int] = {}
    banned: set[str] = set()
    rng = random.Random(0)
    verified: set[int] = set()
    for op, peer, chunks in ops:
        if op == "request":
            for p, c in plan.next_requests(0.0, rng):
                assert c in held[p] and c not in verified
            continue
        if op == "fail":
            for p, c in plan.inflight():
                plan.on_failed(p, c, 0.0)
            continue
        if op == "verify":
            for p, c in plan.inflight()[: len(chunks)]:
                if c not in verified:
                    plan.on_verified(p, c, 0.0)
                    verified.add(c)
            continue
        if op == "bad":
            strikes[peer] = strikes.get(peer, 0) + 1
            assert plan.on_bad(peer, 0, 0.0) == (strikes[peer] >= 2)
            if strikes[peer] >= 2:
                banned.add(peer)
                held.pop(peer, None)
        elif peer in banned:
            continue
        elif op == "set":
            plan.set_source(peer, chunks)
            held[peer] = set(chunks)
        elif op == "set_full":
            plan.set_source(peer, None)
            held[peer] = set(range(n))
        elif op == "add":
            plan.add_source_chunks(peer, chunks)
            held[peer] = held.get(peer, set()) | chunks
        else:
            plan.remove_source(peer)
            held.pop(peer, None)
        assert plan.sources == frozenset(held)
        assert plan.banned == frozenset(banned)
        plan._assert_invariants()
        for c in range(n):
            assert plan.rarity(c) == sum(c in s for s in held.values())
            for p in ("p0", "p1", "p2", "p3"):
                assert plan.holds(p, c) == (c in held.get(p, ()))
        missing = set(range(n)) - verified
        assert plan.missing() == missing
        assert plan.stuck(0.0) == (bool(missing) and not any(s & missing for s in held.values()))


def test_statistics_and_queries() -> None:
    plan = ChunkPlan(5, per_peer_inflight=2)
    plan.set_source("a", None)
    plan.set_source("b", [1])
    plan.next_requests(0.0, random.Random(0))
    stats = plan.statistics()
    assert stats["n_chunks"] == 5 and stats["sources"] == 2 and stats["full_sources"] == 1
    assert stats["inflight_requests"] == len(plan.inflight()) == 3
    assert stats["missing"] == 5 and stats["verified"] == 0
    assert plan.peer_state("a", 0.0) is PeerState.BUSY
    assert plan.peer_state("zz", 0.0) is PeerState.UNKNOWN
    assert plan.n_chunks == 5


# -- a simulated swarm ------------------------------------------------------


@dataclass(frozen=True)
class Swarm:
    n_chunks: int
    n_full: int
    n_partial: int
    per_peer: int
    random_first: int
    endgame: bool
    ban_after: int
    corrupt: bool
    fail_p: float
    stall_p: float
    kill_one: bool
    seed: int


@dataclass
class Outcome:
    log: list[tuple[float, str, str, int]] = field(default_factory=list)
    bad_from_evil: int = 0
    duplicates: int = 0
    steps: int = 0


STALL_S = 5.0


def simulate(sw: Swarm) -> tuple[ChunkPlan, Outcome]:
    plan = ChunkPlan(
        sw.n_chunks,
        per_peer_inflight=sw.per_peer,
        stall_timeout_s=STALL_S,
        ban_after_bad=sw.ban_after,
        random_first=sw.random_first,
        endgame=sw.endgame,
    )
    plan_rng = random.Random(sw.seed)
    rng = random.Random(sw.seed ^ 0x5EED)
    out = Outcome()
    all_chunks = set(range(sw.n_chunks))
    held: dict[str, set[int]] = {}
    for i in range(sw.n_full):
        held[f"full{i}"] = set(all_chunks)
        plan.set_source(f"full{i}", None)
    if sw.corrupt:
        held["evil"] = set(all_chunks)
        plan.set_source("evil", None)
    events: list[tuple[float, int, str, str, int, int]] = []
    seq = 0

    def push(t: float, kind: str, peer: str, chunk: int = -1, token: int = 0) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, peer, chunk, token))

    for i in range(sw.n_partial):
        p = f"part{i}"
        held[p] = set(rng.sample(sorted(all_chunks), rng.randint(0, sw.n_chunks)))
        plan.set_source(p, held[p])
        push(rng.uniform(0.5, 3.0), "grow", p)
    victim = "part0" if sw.n_partial else ("full1" if sw.n_full > 1 else "")
    if sw.kill_one and victim:
        push(rng.uniform(0.0, 6.0), "kill", victim)

    outstanding: dict[tuple[str, int], int] = {}  # request -> token
    outcome_of: dict[int, str] = {}
    stalled_until: dict[str, float] = {}
    verified: set[int] = set()
    t = 0.0

    def cancel(reqs: list[tuple[str, int]]) -> None:
        for r in reqs:
            del outstanding[r]

    def cancel_peer(peer: str) -> None:
        for r in [r for r in outstanding if r[0] == peer]:
            del outstanding[r]

    while not plan.complete:
        out.steps += 1
        assert out.steps < 20_000, "the swarm did not converge"
        expired = plan.expire(t)
        cancel(expired)
        for peer, _ in expired:
            stalled_until[peer] = t + STALL_S
        before_inflight = {c for _, c in outstanding}
        reqs = plan.next_requests(t, plan_rng)
        dup_in_call = False
        for peer, c in reqs:
            out.log.append((t, "req", peer, c))
            assert c not in verified, "assigned a verified chunk"
            assert peer not in plan.banned, "assigned to a banned peer"
            assert c in held[peer], "assigned a chunk the peer does not hold"
            assert t >= stalled_until.get(peer, -1.0), "assigned to a stalled peer"
            assert (peer, c) not in outstanding, "same chunk twice to one peer"
            if c in before_inflight or any(c == oc for (_, oc) in outstanding):
                assert sw.endgame, "duplicate without endgame"
                dup_in_call = True
                out.duplicates += 1
            seq += 1
            outstanding[(peer, c)] = seq
            if peer == "evil":
                kind, delay = "bad", rng.uniform(0.1, 2.0)
            elif rng.random() < sw.fail_p:
                kind, delay = "fail", rng.uniform(0.01, 0.5)
            elif rng.random() < sw.stall_p:
                kind, delay = "ok", STALL_S * 3
            else:
                kind, delay = "ok", rng.uniform(0.1, 2.0)
            outcome_of[seq] = kind
            push(t + delay, "done", peer, c, seq)
        plan._assert_invariants()
        # bounds after every call
        per_peer: dict[str, int] = {}
        per_chunk: dict[int, int] = {}
        for p, c in outstanding:
            per_peer[p] = per_peer.get(p, 0) + 1
            per_chunk[c] = per_chunk.get(c, 0) + 1
        assert max(per_peer.values(), default=0) <= sw.per_peer
        assert max(per_chunk.values(), default=0) <= 2
        assert set(outstanding) == set(plan.inflight())
        if dup_in_call:
            assert plan.missing() <= set(per_chunk), "endgame while a chunk was idle"
        # advance the clock to the next event or deadline
        deadline = plan.next_deadline()
        nxt = [x for x in (events[0][0] if events else None, deadline) if x is not None]
        assert nxt, "nothing left to wait for, yet not complete (stuck)"
        t = max(t, min(nxt))
        while events and events[0][0] <= t:
            _, _, kind, peer, c, token = heapq.heappop(events)
            if kind == "grow":
                if peer not in held:
                    continue  # it was killed
                gain = set(rng.sample(sorted(all_chunks), min(3, sw.n_chunks)))
                held[peer] |= gain
                if rng.random() < 0.5:
                    plan.add_source_chunks(peer, gain)
                else:
                    plan.set_source(peer, None if held[peer] == all_chunks else held[peer])
                if held[peer] != all_chunks:
                    push(t + rng.uniform(0.5, 3.0), "grow", peer)
            elif kind == "kill":
                out.log.append((t, "kill", peer, -1))
                cancel(plan.remove_source(peer))
                del held[peer]
            elif outstanding.get((peer, c)) == token:
                del outstanding[(peer, c)]
                result = outcome_of[token]
                out.log.append((t, result, peer, c))
                if result == "bad":
                    out.bad_from_evil += 1
                    if plan.on_bad(peer, c, t):
                        cancel_peer(peer)
                elif result == "fail":
                    plan.on_failed(peer, c, t)
                else:
                    assert c not in verified
                    verified.add(c)
                    cancel(plan.on_verified(peer, c, t))
    assert verified == all_chunks
    assert plan.missing() == set() and plan.inflight() == []
    assert plan.strikes("evil") == out.bad_from_evil
    if sw.corrupt:
        assert out.bad_from_evil <= sw.ban_after
        assert ("evil" in plan.banned) == (out.bad_from_evil == sw.ban_after)
    return plan, out


swarms = st.builds(
    Swarm,
    n_chunks=st.integers(1, 48),
    n_full=st.integers(1, 3),
    n_partial=st.integers(0, 3),
    per_peer=st.integers(1, 4),
    random_first=st.integers(0, 5),
    endgame=st.booleans(),
    ban_after=st.integers(1, 3),
    corrupt=st.booleans(),
    fail_p=st.sampled_from([0.0, 0.1, 0.3]),
    stall_p=st.sampled_from([0.0, 0.05, 0.2]),
    kill_one=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)


@given(swarms)
@SETTINGS
def test_swarm_always_completes(sw: Swarm) -> None:
    simulate(sw)


@given(swarms)
@settings(max_examples=15, deadline=None, derandomize=True, database=None)
def test_swarm_is_reproducible_from_its_seed(sw: Swarm) -> None:
    _, a = simulate(sw)
    _, b = simulate(sw)
    assert a.log == b.log


def test_swarm_bans_the_corrupting_peer() -> None:
    sw = Swarm(
        n_chunks=64,
        n_full=2,
        n_partial=2,
        per_peer=2,
        random_first=4,
        endgame=True,
        ban_after=2,
        corrupt=True,
        fail_p=0.1,
        stall_p=0.05,
        kill_one=True,
        seed=7,
    )
    plan, out = simulate(sw)
    assert plan.banned == frozenset({"evil"})
    assert out.bad_from_evil == 2
    banned_at = next(t for t, kind, p, _ in reversed(out.log) if kind == "bad" and p == "evil")
    assert not [e for e in out.log if e[1] == "req" and e[2] == "evil" and e[0] > banned_at]


def test_swarm_uses_endgame() -> None:
    sw = Swarm(30, 3, 0, 2, 4, True, 2, False, 0.0, 0.0, False, 11)
    _, out = simulate(sw)
    assert out.duplicates > 0
    _, out = simulate(Swarm(30, 3, 0, 2, 4, False, 2, False, 0.0, 0.0, False, 11))
    assert out.duplicates == 0


def test_expire_at_next_deadline_always_releases() -> None:
    # next_deadline() and expire() must agree to the last bit of a float,
    # or a caller that sleeps until the deadline spins forever.
    for started in (5.63545854589496, 0.1, 1e9 + 0.3, 7.0):
        plan = ChunkPlan(1, per_peer_inflight=1, stall_timeout_s=5.0)
        plan.set_source("a", None)
        assert plan.next_requests(started, random.Random(0)) == [("a", 0)]
        deadline = plan.next_deadline()
        assert deadline is not None
        assert plan.expire(deadline) == [("a", 0)]


# -- choose_sources ----------------------------------------------------------

_names = st.sets(st.sampled_from([f"n{i}" for i in range(40)]))


@given(
    found=_names,
    complete=_names,
    current=_names,
    useless=_names,
    limit=st.integers(1, 30),
    seed=st.integers(0, 2**32),
)
@settings(max_examples=300)
def test_choose_sources_bounds_and_keeps_what_it_should(
    found: set[str], complete: set[str], current: set[str], useless: set[str], limit: int, seed: int
) -> None:
    from protocol.transfer.chunkplan import choose_sources

    out = choose_sources(found, complete, current, useless, limit, random.Random(seed))
    assert out == choose_sources(found, complete, current, useless, limit, random.Random(seed))
    assert out <= found
    assert len(out) == min(limit, len(found))  # never fewer than it could have
    full = found & complete
    if full:
        assert out & full, "a complete holder is always among the sources"
    dull = (useless - complete) & found
    if len(found - dull) >= limit:
        assert not out & dull, "a useless source made room for another"
    kept = (current & found) - dull
    if len(kept) < limit and (kept & full or not full):
        assert kept <= out, "sources in use stay while they are found and useful"


def test_choose_sources_spreads_a_large_swarm() -> None:
    from protocol.transfer.chunkplan import choose_sources

    found = {f"n{i}" for i in range(200)}
    rng = random.Random(7)
    picks = [choose_sources(found, {"n0"}, (), (), 24, rng) for _ in range(50)]
    assert all(len(p) == 24 and "n0" in p for p in picks)
    assert len(set().union(*picks)) > 150  # each receiver its own slice, not the same 24
    with pytest.raises(LocalProtocolError):
        choose_sources(found, (), (), (), 0, rng)


def test_useful_says_whether_a_source_holds_a_missing_chunk() -> None:
    plan = ChunkPlan(4, have=[0, 1])
    plan.set_source("full", None)
    plan.set_source("old", [0, 1])
    plan.set_source("new", [1, 2])
    assert plan.useful("full") and plan.useful("new")
    assert not plan.useful("old") and not plan.useful("unknown")


def test_a_source_that_stalls_or_is_much_slower_than_the_others_lags() -> None:
    plan = ChunkPlan(64, stall_timeout_s=10.0)
    for p in ("a", "b", "c", "dead"):
        plan.set_source(p, None, inflight=1)
    assert plan.lagging(2.0) == frozenset() and plan.took_s("a") is None
    rng = random.Random(1)
    t = 0.0
    for _ in range(3):
        for peer, chunk in plan.next_requests(t, rng):
            if peer != "dead":  # it never answers
                plan.on_verified(peer, chunk, t + (5.0 if peer == "c" else 1.0))
        t += 5.0
    assert plan.took_s("a") == 1.0 and plan.took_s("c") == 5.0
    assert plan.lagging(2.0) == {"c"}  # five times the median of a, b and c
    assert plan.lagging(2.0, chunks=4) == frozenset()  # too few chunks each to say
    assert [p for p, _ in plan.expire(t)] == ["dead"]
    assert plan.lagging(2.0) == {"c", "dead"}  # stalled now
    assert (plan.took_s("dead") or 0.0) >= 10.0  # its wait counts as what its chunk took


def test_a_held_back_source_is_asked_only_for_what_no_other_source_holds() -> None:
    """A source that lags (``hold_back``) gets a chunk only when no other
    source holds it, and never an endgame duplicate."""
    plan = ChunkPlan(6, per_peer_inflight=4)
    plan.set_source("fast", [0, 1, 2, 3], inflight=4)
    plan.set_source("slow", [2, 3, 4, 5], inflight=4)
    plan.hold_back({"slow"})
    assert plan.held_back == {"slow"}
    got = plan.next_requests(0.0, random.Random(3))
    assert sorted(c for p, c in got if p == "slow") == [4, 5]  # 2 and 3 wait for the fast one
    assert sorted(c for p, c in got if p == "fast") == [0, 1, 2, 3]
    for c in (0, 1, 4, 5):
        plan.on_verified("fast" if c < 2 else "slow", c, 1.0)
    assert plan.next_requests(1.0, random.Random(3)) == []  # endgame: no duplicate of 2 or 3 to "slow"
    plan.hold_back(())
    assert {p for p, _ in plan.next_requests(1.0, random.Random(3))} == {"slow"}  # not held back: it may
    full = ChunkPlan(4)
    full.set_source("seed", None, inflight=1)
    full.set_source("slow", [0, 1, 2, 3], inflight=4)
    full.hold_back({"slow"})
    got = full.next_requests(0.0, random.Random(1))
    assert [p for p, _ in got] == ["seed"]  # a full holder holds everything: nothing for "slow"
