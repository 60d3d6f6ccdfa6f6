"""Membership: the record lattice, suspicion timers, rumour queue, IndexedSet."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.membership import (
    BroadcastQueue,
    IndexedSet,
    MemberTable,
    SuspicionConfig,
    record_hash,
)
from protocol.wire import MemberRecord, MemberState, MemberUpdate

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

ME = MemberRecord("me", "addr-me", 1, 0, MemberState.ALIVE)
IDS = ("n1", "n2", "n3")
ALIVE, SUSPECT, DEAD, LEFT = (
    MemberState.ALIVE,
    MemberState.SUSPECT,
    MemberState.DEAD,
    MemberState.LEFT,
)


def table(now: float = 0.0, cfg: SuspicionConfig | None = None) -> MemberTable:
    return MemberTable(ME, now, cfg or SuspicionConfig())


def rec(
    node: str = "n1",
    gen: int = 1,
    inc: int = 0,
    state: MemberState = ALIVE,
    addr: str = "a1",
) -> MemberRecord:
    return MemberRecord(node, addr, gen, inc, state)


def records_of(t: MemberTable) -> dict[str, MemberRecord]:
    return {r.node_id: r for r in t.records()}


def check_indexes(t: MemberTable) -> None:
    others = [m for m in t if m.record.node_id != t.me]
    assert set(t.live) == {m.record.node_id for m in others if m.state <= SUSPECT}
    assert set(t.gone) == {m.record.node_id for m in others if m.state is DEAD}
    assert t.suspects == {m.record.node_id for m in others if m.state is SUSPECT}
    expect = sum(record_hash(m.record) for m in t if m.state <= SUSPECT) % 2**64
    assert t.members_hash() == expect
    assert t.count_live() == len(t.live) + 1


# -- the lattice -----------------------------------------------------------------

member_records = st.builds(
    MemberRecord,
    st.sampled_from(IDS),
    st.sampled_from(["a1", "a2", "a3"]),
    st.integers(0, 3),
    st.integers(0, 3),
    st.sampled_from(list(MemberState)),
)
member_updates = st.builds(
    MemberUpdate, member_records, st.none() | st.sampled_from(["n1", "n2", "x"])
)


def seeded_table() -> MemberTable:
    """Every node known at the lattice's bottom, so no 'unknown dead' rule applies."""
    t = table()
    for nid in IDS:
        t.merge(MemberUpdate(MemberRecord(nid, "", 0, 0, ALIVE)), 0.0)
    return t


def lattice_max(updates: list[MemberUpdate]) -> dict[str, MemberRecord]:
    out: dict[str, MemberRecord] = {nid: MemberRecord(nid, "", 0, 0, ALIVE) for nid in IDS}
    for u in updates:
        r = u.record
        cur = out[r.node_id]
        if (r.rank, r.address) > (cur.rank, cur.address):
            out[r.node_id] = r
    return out


@SETTINGS
@given(updates=st.lists(member_updates, max_size=25), perm_seed=st.integers(0, 2**32 - 1))
def test_merge_commutative_any_order(updates: list[MemberUpdate], perm_seed: int) -> None:
    shuffled = list(updates)
    random.Random(perm_seed).shuffle(shuffled)
    t1, t2 = seeded_table(), seeded_table()
    for i, u in enumerate(updates):
        t1.merge(u, float(i))
    for i, u in enumerate(shuffled):
        t2.merge(u, float(i))
    expect = lattice_max(updates)
    expect["me"] = ME
    assert records_of(t1) == records_of(t2) == expect
    assert t1.members_hash() == t2.members_hash()
    check_indexes(t1)
    check_indexes(t2)


@SETTINGS
@given(
    xs=st.lists(member_updates, max_size=10),
    ys=st.lists(member_updates, max_size=10),
    zs=st.lists(member_updates, max_size=10),
)
def test_merge_associative(
    xs: list[MemberUpdate], ys: list[MemberUpdate], zs: list[MemberUpdate]
) -> None:
    """(X join Y) join Z == X join (Y join Z), joining whole tables record by record."""

    def join(dst: MemberTable, src: MemberTable) -> None:
        for r in src.records():
            if r.node_id != "me":
                dst.merge(MemberUpdate(r), 0.0)

    def build(us: list[MemberUpdate]) -> MemberTable:
        t = seeded_table()
        for u in us:
            t.merge(u, 0.0)
        return t

    left = build(xs)
    join(left, build(ys))
    join(left, build(zs))
    yz = build(ys)
    join(yz, build(zs))
    right = build(xs)
    join(right, yz)
    assert records_of(left) == records_of(right)


