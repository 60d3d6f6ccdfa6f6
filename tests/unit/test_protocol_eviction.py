"""The eviction rule (``protocol.eviction``), by property."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.eviction import InvalidWatermarks, Resident, Watermarks, in_flight, plan_eviction

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None)

residents = st.lists(
    st.builds(Resident, model=st.sampled_from([f"m{i}" for i in range(12)]), size=st.integers(1, 400),
              last_used=st.integers(0, 50).map(float), keep=st.sampled_from([None, None, "served", "pinned"])),
    max_size=10, unique_by=lambda r: r.model)
marks = st.tuples(st.integers(2, 100), st.integers(1, 99)).filter(lambda t: t[1] < t[0]).map(
    lambda t: Watermarks(t[0] / 100, t[1] / 100))


@SETTINGS
@given(residents, st.integers(0, 3000), marks, st.integers(0, 1500))
def test_the_rule_evicts_least_recently_used_and_never_what_must_stay(
        res: list[Resident], spare: int, m: Watermarks, incoming: int) -> None:
    used = sum(r.size for r in res) + 50  # 50 bytes that are no copy's
    free = spare
    cap = used + free
    e = plan_eviction(used, free, res, m, incoming)
    by_model = {r.model: r for r in res}
    assert all(by_model[x].keep is None for x in e.evict)  # never a copy that must stay
    assert e.freed == sum(by_model[x].size for x in e.evict)
    assert {k for k, _ in e.kept} == {r.model for r in res if r.keep is not None} or not e.over
    after = used + incoming
    if after <= m.high * cap and incoming <= free:
        assert e == plan_eviction(used, free, [], m, incoming) and not e.evict  # under high: nothing
        return
    # The least recently used go first: the evicted are a prefix of the evictable by last use.
    order = sorted((r for r in res if r.keep is None), key=lambda r: (r.last_used, -r.size, r.model))
    assert list(e.evict) == [r.model for r in order[: len(e.evict)]]
    if incoming and not e.fits:
        assert e.evict == ()  # not enough: nothing is destroyed for a transfer that fails anyway
        assert after - sum(r.size for r in order) > m.high * cap or incoming > free + sum(r.size for r in order)
    if e.fits:
        assert after - e.freed <= m.high * cap
    if e.evict:  # no more than needed: without the last one, still above low
        assert after - (e.freed - by_model[e.evict[-1]].size) > m.low * cap


def test_a_no_space_message_names_what_it_could_not_evict() -> None:
    m = Watermarks(0.85, 0.70)
    e = plan_eviction(80, 20, [Resident("a", 40, 1.0, "an engine serves from it"), Resident("b", 10, 2.0)], m, 30)
    assert not e.fits and e.evict == ()
    text = e.message("disk", 30, 80, 100, m)
    assert "80% full" in text and "a: an engine serves from it" in text and "85%" in text


def test_watermarks_parse_and_refuse() -> None:
    assert Watermarks.parse("90,60") == Watermarks(0.9, 0.6)
    assert Watermarks.parse("90%, 60%") == Watermarks(0.9, 0.6)
    for bad in ("60,90", "85", "x,y", "120,50", "50,0"):
        with pytest.raises(InvalidWatermarks):
            Watermarks.parse(bad)


@SETTINGS
@given(st.dictionaries(st.sampled_from([f"t{i}" for i in range(8)]), st.integers(0, 500), max_size=8),
       st.dictionaries(st.sampled_from([f"t{i}" for i in range(10)]), st.none() | st.integers(-5, 600), max_size=10))
def test_in_flight_counts_what_each_transfer_has_left_and_drops_the_ended(
        reserved: dict[str, int], written: dict[str, int | None]) -> None:
    left, ended = in_flight(reserved, written)
    assert set(ended) == {k for k in reserved if written.get(k) is None}
    assert left == sum(max(b - max(written[k] or 0, 0), 0) for k, b in reserved.items() if k not in ended)
    assert 0 <= left <= sum(reserved.values())


@SETTINGS
@given(residents, st.integers(0, 3000), marks, st.lists(st.integers(1, 800), min_size=2, max_size=5))
def test_transfers_side_by_side_never_pass_high_together(
        res: list[Resident], spare: int, m: Watermarks, sizes: list[int]) -> None:
    """Transfers let in one after another, each counting what the earlier ones
    still have to write, end together at or under the high watermark: every
    one that was let in fits beside all the others (the bug: each alone fit)."""
    used, free = sum(r.size for r in res) + 50, spare
    cap = used + free
    left = {r.model: r for r in res}
    reserved = 0
    for size in sizes:
        e = plan_eviction(used, free, list(left.values()), m, size, reserved)
        if not e.fits:
            continue  # NO_SPACE for this one; the others go on
        for x in e.evict:
            used -= left.pop(x).size  # what is deleted moves from used to free
        free = cap - used
        reserved += size
    assert used + reserved <= m.high * cap or reserved == 0


def test_a_no_space_message_counts_what_is_promised_to_transfers_in_flight() -> None:
    m = Watermarks(0.85, 0.70)
    e = plan_eviction(40, 60, [], m, 30, reserved=30)  # 40 + 30 + 30 > 85
    assert not e.fits and plan_eviction(40, 60, [], m, 30).fits  # alone it would fit
    text = e.message("dram", 30, 40, 100, m, 30)
    assert "30 more promised to transfers in flight" in text and "15 bytes left under it" in text, text


def test_a_sweep_evicts_what_it_can_although_reservations_do_not_all_fit() -> None:
    """Something else filled the tier after transfers were let in: the sweep
    still evicts what may go (only a transfer's own admission is all or nothing)."""
    m = Watermarks(0.90, 0.80)
    res = [Resident("a", 30, 1.0), Resident("b", 900, 2.0, "pinned")]
    assert plan_eviction(950, 50, res, m).evict == ("a",)
    assert plan_eviction(950, 50, res, m, reserved=40).evict == ("a",)
    assert plan_eviction(950, 50, res, m, 10, reserved=40).evict == ()  # a transfer that cannot fit: nothing
