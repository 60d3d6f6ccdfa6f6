"""sim/eviction.py: the eviction rule under a stream of reads, and the
simulator's checks catching a rule that breaks them."""

from __future__ import annotations

import pytest

import sim.eviction as ev
from protocol.eviction import Eviction
from sim.eviction import simulate_eviction


def test_lru_fetches_less_than_random_and_breaks_nothing() -> None:
    lru = simulate_eviction(seed=3, steps=4000)
    rnd = simulate_eviction(seed=3, steps=4000, order=ev._random)
    assert lru.violations == [] and rnd.violations == []
    assert lru.evicted > 0 and lru.fetched < rnd.fetched


def test_the_simulator_catches_a_rule_that_evicts_what_must_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    real = ev.plan_eviction

    def greedy(used, free, residents, marks, incoming=0, reserved=0):  # type: ignore[no-untyped-def]
        e = real(used, free, residents, marks, incoming, reserved)
        if e.evict:
            return Eviction(tuple(r.model for r in residents), e.freed, True, True, ())  # kept ones too
        return e

    monkeypatch.setattr(ev, "plan_eviction", greedy)
    r = simulate_eviction(seed=3, steps=2000)
    assert any("had to stay" in v for v in r.violations)


def test_fetches_side_by_side_stay_under_high_only_with_reservations() -> None:
    """Fetches that write over several reads run side by side: with what each
    still has to write reserved none ends above the high watermark; each
    admitted alone (the rule before) some do, and the simulator counts them."""
    with_ = simulate_eviction(seed=3, steps=4000)
    alone = simulate_eviction(seed=3, steps=4000, reserve=False)
    assert with_.violations == [] and with_.overfilled == 0 and with_.joined > 0
    assert alone.overfilled > 0
