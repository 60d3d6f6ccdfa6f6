"""The read view: models resolved last-writer-wins on HLC stamps."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.catalog import Catalog
from protocol.hlc import HLC, Stamp
from protocol.keys import LOC_PREFIX, REG_PREFIX, loc_key, reg_key
from protocol.view import ModelIndex, resolve_models

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None)

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def reg(
    stamp: Stamp, op: str = "register", since: Stamp | None = None, **extra: Any
) -> dict[str, Any]:
    v: dict[str, Any] = {"stamp": stamp.to_wire(), "op": op, "since": (since or stamp).to_wire()}
    v.update(extra)
    return v


def loc(stamp: Stamp, op: str = "add") -> dict[str, Any]:
    return {"stamp": stamp.to_wire(), "op": op}


def test_keys() -> None:
    assert reg_key(MODEL) == REG_PREFIX + MODEL
    assert loc_key(MODEL, "n1:gpu0") == f"{LOC_PREFIX}{MODEL}@n1:gpu0"


def test_single_registration_with_locations() -> None:
    s1, s2, s3 = Stamp(1000, 0, "a"), Stamp(1001, 0, "a"), Stamp(1002, 0, "b")
    items = [
        (
            "a",
            reg_key(MODEL),
            reg(s1, model_type="llm", source_url="https://hf.co/x", metadata={"q": "fp16"}),
        ),
        ("a", loc_key(MODEL, "a:gpu0"), loc(s2)),
        ("b", loc_key(MODEL, "b:disk"), loc(s3)),
        ("a", loc_key(MODEL, "a:dram"), loc(s2, "drop")),
    ]
    out = resolve_models(items)
    assert set(out) == {MODEL}
    mv = out[MODEL]
    assert mv.registered_by == "a"
    assert mv.model_type == "llm"
    assert mv.source_url == "https://hf.co/x"
    assert mv.metadata == {"q": "fp16"}
    assert mv.stamp == s1 and mv.since == s1
    assert mv.locations == ["a:gpu0", "b:disk"]


def test_last_writer_wins_across_writers() -> None:
    a, b = HLC("a"), HLC("b")
    s_a = a.now(1000)
    b.observe(s_a, 1000)
    s_b = b.now(1000)  # later than s_a although the wall clocks agree
    assert s_b > s_a
    items = [
        ("a", reg_key(MODEL), reg(s_a, model_type="old")),
        ("b", reg_key(MODEL), reg(s_b, model_type="new", since=s_a)),
    ]
    for order in (items, items[::-1]):
        mv = resolve_models(order)[MODEL]
        assert mv.registered_by == "b"
        assert mv.model_type == "new"
        assert mv.since == s_a


def test_later_unregister_on_other_node_wins() -> None:
    s_a, s_b = Stamp(1000, 0, "a"), Stamp(1000, 1, "b")
    items = [
        ("a", reg_key(MODEL), reg(s_a)),
        ("b", reg_key(MODEL), reg(s_b, "unregister")),
        ("a", loc_key(MODEL, "a:gpu0"), loc(Stamp(999, 0, "a"))),
    ]
    for order in (items, items[::-1]):
        assert resolve_models(order) == {}


def test_earlier_unregister_loses() -> None:
    items = [
        ("b", reg_key(MODEL), reg(Stamp(500, 0, "b"), "unregister")),
        ("a", reg_key(MODEL), reg(Stamp(1000, 0, "a"))),
    ]
    assert set(resolve_models(items)) == {MODEL}


def test_equal_wall_and_logical_broken_by_node_id() -> None:
    items = [
        ("a", reg_key(MODEL), reg(Stamp(1000, 0, "a"), model_type="from-a")),
        ("b", reg_key(MODEL), reg(Stamp(1000, 0, "b"), model_type="from-b")),
    ]
    for order in (items, items[::-1]):
        assert resolve_models(order)[MODEL].model_type == "from-b"


def test_locations_before_reregistration_since_dropped() -> None:
    t_reg1, t_loc_old = Stamp(1000, 0, "a"), Stamp(1100, 0, "a")
    t_unreg, t_reg2 = Stamp(1200, 0, "b"), Stamp(1300, 0, "a")
    t_loc_new = Stamp(1400, 0, "c")
    # The registration that wins began at t_reg2 (after an unregister).
    items = [
        ("a", reg_key(MODEL), reg(t_reg2, since=t_reg2)),
        ("b", reg_key(MODEL), reg(t_unreg, "unregister")),
        ("a", loc_key(MODEL, "a:gpu0"), loc(t_loc_old)),
        ("c", loc_key(MODEL, "c:disk"), loc(t_loc_new)),
        ("a", loc_key(MODEL, "a:dram"), loc(t_reg2)),  # exactly at since: kept
    ]
    del t_reg1
    mv = resolve_models(items)[MODEL]
    assert mv.since == t_reg2
    assert mv.locations == ["a:dram", "c:disk"]


def test_reregistration_keeping_since_keeps_locations() -> None:
    s1, s_loc, s2 = Stamp(1000, 0, "a"), Stamp(1100, 0, "a"), Stamp(1200, 0, "b")
    items = [
        ("a", reg_key(MODEL), reg(s1)),
        ("b", reg_key(MODEL), reg(s2, since=s1, metadata={"v": 2})),
        ("a", loc_key(MODEL, "a:gpu0"), loc(s_loc)),
    ]
    mv = resolve_models(items)[MODEL]
    assert mv.registered_by == "b" and mv.metadata == {"v": 2}
    assert mv.locations == ["a:gpu0"]


def test_location_lww_across_writers() -> None:
    s_reg = Stamp(1000, 0, "a")
    dev = "n1:gpu0"
    add_, drop_ = loc(Stamp(1100, 0, "n1")), loc(Stamp(1200, 0, "n2"), "drop")
    items = [
        ("a", reg_key(MODEL), reg(s_reg)),
        ("n1", loc_key(MODEL, dev), add_),
        ("n2", loc_key(MODEL, dev), drop_),
    ]
    for order in (items, items[::-1]):
        assert resolve_models(order)[MODEL].locations == []
    items[1] = ("n1", loc_key(MODEL, dev), loc(Stamp(1300, 0, "n1")))
    for order in (items, items[::-1]):
        assert resolve_models(order)[MODEL].locations == [dev]


def test_locations_of_unregistered_models_ignored() -> None:
    items = [("a", loc_key("ghost", "a:disk"), loc(Stamp(1, 0, "a")))]
    assert resolve_models(items) == {}


def test_garbage_values_ignored() -> None:
    good = Stamp(1000, 0, "a")
    garbage: list[tuple[str, str, Any]] = [
        ("x", reg_key(MODEL), None),
        ("x", reg_key(MODEL), "register"),
        ("x", reg_key(MODEL), [1, 2, 3]),
        ("x", reg_key(MODEL), {"op": "unregister"}),  # no stamp
        ("x", reg_key(MODEL), {"stamp": "tomorrow", "op": "unregister"}),
        ("x", reg_key(MODEL), {"stamp": [2**70, 0, "x"], "op": "unregister"}),
        ("x", reg_key(MODEL), {"stamp": [True, 0, "x"], "op": "unregister"}),
        ("x", reg_key(MODEL), {"stamp": [99999, 0, ""], "op": "unregister"}),
        ("x", loc_key(MODEL, "x:gpu0"), {"op": "add"}),
        ("x", loc_key(MODEL, "x:gpu1"), 7),
        ("x", LOC_PREFIX + "no-at-sign", loc(Stamp(2000, 0, "x"))),
        ("x", "other/key", reg(Stamp(3000, 0, "x"))),
    ]
    items = [
        ("a", reg_key(MODEL), reg(good, model_type=5, source_url=["u"], metadata="m")),
        *garbage,
    ]
    out = resolve_models(items)
    assert set(out) == {MODEL}
    mv = out[MODEL]
    assert mv.registered_by == "a"
    assert mv.model_type is None and mv.source_url is None and mv.metadata == {}
    assert mv.locations == []


def test_bad_since_falls_back_to_stamp() -> None:
    s = Stamp(1000, 0, "a")
    v = reg(s)
    v["since"] = "garbage"
    assert resolve_models([("a", reg_key(MODEL), v)])[MODEL].since == s


def test_unknown_op_is_not_registered() -> None:
    v = reg(Stamp(1000, 0, "a"), "maybe")
    assert resolve_models([("a", reg_key(MODEL), v)]) == {}


# -- through the catalog, on several nodes ---------------------------------------------


def _write_register(cat: Catalog, clock: HLC, now_ms: int, since: Stamp | None = None) -> Stamp:
    s = clock.now(now_ms)
    cat.set(reg_key(MODEL), reg(s, since=since or s, model_type=cat.self_id), now_ms / 1000)
    return s


def _sync_all(cats: list[Catalog]) -> None:
    rng = random.Random(0)
    for _ in range(2):
        for src in cats:
            for dst in cats:
                if src is not dst:
                    for d in src.delta_for(dict(dst.digest()), 1 << 30, rng):
                        dst.apply_delta(d, 0.0)


def test_resolution_agrees_on_every_node_after_sync() -> None:
    ca, cb, cc = Catalog("a", 1), Catalog("b", 1), Catalog("c", 1)
    ha, hb = HLC("a"), HLC("b")
    s1 = _write_register(ca, ha, 1000)
    ca.set(loc_key(MODEL, "a:gpu0"), loc(ha.now(1001)), 1.0)
    # Partition: b has not seen a's write, and unregisters then re-registers later.
    hb.observe(s1, 2000)
    s_unreg = hb.now(2000)
    cb.set(reg_key(MODEL), reg(s_unreg, "unregister"), 2.0)
    s2 = _write_register(cb, hb, 3000)
    cc.set(loc_key(MODEL, "c:disk"), loc(Stamp(3500, 0, "c")), 3.5)
    _sync_all([ca, cb, cc])
    views = [resolve_models(c.items()) for c in (ca, cb, cc)]
    assert views[0] == views[1] == views[2]
    mv = views[0][MODEL]
    assert mv.registered_by == "b" and mv.since == s2
    assert mv.locations == ["c:disk"]  # a:gpu0 was recorded before the new since


@SETTINGS
@given(
    writes=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.integers(0, 50),
            st.integers(0, 3),
            st.sampled_from(["register", "unregister"]),
        ),
        min_size=1,
        max_size=12,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_resolution_is_order_independent(
    writes: list[tuple[str, int, int, str]], seed: int
) -> None:
    # Each writer keeps only its latest value per key (as the catalog does).
    latest: dict[tuple[str, str], Any] = {}
    for node, wall, logical, op in writes:
        s = Stamp(wall, logical, node)
        latest[(node, reg_key(MODEL))] = reg(s, op)
        latest[(node, loc_key(MODEL, f"{node}:disk"))] = loc(Stamp(wall, logical + 1, node))
    items = [(n, k, v) for (n, k), v in latest.items()]
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    assert resolve_models(items) == resolve_models(shuffled)
    winner = max(
        (Stamp.from_wire(v["stamp"]), v) for (n, k), v in latest.items() if k.startswith(REG_PREFIX)
    )
    out = resolve_models(items)
    assert (MODEL in out) == (winner[1]["op"] == "register")


# -- the incremental index ---------------------------------------------------------

_KEYS = [reg_key("m1"), reg_key("o/m2"), loc_key("m1", "b:disk"), loc_key("o/m2", "a:dram"),
         "copy/m1@disk", "copy/o/m2@dram", "node", "xfer/1"]


@st.composite
def _ops(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from(["set", "set", "set", "delete", "sync", "sync", "forget", "reset", "gc"]))
        who = draw(st.sampled_from(["a", "b", "c"]))
        other = draw(st.sampled_from(["a", "b", "c"]))
        key = draw(st.sampled_from(_KEYS))
        op = draw(st.sampled_from(["register", "unregister", "add", "drop"]))
        out.append((kind, who, other, key, op, draw(st.integers(0, 50))))
    return out


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(_ops())
def test_the_index_always_equals_resolving_the_whole_catalog(ops: list[tuple[Any, ...]]) -> None:
    """Whatever happens to a catalog (own writes, deltas and resets from
    peers, nodes forgotten or restarted, tombstones collected), its
    ModelIndex holds what ``resolve_models`` over every key gives."""
    rng = random.Random(0)
    cats = {n: Catalog(n, 1, tombstone_grace_s=1.0) for n in "abc"}
    idx = {n: ModelIndex() for n in "abc"}
    for n in "abc":
        cats[n].subscribe(idx[n])
    hlc = {n: HLC(n) for n in "abc"}
    now = 0.0
    gens = dict.fromkeys("abc", 1)
    for kind, who, other, key, op, t in ops:
        now += 1.0
        cat = cats[who]
        if kind == "set":
            stamp = hlc[who].now(1000 + t)
            if key.startswith("copy/"):
                value: Any = {"manifest_hash": "h" * 32, "size": t, "files": 1}
            elif key.startswith(("reg/", "loc/")):
                value = {"stamp": stamp.to_wire(), "since": stamp.to_wire(), "op": op}
            else:
                value = {"t": t}
            cat.set(key, value, now)
        elif kind == "delete":
            cat.delete(key, now)
        elif kind == "sync" and who != other:
            for d in cats[other].delta_for(dict(cat.digest()), 1 << 20, rng):
                cat.apply_delta(d, now)
        elif kind == "forget":
            cat.forget(other)
        elif kind == "reset" and who != other:
            gens[other] += 1
            cat.reset_generation(other, gens[other])
        elif kind == "gc":
            cat.collect_tombstones(now + 10)
        for n in "abc":
            assert idx[n].all() == resolve_models(cats[n].items())
            assert idx[n].names() == sorted(idx[n].all())  # the cached order: every model, sorted
            for name in ("m1", "o/m2", "nope"):
                assert idx[n].get(name) == resolve_models(cats[n].items()).get(name)


def test_a_restore_fills_the_index() -> None:
    src = Catalog("a", 1)
    stamp = Stamp(5, 0, "a")
    src.set(reg_key("m"), reg(stamp), 0.0)
    src.set("copy/m@disk", {"manifest_hash": "h" * 32, "size": 3}, 0.0)
    dst = Catalog("a", 2)
    idx = ModelIndex()
    dst.subscribe(idx)
    dst.restore(src.snapshot(), 0.0, 2)
    assert idx.get("m") == resolve_models(dst.items())["m"] and idx.get("m") is not None
    assert idx.get("m").locations == ["a:disk"]  # type: ignore[union-attr]
