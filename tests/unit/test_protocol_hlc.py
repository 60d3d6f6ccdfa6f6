"""Hybrid logical clock: stamps, observe, skew, wire form."""

from __future__ import annotations

import itertools

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import RemoteProtocolError
from protocol.hlc import HLC, ClockSkewError, Stamp

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)


def test_stamps_strictly_increase_with_frozen_clock() -> None:
    c = HLC("n1")
    stamps = [c.now(1000) for _ in range(5)]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == 5
    assert [s.logical for s in stamps] == [0, 1, 2, 3, 4]
    assert all(s.wall_ms == 1000 and s.node_id == "n1" for s in stamps)


def test_clock_going_backwards_still_increases() -> None:
    c = HLC("n1")
    a = c.now(5000)
    b = c.now(4000)  # the wall clock stepped back
    assert b > a
    assert b.wall_ms == 5000
    d = c.now(6000)
    assert d == Stamp(6000, 0, "n1")


@SETTINGS
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=50))
def test_now_is_strictly_monotonic(times: list[int]) -> None:
    c = HLC("n1")
    stamps = [c.now(t) for t in times]
    assert all(a < b for a, b in itertools.pairwise(stamps))
    for s, t in zip(stamps, times, strict=True):
        assert s.wall_ms >= t


def test_observe_advances_past_received_stamp() -> None:
    c = HLC("a", max_drift_ms=60_000)
    c.now(1000)
    remote = Stamp(5000, 7, "b")
    c.observe(remote, 1000)
    s = c.now(1000)
    assert s > remote
    assert s == Stamp(5000, 8, "a")


def test_observe_same_wall_takes_higher_logical() -> None:
    c = HLC("a")
    c.now(1000)
    c.now(1000)  # logical 1
    c.observe(Stamp(1000, 9, "b"), 1000)
    assert c.now(1000) == Stamp(1000, 10, "a")


def test_observe_older_stamp_changes_nothing() -> None:
    c = HLC("a")
    last = c.now(9000)
    c.observe(Stamp(100, 50, "b"), 9000)
    assert c.now(9000) == Stamp(9000, last.logical + 1, "a")


@SETTINGS
@given(
    events=st.lists(
        st.tuples(
            st.integers(0, 10**6),
            st.none() | st.tuples(st.integers(0, 10**6), st.integers(0, 1000)),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_every_local_stamp_exceeds_everything_seen(
    events: list[tuple[int, tuple[int, int] | None]],
) -> None:
    c = HLC("a", max_drift_ms=10**7)
    highest: Stamp | None = None
    for now_ms, remote in events:
        if remote is not None:
            r = Stamp(remote[0], remote[1], "b")
            c.observe(r, now_ms)
            highest = r if highest is None else max(highest, r)
        else:
            s = c.now(now_ms)
            if highest is not None:
                assert s > highest
            highest = s if highest is None else max(highest, s)


def test_advance_to_restores_high_water_mark() -> None:
    c = HLC("a")
    assert c.high_water_ms == 0
    c.now(500)
    assert c.high_water_ms == 500
    restarted = HLC("a")
    restarted.advance_to(c.high_water_ms)
    restarted.advance_to(10)  # never backwards
    assert restarted.high_water_ms == 500
    # The wall clock is behind the persisted mark: stamps still go forward.
    assert restarted.now(100) == Stamp(500, 1, "a")
    c.observe(Stamp(900, 3, "b"), 900)
    assert c.high_water_ms == 900


def test_clock_skew_refused_past_max_drift() -> None:
    c = HLC("a", max_drift_ms=1000)
    c.now(10_000)
    c.observe(Stamp(11_000, 0, "b"), 10_000)  # exactly at the limit: accepted
    with pytest.raises(ClockSkewError):
        c.observe(Stamp(11_001, 0, "b"), 10_000)
    # The refused stamp did not move our clock.
    assert c.now(10_000) == Stamp(11_000, 1, "a")


def test_clock_skew_is_remote_error() -> None:
    assert issubclass(ClockSkewError, RemoteProtocolError)
    c = HLC("a", max_drift_ms=0)
    with pytest.raises(RemoteProtocolError):
        c.observe(Stamp(1, 0, "b"), 0)


def test_stamp_order_is_total_with_node_tiebreak() -> None:
    assert Stamp(1, 0, "b") > Stamp(1, 0, "a")
    assert Stamp(1, 1, "a") > Stamp(1, 0, "z")
    assert Stamp(2, 0, "a") > Stamp(1, 99, "z")


_stamps = st.builds(
    Stamp,
    st.integers(0, 2**63 - 1),
    st.integers(0, 2**32 - 1),
    st.text(min_size=1, max_size=64),
)


@SETTINGS
@given(_stamps)
def test_stamp_wire_roundtrip(s: Stamp) -> None:
    assert Stamp.from_wire(s.to_wire()) == s
    packed = msgpack.unpackb(msgpack.packb(s.to_wire(), use_bin_type=True), raw=False)
    assert Stamp.from_wire(packed) == s
    assert Stamp.from_wire(tuple(s.to_wire())) == s


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "1,2,a",
        5,
        {"wall_ms": 1},
        [],
        [1, 2],
        [1, 2, "a", 4],
        ["1", 2, "a"],
        [1, "2", "a"],
        [1, 2, 3],
        [1, 2, b"a"],
        [1.0, 2, "a"],
        [True, 2, "a"],
        [1, False, "a"],
        [-1, 0, "a"],
        [0, -1, "a"],
        [2**63, 0, "a"],
        [0, 2**32, "a"],
        [0, 0, ""],
        [0, 0, "x" * 65],
        [None, None, None],
    ],
)
def test_stamp_bad_wire_is_remote_error(raw: object) -> None:
    with pytest.raises(RemoteProtocolError):
        Stamp.from_wire(raw)


@SETTINGS
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda kids: (
            st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=3), kids, max_size=3)
        ),
        max_leaves=10,
    )
)
def test_stamp_from_any_value_is_stamp_or_remote_error(raw: object) -> None:
    try:
        s = Stamp.from_wire(raw)
    except RemoteProtocolError:
        return
    assert Stamp.from_wire(s.to_wire()) == s