@SETTINGS
@given(updates=st.lists(member_updates, max_size=20))
def test_merge_idempotent(updates: list[MemberUpdate]) -> None:
    t = seeded_table()
    for u in updates:
        t.merge(u, 0.0)
    once = records_of(t)
    h = t.members_hash()
    for u in updates:
        if u.record.state is SUSPECT and u.accuser is not None:
            continue  # an accuser is a confirmation the first time only; checked below
        assert t.merge(u, 1.0) is False
    for u in updates:
        t.merge(u, 2.0)
    assert records_of(t) == once
    assert t.members_hash() == h
    # Merging records one already has changes nothing.
    for r in t.records():
        if r.node_id != "me":
            assert t.merge(MemberUpdate(r), 3.0) is False


def test_higher_record_wins_in_rank_order() -> None:
    t = table()
    assert t.merge(MemberUpdate(rec(inc=0, state=ALIVE)), 0.0)
    assert t.merge(MemberUpdate(rec(inc=0, state=SUSPECT), "n2"), 0.0)
    assert not t.merge(MemberUpdate(rec(inc=0, state=ALIVE)), 0.0)  # ALIVE < SUSPECT at same inc
    assert t.merge(MemberUpdate(rec(inc=1, state=ALIVE)), 0.0)  # refutation
    assert t.get("n1").state is ALIVE  # type: ignore[union-attr]
    assert t.merge(MemberUpdate(rec(inc=1, state=DEAD)), 0.0)
    assert t.merge(MemberUpdate(rec(inc=1, state=LEFT)), 0.0)
    assert not t.merge(MemberUpdate(rec(inc=1, state=DEAD)), 0.0)
    assert t.merge(MemberUpdate(rec(gen=2, inc=0, state=ALIVE)), 0.0)  # restart beats all
    assert records_of(t)["n1"] == rec(gen=2)


def test_equal_rank_address_tiebreak() -> None:
    t = table()
    t.merge(MemberUpdate(rec(addr="b")), 0.0)
    assert not t.merge(MemberUpdate(rec(addr="a")), 0.0)
    assert t.merge(MemberUpdate(rec(addr="c")), 0.0)
    assert records_of(t)["n1"].address == "c"


def test_unknown_dead_or_left_not_adopted() -> None:
    t = table()
    assert t.merge(MemberUpdate(rec(state=DEAD)), 0.0) is False
    assert t.merge(MemberUpdate(rec(state=LEFT)), 0.0) is False
    assert "n1" not in t
    assert t.merge(MemberUpdate(rec(state=SUSPECT), "n2"), 0.0) is True
    assert "n1" in t and "n1" in t.suspects
    check_indexes(t)


def test_reaped_dead_do_not_come_back() -> None:
    t = table()
    t.merge(MemberUpdate(rec()), 0.0)
    t.merge(MemberUpdate(rec(state=DEAD)), 10.0)
    assert t.reap(20.0, after_s=100.0) == []
    assert t.reap(110.0, after_s=100.0) == ["n1"]
    assert "n1" not in t
    assert t.merge(MemberUpdate(rec(state=DEAD)), 120.0) is False
    assert "n1" not in t
    check_indexes(t)


def test_rumours_about_self_ignored_by_table() -> None:
    t = table()
    assert t.merge(MemberUpdate(MemberRecord("me", "x", 9, 9, DEAD)), 0.0) is False
    assert t.self_record == ME
    assert "me" not in t.live


def test_indexes_follow_states() -> None:
    t = table()
    t.merge(MemberUpdate(rec("n1")), 0.0)
    t.merge(MemberUpdate(rec("n2")), 0.0)
    assert set(t.live) == {"n1", "n2"}
    t.merge(MemberUpdate(rec("n1", state=SUSPECT), "n2"), 0.0)
    assert t.suspects == {"n1"} and "n1" in t.live
    t.merge(MemberUpdate(rec("n1", state=DEAD)), 0.0)
    assert set(t.live) == {"n2"} and set(t.gone) == {"n1"} and not t.suspects
    t.merge(MemberUpdate(rec("n2", state=LEFT)), 0.0)
    assert len(t.live) == 0 and set(t.gone) == {"n1"}
    t.merge(MemberUpdate(rec("n1", gen=2)), 0.0)
    assert set(t.live) == {"n1"} and not t.gone
    check_indexes(t)


def test_members_hash_covers_live_only() -> None:
    t1, t2 = table(), table()
    t1.merge(MemberUpdate(rec("n1")), 0.0)
    t2.merge(MemberUpdate(rec("n1")), 0.0)
    t1.merge(MemberUpdate(rec("n2")), 0.0)
    t1.merge(MemberUpdate(rec("n2", state=DEAD)), 0.0)
    assert t1.members_hash() == t2.members_hash()
    t1.merge(MemberUpdate(rec("n1", state=SUSPECT), "x"), 0.0)
    assert t1.members_hash() != t2.members_hash()


