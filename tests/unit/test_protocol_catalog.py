"""The catalog CRDT: laws, gap-free deltas, GC and resets, generations, limits."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.catalog import Catalog, digest_entry_hash
from protocol.errors import LocalProtocolError
from protocol.wire import DeltaEntry, NodeDelta, NodeDigest

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

BIG = 1 << 40
IDS = ("n0", "n1", "n2", "n3")
KEYS = ("a", "b", "c", "d", "e")


# -- helpers -------------------------------------------------------------------


def deltas(src: Catalog, dst: Catalog, budget: int = BIG, seed: int = 0) -> tuple[NodeDelta, ...]:
    return src.delta_for(dict(dst.digest()), budget, random.Random(seed))


def apply_all(dst: Catalog, ds: tuple[NodeDelta, ...], now: float = 0.0) -> bool:
    changed = False
    for d in ds:
        changed |= dst.apply_delta(d, now)
    return changed


def sync(src: Catalog, dst: Catalog, budget: int = BIG, now: float = 0.0, seed: int = 0) -> bool:
    """One one-way anti-entropy step: ``dst`` takes what ``src`` has for it."""
    return apply_all(dst, deltas(src, dst, budget, seed), now)


def full_state(c: Catalog) -> dict[str, Any]:
    """Everything that matters about a catalog (not local seen_at times or stats)."""
    return {
        nid: (
            st_.generation,
            st_.max_version,
            st_.last_gc_version,
            {k: (e.version, e.tombstone, e.value) for k, e in st_.keys.items()},
        )
        for nid, st_ in c.nodes.items()
    }


def live(c: Catalog) -> dict[tuple[str, str], Any]:
    return {(nid, k): v for nid, k, v in c.items()}


def check_hash(c: Catalog) -> None:
    expect = sum(digest_entry_hash(n, d) for n, d in c.digest().items()) % 2**64
    assert c.digest_hash() == expect
    assert c.digest() == {n: s.digest() for n, s in c.nodes.items()}


def check_no_gap(receiver: Catalog, origins: dict[str, Catalog]) -> None:
    """A receiver never claims a version it lacks: for each origin at the same
    generation, every key the origin holds at a version <= the receiver's
    max_version is there, at exactly that version; nothing is above max."""
    for nid, st_ in receiver.nodes.items():
        if nid == receiver.self_id or nid not in origins:
            continue
        own = origins[nid].own
        if own.generation != st_.generation:
            continue
        assert st_.max_version <= own.max_version
        for k, e in st_.keys.items():
            assert e.version <= st_.max_version, (receiver.self_id, nid, k)
        for k, e in own.keys.items():
            if e.version <= st_.max_version:
                got = st_.keys.get(k)
                assert got is not None, f"{receiver.self_id} lacks {nid}/{k}@{e.version}"
                assert (got.version, got.tombstone, got.value) == (e.version, e.tombstone, e.value)


def converge(cats: list[Catalog], budget: int = BIG, rounds: int = 200, seed: int = 0) -> int:
    """Pairwise exchanges in a fixed round-robin until nothing changes."""
    rng = random.Random(seed)
    for r in range(rounds):
        changed = False
        for src in cats:
            for dst in cats:
                if src is not dst:
                    changed |= sync(src, dst, budget, seed=rng.randrange(2**32))
        if not changed:
            return r
    raise AssertionError("did not converge")


def assert_all_equal(cats: list[Catalog]) -> None:
    first = cats[0]
    for c in cats[1:]:
        assert c.digest() == first.digest()
        assert c.digest_hash() == first.digest_hash()
        assert live(c) == live(first)
        assert full_state(c) == full_state(first)


# -- strategies ------------------------------------------------------------------

small_values = (
    st.integers(-3, 3)
    | st.sampled_from(["x", "yy", "model"])
    | st.lists(st.integers(0, 3), max_size=3)
)

write = st.tuples(st.just("w"), st.integers(0, 3), st.sampled_from(KEYS), small_values)
delete = st.tuples(st.just("d"), st.integers(0, 3), st.sampled_from(KEYS), st.none())
exchange = st.tuples(st.just("x"), st.integers(0, 3), st.integers(0, 3), st.none())
ops_strategy = st.lists(st.one_of(write, write, delete, exchange), max_size=40)


def run_ops(ops: list[tuple[str, int, Any, Any]], n: int = 3, budget: int = BIG) -> list[Catalog]:
    cats = [Catalog(IDS[i], 1) for i in range(n)]
    for step, (kind, a, b, value) in enumerate(ops):
        if kind == "w":
            cats[a % n].set(b, value, float(step))
        elif kind == "d":
            cats[a % n].delete(b, float(step))
        elif a % n != b % n:
            sync(cats[a % n], cats[b % n], budget, float(step), seed=step)
    return cats


# -- local writes -------------------------------------------------------------------


def test_set_bumps_version_and_get() -> None:
    c = Catalog("n0", 1)
    assert c.set("k", 1, 0.0) == 1
    assert c.set("j", "v", 0.0) == 2
    assert c.get("n0", "k") == 1
    assert c.set("k", 2, 0.0) == 3
    assert c.get("n0", "k") == 2
    assert c.own.max_version == 3
    assert c.get("nobody", "k") is None
    assert c.get("n0", "missing") is None
    check_hash(c)


def test_set_same_value_is_no_op() -> None:
    c = Catalog("n0", 1)
    v = c.set("k", {"a": [1, 2]}, 0.0)
    h = c.digest_hash()
    assert c.set("k", {"a": [1, 2]}, 5.0) == v
    assert c.own.max_version == v
    assert c.digest_hash() == h


def test_set_value_of_other_type_is_a_change() -> None:
    c = Catalog("n0", 1)
    c.set("flag", 1, 0.0)
    c.set("flag", True, 0.0)
    assert c.get("n0", "flag") is True


def test_delete_writes_versioned_tombstone() -> None:
    c = Catalog("n0", 1)
    c.set("k", 1, 0.0)
    assert c.delete("k", 0.0) is True
    assert c.own.max_version == 2
    assert c.own.keys["k"].tombstone
    assert c.get("n0", "k") is None
    assert c.delete("k", 0.0) is False
    assert c.delete("never", 0.0) is False
    assert c.own.max_version == 2
    # A write after the delete revives the key at a new version.
    assert c.set("k", 1, 0.0) == 3
    assert c.get("n0", "k") == 1


def test_items_prefix_and_tombstones() -> None:
    c = Catalog("n0", 1)
    c.set("reg/a", 1, 0.0)
    c.set("loc/a@x", 2, 0.0)
    c.set("reg/b", 3, 0.0)
    c.delete("reg/b", 0.0)
    assert sorted(c.items("reg/")) == [("n0", "reg/a", 1)]
    assert len(list(c.items())) == 2


@pytest.mark.parametrize("key", ["", "k" * 513, None, 5, b"k"])
def test_bad_key_is_local_error(key: Any) -> None:
    c = Catalog("n0", 1)
    with pytest.raises(LocalProtocolError):
        c.set(key, 1, 0.0)
    assert c.own.max_version == 0


def test_value_size_limit() -> None:
    c = Catalog("n0", 1, value_max_bytes=200)
    c.set("k", "x" * 100, 0.0)
    with pytest.raises(LocalProtocolError):
        c.set("k", "x" * 300, 0.0)
    assert c.get("n0", "k") == "x" * 100
    with pytest.raises(LocalProtocolError):
        Catalog("n0", 1).set("big", b"\x00" * (64 * 1024), 0.0)


def test_key_length_limit_configurable() -> None:
    c = Catalog("n0", 1, key_max_chars=4)
    c.set("abcd", 1, 0.0)
    with pytest.raises(LocalProtocolError):
        c.set("abcde", 1, 0.0)


def test_keys_per_node_limit() -> None:
    c = Catalog("n0", 1, keys_per_node_max=2)
    c.set("a", 1, 0.0)
    c.set("b", 1, 0.0)
    with pytest.raises(LocalProtocolError):
        c.set("c", 1, 0.0)
    c.set("a", 2, 0.0)  # an existing key may still change
    assert c.get("n0", "a") == 2


def test_unencodable_value_raises() -> None:
    c = Catalog("n0", 1)
    with pytest.raises((LocalProtocolError, TypeError)):
        c.set("k", object(), 0.0)
    assert c.own.max_version == 0


# -- deltas ------------------------------------------------------------------------


def test_first_exchange_is_reset_then_incremental() -> None:
    a, b = Catalog("a", 1), Catalog("b", 1)
    a.set("k1", 1, 0.0)
    a.set("k2", 2, 0.0)
    ds = deltas(a, b)
    own = [d for d in ds if d.node_id == "a"]
    assert len(own) == 1 and own[0].reset and own[0].from_version == 0 and own[0].to_version == 2
    assert apply_all(b, ds)
    assert b.get("a", "k2") == 2
    a.set("k3", 3, 0.0)
    (d,) = [d for d in deltas(a, b) if d.node_id == "a"]
    assert not d.reset and d.from_version == 2 and d.to_version == 3
    assert [e.key for e in d.entries] == ["k3"]
    apply_all(b, (d,))
    assert deltas(a, b) == ()
    check_hash(b)


def test_delta_entries_sorted_by_version_within_window() -> None:
    a, b = Catalog("a", 1), Catalog("b", 1)
    for i in range(10):
        a.set(f"k{i % 4}", i, 0.0)
    sync(a, b)
    for i in range(10, 15):
        a.set(f"k{i % 4}", i, 0.0)
    (d,) = [d for d in deltas(a, b) if d.node_id == "a"]
    versions = [e.version for e in d.entries]
    assert versions == sorted(versions)
    assert all(d.from_version < v <= d.to_version for v in versions)


def test_gap_delta_ignored() -> None:
    a, b = Catalog("a", 1), Catalog("b", 1)
    a.set("k", 1, 0.0)
    sync(a, b)
    a.set("k", 2, 0.0)  # v2
    a.set("j", 3, 0.0)  # v3
    gap = NodeDelta("a", 1, 2, 3, 0, False, (DeltaEntry("j", 3, 3, False),))
    before = full_state(b)
    assert b.apply_delta(gap, 0.0) is False
    assert full_state(b) == before
    assert b.stats["deltas_gap"] == 1


def test_incremental_delta_for_unknown_origin_ignored() -> None:
    b = Catalog("b", 1)
    d = NodeDelta("a", 1, 0, 1, 0, False, (DeltaEntry("k", 1, 1, False),))
    assert b.apply_delta(d, 0.0) is False
    assert "a" not in b.nodes
    assert (
        b.apply_delta(NodeDelta("a", 1, 0, 1, 0, True, d.entries), 0.0, accept_new=False) is False
    )
    assert "a" not in b.nodes


def test_delta_about_receiver_itself_ignored() -> None:
    b = Catalog("b", 1)
    b.set("mine", 1, 0.0)
    before = full_state(b)
    for reset in (False, True):
        forged = NodeDelta("b", 1, 0, 99, 50, reset, (DeltaEntry("mine", 99, "forged", False),))
        assert b.apply_delta(forged, 0.0) is False
    forged_gen = NodeDelta("b", 7, 0, 1, 0, True, (DeltaEntry("mine", 1, "forged", False),))
    assert b.apply_delta(forged_gen, 0.0) is False
    assert full_state(b) == before
    assert b.get("b", "mine") == 1


def test_own_state_never_changed_by_exchanges() -> None:
    a, b = Catalog("a", 1), Catalog("b", 1)
    a.set("k", 1, 0.0)
    sync(a, b)
    a.set("k", 2, 0.0)
    own_before = full_state(a)["a"]
    # b's stale knowledge about a flows back to a: a keeps its own.
    sync(b, a)
    assert full_state(a)["a"] == own_before


def test_too_many_entries_in_one_delta_ignored() -> None:
    b = Catalog("b", 1, keys_per_node_max=2)
    entries = tuple(DeltaEntry(f"k{i}", i + 1, i, False) for i in range(3))
    assert b.apply_delta(NodeDelta("a", 1, 0, 3, 0, True, entries), 0.0) is False


# -- CRDT laws -----------------------------------------------------------------------


@SETTINGS
@given(ops=ops_strategy)
def test_merge_commutative(ops: list[Any]) -> None:
    cats = run_ops(ops, n=4)
    a, b, c = cats[0], cats[1], cats[2]
    db, dc = deltas(b, a, seed=1), deltas(c, a, seed=2)
    x, y = copy.deepcopy(a), copy.deepcopy(a)
    apply_all(x, db)
    apply_all(x, dc)
    apply_all(y, dc)
    apply_all(y, db)
    assert full_state(x) == full_state(y)
    assert x.digest() == y.digest()
    assert live(x) == live(y)
    check_hash(x)
    check_hash(y)


@SETTINGS
@given(ops=ops_strategy)
def test_merge_commutative_sequential(ops: list[Any]) -> None:
    """A<-B then A<-C equals A<-C then A<-B, each delta computed when applied."""
    cats = run_ops(ops, n=4)
    a, b, c = cats[0], cats[1], cats[2]
    x, y = copy.deepcopy(a), copy.deepcopy(a)
    sync(b, x)
    sync(c, x)
    sync(c, y)
    sync(b, y)
    assert full_state(x) == full_state(y)
    assert live(x) == live(y)


@SETTINGS
@given(ops=ops_strategy)
def test_merge_associative(ops: list[Any]) -> None:
    """(A<-B)<-C equals A<-(B<-C)."""
    cats = run_ops(ops, n=4)
    a, b, c = cats[0], cats[1], cats[2]
    left = copy.deepcopy(a)
    sync(b, left)
    sync(c, left)
    bc = copy.deepcopy(b)
    sync(c, bc)
    right = copy.deepcopy(a)
    sync(bc, right)
    assert full_state(left) == full_state(right)
    assert live(left) == live(right)


@SETTINGS
@given(ops=ops_strategy)
def test_merge_idempotent(ops: list[Any]) -> None:
    cats = run_ops(ops, n=4)
    a, b = cats[0], cats[1]
    ds = deltas(b, a)
    apply_all(a, ds)
    once = full_state(a)
    h = a.digest_hash()
    assert apply_all(a, ds) is False
    assert full_state(a) == once
    assert a.digest_hash() == h
    # Nothing left to send after a full exchange.
    assert deltas(b, a) == ()
    # And the same delta applied to a copy of the result changes nothing either.
    z = copy.deepcopy(a)
    apply_all(z, ds)
    assert full_state(z) == once


@SETTINGS
@given(ops=ops_strategy, order_seed=st.integers(0, 2**32 - 1))
def test_random_exchanges_converge(ops: list[Any], order_seed: int) -> None:
    cats = run_ops(ops, n=4)
    origins = {c.self_id: c for c in cats}
    rng = random.Random(order_seed)
    for _ in range(30):
        src, dst = rng.sample(cats, 2)
        sync(src, dst, seed=rng.randrange(2**32))
        check_no_gap(dst, origins)
    converge(cats, seed=order_seed)
    assert_all_equal(cats)
    for c in cats:
        check_hash(c)
        # Everyone holds every origin's own live state.
        for o in cats:
            assert {k: v for (n, k), v in live(c).items() if n == o.self_id} == {
                k: v for (n, k), v in live(o).items() if n == o.self_id
            }


@SETTINGS
@given(ops=ops_strategy, budget=st.integers(110, 400), order_seed=st.integers(0, 2**32 - 1))
def test_small_budget_never_gaps_and_converges(
    ops: list[Any], budget: int, order_seed: int
) -> None:
    cats = run_ops(ops, n=4, budget=budget)
    origins = {c.self_id: c for c in cats}
    for c in cats:
        check_no_gap(c, origins)
    rng = random.Random(order_seed)
    for _ in range(40):
        src, dst = rng.sample(cats, 2)
        ds = deltas(src, dst, budget, seed=rng.randrange(2**32))
        for d in ds:
            assert d.from_version <= d.to_version
            assert all(d.from_version < e.version <= d.to_version for e in d.entries)
        apply_all(dst, ds)
        check_no_gap(dst, origins)
    converge(cats, budget=budget, rounds=500, seed=order_seed)
    assert_all_equal(cats)


def test_budget_cut_stops_below_first_missing_entry() -> None:
    a, b = Catalog("a", 1), Catalog("b", 1)
    sync(a, b)
    for i in range(10):
        a.set(f"k{i}", "v" * 30, 0.0)
    rounds = 0
    while True:
        ds = [d for d in deltas(a, b, budget=200) if d.node_id == "a"]
        if not ds:
            break
        (d,) = ds
        assert not d.reset
        assert len(d.entries) >= 1
        assert d.to_version == d.entries[-1].version
        apply_all(b, (d,))
        check_no_gap(b, {"a": a})
        rounds += 1
        assert rounds < 20
    assert rounds > 1
    assert live(b) == live(a)


# -- tombstone collection and resets ------------------------------------------------


def test_tombstone_gc_raises_last_gc_version() -> None:
    c = Catalog("n0", 1, tombstone_grace_s=10.0)
    c.set("a", 1, 0.0)
    c.set("b", 1, 0.0)
    c.delete("a", 0.0)
    c.delete("b", 5.0)
    assert c.collect_tombstones(9.9) == 0
    assert c.collect_tombstones(10.0) == 1
    assert c.own.last_gc_version == 3
    assert "a" not in c.own.keys
    assert c.collect_tombstones(15.0) == 1
    assert c.own.last_gc_version == 4
    assert c.own.max_version == 4
    check_hash(c)


def test_peer_behind_gc_gets_reset_and_ends_equal() -> None:
    d = Catalog("d", 1, tombstone_grace_s=10.0)
    r = Catalog("r", 1)
    d.set("stale", 1, 0.0)
    d.set("keep", 1, 0.0)
    sync(d, r)
    assert r.get("d", "stale") == 1
    resets_before = r.stats["resets_applied"]
    d.delete("stale", 1.0)
    d.set("new", 2, 1.0)
    assert d.collect_tombstones(100.0) == 1
    ds = [x for x in deltas(d, r) if x.node_id == "d"]
    assert len(ds) == 1 and ds[0].reset and ds[0].from_version == 0
    apply_all(r, tuple(ds))
    assert r.get("d", "stale") is None  # no zombie
    assert "stale" not in r.nodes["d"].keys
    assert full_state(r)["d"] == full_state(d)["d"]
    assert r.stats["resets_applied"] == resets_before + 1
    assert d.stats["resets_sent"] >= 1
    assert deltas(d, r) == ()


def test_peer_past_gc_gets_incremental_not_reset() -> None:
    d = Catalog("d", 1, tombstone_grace_s=10.0)
    r = Catalog("r", 1)
    d.set("k", 1, 0.0)
    d.delete("k", 0.0)
    sync(d, r)
    d.collect_tombstones(100.0)
    d.set("j", 2, 100.0)
    (x,) = [x for x in deltas(d, r) if x.node_id == "d"]
    assert not x.reset
    apply_all(r, (x,))
    assert live(r) == live(d)


@SETTINGS
@given(ops=ops_strategy, gc_steps=st.sets(st.integers(0, 40), max_size=5))
def test_gc_at_random_times_still_converges_live_items(ops: list[Any], gc_steps: set[int]) -> None:
    cats = [Catalog(IDS[i], 1, tombstone_grace_s=0.0) for i in range(3)]
    for step, (kind, a, b, value) in enumerate(ops):
        if kind == "w":
            cats[a % 3].set(b, value, float(step))
        elif kind == "d":
            cats[a % 3].delete(b, float(step))
        elif a % 3 != b % 3:
            sync(cats[a % 3], cats[b % 3], now=float(step), seed=step)
        if step in gc_steps:
            cats[step % 3].collect_tombstones(float(step))
    converge(cats)
    first = cats[0]
    for c in cats[1:]:
        assert live(c) == live(first)
        assert {n: d.max_version for n, d in c.digest().items()} == {
            n: d.max_version for n, d in first.digest().items()
        }


def _gc_scenario() -> tuple[Catalog, Catalog, Catalog]:
    """Origin d; b saw d up to v3 and collected a tombstone; c saw d up to v5."""
    d = Catalog("d", 1)
    b = Catalog("b", 1, tombstone_grace_s=10.0)
    c = Catalog("c", 1)
    d.set("x", 1, 0.0)  # v1
    d.set("y", 2, 0.0)  # v2
    d.delete("x", 0.0)  # v3 tombstone
    sync(d, b)
    assert b.collect_tombstones(100.0) == 1  # b: max 3, last_gc 3
    d.set("z", 3, 0.0)  # v4
    d.set("w", 4, 0.0)  # v5
    sync(d, c)  # c: max 5, last_gc 0
    return d, b, c


def test_stale_reset_does_not_wipe_newer_state() -> None:
    _d, b, c = _gc_scenario()
    a = Catalog("a", 1)
    db, dc = deltas(b, a), deltas(c, a)
    x, y = copy.deepcopy(a), copy.deepcopy(a)
    apply_all(x, db)
    apply_all(x, dc)
    apply_all(y, dc)
    apply_all(y, db)
    # y learned z and w from c, then b's older reset threw them away.
    assert y.get("d", "w") == 4
    assert y.nodes["d"].max_version == 5
    assert live(x) == live(y)


def test_budget_cut_reset_after_gc_converges() -> None:
    d = Catalog("d", 1, tombstone_grace_s=10.0)
    for i in range(20):
        d.set(f"k{i:02}", "x" * 50, 0.0)
    d.delete("k03", 0.0)
    d.delete("k15", 0.0)
    assert d.collect_tombstones(100.0) == 2
    r = Catalog("r", 1)
    for _ in range(100):
        sync(d, r, budget=500)
    assert live(r) == live(d)
    assert r.nodes["d"].max_version == d.own.max_version


# -- generations ---------------------------------------------------------------------


def test_newer_generation_replaces_older() -> None:
    old = Catalog("d", 1)
    old.set("old-key", 1, 0.0)
    old.set("shared", "old", 0.0)
    r, c = Catalog("r", 1), Catalog("c", 1)
    sync(old, r)
    sync(old, c)
    new = Catalog("d", 2)
    new.set("shared", "new", 10.0)
    sync(new, r)
    assert r.nodes["d"].generation == 2
    # Until the new generation says its state is whole, the old keys stand.
    assert r.get("d", "old-key") == 1 and r.get("d", "shared") == "new"
    new.announce(10.0)
    sync(new, r)
    assert r.get("d", "old-key") is None
    assert r.get("d", "shared") == "new"
    # c still has generation 1: nothing of it reaches r any more.
    d_before = full_state(r)["d"]
    sync(c, r)
    assert full_state(r)["d"] == d_before
    # ...but r's newer generation reaches c.
    sync(r, c)
    assert full_state(c)["d"] == full_state(r)["d"] == full_state(new)["d"]


def test_older_generation_delta_ignored() -> None:
    r = Catalog("r", 1)
    r.apply_delta(NodeDelta("d", 5, 0, 1, 0, True, (DeltaEntry("k", 1, "v5", False),)), 0.0)
    for reset in (True, False):
        old = NodeDelta("d", 4, 0, 9, 0, reset, (DeltaEntry("k", 9, "v4", False),))
        assert r.apply_delta(old, 0.0) is False
    assert r.get("d", "k") == "v5"


def test_newer_generation_without_reset_is_a_gap() -> None:
    r = Catalog("r", 1)
    r.apply_delta(NodeDelta("d", 1, 0, 1, 0, True, (DeltaEntry("k", 1, 1, False),)), 0.0)
    assert (
        r.apply_delta(NodeDelta("d", 2, 1, 2, 0, False, (DeltaEntry("k", 2, 2, False),)), 0.0)
        is False
    )
    assert r.nodes["d"].generation == 1
    assert r.stats["deltas_gap"] == 1


def test_reset_generation_and_forget() -> None:
    d, r = Catalog("d", 1), Catalog("r", 1)
    d.set("k", 1, 0.0)
    sync(d, r)
    r.reset_generation("d", 1)  # not newer: nothing happens
    assert r.get("d", "k") == 1
    r.reset_generation("d", 2)
    assert r.get("d", "k") == 1  # it stands until generation 2 is whole at r
    assert r.nodes["d"].digest() == NodeDigest(2, 0, 0)
    d2 = Catalog("d", 2)
    d2.announce(1.0)
    sync(d2, r)
    assert r.get("d", "k") is None and r.shadowed() == []
    r.reset_generation("r", 9)  # never ourselves
    assert r.own.generation == 1
    r.forget("d")
    assert "d" not in r.nodes
    r.forget("r")
    assert "r" in r.nodes
    check_hash(r)


def test_restarted_origin_without_keys_still_resets_peers() -> None:
    old, r = Catalog("d", 1), Catalog("r", 1)
    old.set("model", "old", 0.0)
    sync(old, r)
    new = Catalog("d", 2)
    new.announce(1.0)
    sync(new, r)
    assert r.nodes["d"].generation == 2
    assert r.get("d", "model") is None


# -- persistence -----------------------------------------------------------------------


def test_snapshot_restore_roundtrip() -> None:
    a, b = Catalog("a", 1), Catalog("b", 1)
    a.set("k", [1, 2], 0.0)
    a.delete("k", 0.0)
    a.set("j", {"x": 1}, 0.0)
    b.set("m", "v", 0.0)
    sync(b, a)
    snap = a.snapshot()
    a2 = Catalog("a", 2)
    a2.restore(snap, 50.0, own_generation=2)
    assert a2.own.generation == 2
    assert a2.own.max_version == a.own.max_version
    assert live(a2) == live(a)
    st1, st2 = full_state(a), full_state(a2)
    assert st2["b"] == st1["b"]
    assert st2["a"][1:] == st1["a"][1:]
    check_hash(a2)


@given(
    st.lists(st.tuples(st.sampled_from(["reg/a", "reg/b", "copy/a@disk", "node", "nodes/x", "re", "reg/"]),
                       st.booleans()), max_size=30),
    st.sampled_from(["", "reg/", "reg/a", "copy/", "node", "nodes/", "re", "r", "x/"]),
)
def test_items_by_prefix_reads_its_family_and_misses_nothing(ops: list[tuple[str, bool]], prefix: str) -> None:
    """``items(prefix)`` through the family index equals a filter of every key,
    in the same order, across writes, deletes and tombstone collection."""
    c = Catalog("me", 1, tombstone_grace_s=0.0)
    for i, (key, delete) in enumerate(ops):
        if delete:
            c.delete(key, float(i))
        else:
            c.set(key, i, float(i))
        if i % 7 == 6:
            c.collect_tombstones(float(i) + 1)
    st_ = c.own
    want = [(k, e.value) for k, e in st_.keys.items() if not e.tombstone and k.startswith(prefix)]
    assert [(k, v) for _, k, v in c.items(prefix)] == want