def test_set_self() -> None:
    t = table()
    new = MemberRecord("me", "addr-me", 1, 1, ALIVE)
    t.set_self(new, 5.0)
    assert t.self_record == new
    with pytest.raises(AssertionError):
        t.set_self(rec("n1"), 5.0)


# -- suspicion ---------------------------------------------------------------------


@SETTINGS
@given(
    n=st.integers(1, 10_000),
    interval=st.floats(0.01, 10.0),
    mult=st.floats(0.5, 10.0),
    max_mult=st.floats(1.0, 20.0),
    k=st.integers(0, 10),
)
def test_timeout_falls_with_confirmations_never_below_min(
    n: int, interval: float, mult: float, max_mult: float, k: int
) -> None:
    cfg = SuspicionConfig(interval, mult, max_mult, k)
    lo = cfg.min_timeout(n)
    ts = [cfg.timeout(n, c) for c in range(15)]
    assert all(a >= b for a, b in itertools.pairwise(ts))
    assert all(t >= lo - 1e-9 for t in ts)
    assert all(t <= lo * max(max_mult, 1.0) + 1e-9 for t in ts)
    # Only n - 2 members can confirm (not the suspect, not the first accuser).
    expected = min(k, n - 2)
    if expected <= 0:
        assert ts == [pytest.approx(lo)] * len(ts)
    else:
        assert ts[0] == pytest.approx(lo * max_mult)
        assert cfg.timeout(n, expected) == pytest.approx(lo)
    assert cfg.timeout(n, 1000) == pytest.approx(lo)


def test_timeout_numbers() -> None:
    cfg = SuspicionConfig(
        probe_interval_s=1.0, suspicion_mult=3.0, suspicion_max_mult=6.0, expected_confirmations=3
    )
    assert cfg.min_timeout(1) == 3.0
    assert cfg.min_timeout(10) == 3.0
    assert cfg.min_timeout(100) == pytest.approx(6.0)
    assert cfg.timeout(10, 0) == pytest.approx(18.0)
    assert cfg.timeout(10, 3) == pytest.approx(3.0)
    assert 3.0 < cfg.timeout(10, 1) < cfg.timeout(10, 0)
    assert cfg.min_timeout(1000) > cfg.min_timeout(100)
    # Two members: nobody can confirm, so the floor applies at once.
    assert cfg.timeout(2, 0) == pytest.approx(3.0)
    # Three members: one possible confirmation.
    assert cfg.timeout(3, 0) == pytest.approx(18.0)
    assert cfg.timeout(3, 1) == pytest.approx(3.0)


def test_suspicion_deadline_falls_with_accusers_and_expires() -> None:
    cfg = SuspicionConfig(expected_confirmations=3)
    t = table(cfg=cfg)
    for nid in ("n1", "n2", "n3", "n4"):
        t.merge(MemberUpdate(rec(nid)), 0.0)
    t.merge(MemberUpdate(rec("n1", state=SUSPECT), "n2"), 10.0)
    m = t.get("n1")
    assert m is not None and m.suspect_start == 10.0
    deadlines = [t.suspicion_deadline(m)]
    for accuser in ("n3", "n4", "me", "n3"):
        t.merge(MemberUpdate(rec("n1", state=SUSPECT), accuser), 11.0)
        deadlines.append(t.suspicion_deadline(m))
    assert deadlines == sorted(deadlines, reverse=True)
    assert deadlines[1] < deadlines[0]
    assert deadlines[-1] == deadlines[-2]  # a repeated accuser is no new confirmation
    floor = 10.0 + cfg.min_timeout(t.count_live())
    assert deadlines[-1] == pytest.approx(floor)
    assert t.expired_suspicions(floor - 0.01) == []
    assert [x.record.node_id for x in t.expired_suspicions(floor)] == ["n1"]


def test_repeat_accuser_is_not_news() -> None:
    t = table()
    t.merge(MemberUpdate(rec("n1")), 0.0)
    assert t.merge(MemberUpdate(rec("n1", state=SUSPECT), "n2"), 0.0)
    assert not t.merge(MemberUpdate(rec("n1", state=SUSPECT), "n2"), 0.0)
    assert t.merge(MemberUpdate(rec("n1", state=SUSPECT), "n3"), 0.0)
    assert not t.merge(MemberUpdate(rec("n1", state=SUSPECT), None), 0.0)


def test_refutation_clears_suspicion() -> None:
    t = table()
    t.merge(MemberUpdate(rec("n1")), 0.0)
    t.merge(MemberUpdate(rec("n1", state=SUSPECT), "n2"), 0.0)
    t.merge(MemberUpdate(rec("n1", inc=1)), 1.0)
    m = t.get("n1")
    assert m is not None and m.state is ALIVE and not m.accusers
    assert not t.suspects
    assert t.expired_suspicions(10**9) == []


# -- rumours ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_members", "mult", "expect"), [(1, 4, 4), (9, 4, 4), (10, 4, 8), (100, 3, 9), (0, 2, 2)]
)
def test_broadcast_retransmit_limit(n_members: int, mult: int, expect: int) -> None:
    q = BroadcastQueue(retransmit_mult=mult)
    u = MemberUpdate(rec())
    q.push(u)
    sent = 0
    for _ in range(100):
        got = q.take(n_members, 16)
        if not got:
            break
        assert got == (u,)
        sent += 1
    assert sent == expect
    assert len(q) == 0


def test_broadcast_least_sent_first_and_max_items() -> None:
    q = BroadcastQueue(retransmit_mult=3)
    a, b, c = (MemberUpdate(rec(n)) for n in ("n1", "n2", "n3"))
    q.push(a)
    assert q.take(1, 1) == (a,)
    q.push(b)
    assert q.take(1, 1) == (b,)  # b was sent 0 times, a once
    q.push(c)
    assert q.take(1, 1) == (c,)
    assert len(q.take(1, 2)) == 2
    assert q.take(1, 0) == ()
    assert q.take(1, -1) == ()


def test_broadcast_one_rumour_per_member_newest_replaces() -> None:
    q = BroadcastQueue(retransmit_mult=1)
    old, new = MemberUpdate(rec(inc=0)), MemberUpdate(rec(inc=1))
    q.push(old)
    q.push(new)
    assert len(q) == 1
    assert q.take(5, 16) == (new,)
    assert len(q) == 0


@SETTINGS
@given(n_updates=st.integers(0, 30), n_members=st.integers(0, 200), max_items=st.integers(1, 16))
def test_broadcast_every_rumour_sent_exactly_limit_times(
    n_updates: int, n_members: int, max_items: int
) -> None:
    q = BroadcastQueue(retransmit_mult=2)
    ups = [MemberUpdate(rec(f"n{i}")) for i in range(n_updates)]
    for u in ups:
        q.push(u)
    counts: dict[str, int] = {}
    for _ in range(1000):
        got = q.take(n_members, max_items)
        if not got:
            break
        assert len(got) <= max_items
        assert len({u.record.node_id for u in got}) == len(got)
        for u in got:
            counts[u.record.node_id] = counts.get(u.record.node_id, 0) + 1
    limit = 2 * max(1, math.ceil(math.log10(n_members + 1)))
    assert counts == {u.record.node_id: limit for u in ups}


# -- IndexedSet --------------------------------------------------------------------------

set_ops = st.lists(
    st.tuples(st.booleans(), st.sampled_from([f"x{i}" for i in range(12)])), max_size=60
)


@SETTINGS
@given(ops=set_ops)
def test_indexed_set_matches_python_set(ops: list[tuple[bool, str]]) -> None:
    s = IndexedSet()
    model: set[str] = set()
    for add, item in ops:
        if add:
            s.add(item)
            model.add(item)
        else:
            s.discard(item)
            model.discard(item)
        assert len(s) == len(model)
        assert set(s) == model
        assert len(list(s)) == len(model)  # no duplicates in the backing list
        for x in model:
            assert x in s
    assert "never" not in s


@SETTINGS
@given(
    items=st.sets(st.sampled_from([f"x{i}" for i in range(12)]), max_size=12),
    k=st.integers(-1, 15),
    exclude=st.none() | st.sampled_from(["x0", "x1", "nope"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_indexed_set_sample(items: set[str], k: int, exclude: str | None, seed: int) -> None:
    s = IndexedSet()
    for x in sorted(items):
        s.add(x)
    out = s.sample(random.Random(seed), k, exclude=exclude)
    assert len(out) == len(set(out))
    assert set(out) <= items
    assert exclude not in out
    assert len(out) <= max(k, 0)
    eligible = items - {exclude}
    if k >= len(items):
        assert set(out) == eligible
    # Same seed, same answer: deterministic given the rng.
    assert s.sample(random.Random(seed), k, exclude=exclude) == out


def test_indexed_set_sample_is_roughly_uniform() -> None:
    s = IndexedSet()
    for i in range(5):
        s.add(f"x{i}")
    rng = random.Random(1)
    counts = dict.fromkeys(s, 0)
    for _ in range(2000):
        for x in s.sample(rng, 1):
            counts[x] += 1
    assert all(300 < c < 500 for c in counts.values()), counts


def test_indexed_set_small_k_sample_is_full_when_possible() -> None:
    # The gossip layer asks for fanout/indirect_checks (2-4) out of a few peers.
    s = IndexedSet()
    for i in range(6):
        s.add(f"x{i}")
    for seed in range(200):
        out = s.sample(random.Random(seed), 3, exclude="x0")
        assert len(out) == 3
