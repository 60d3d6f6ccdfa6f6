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

    def greedy(used, free, residents, marks, incoming=0):  # type: ignore[no-untyped-def]
        e = real(used, free, residents, marks, incoming)
        if e.evict:
            return Eviction(tuple(r.model for r in residents), e.freed, True, True, ())  # kept ones too
        return e

    monkeypatch.setattr(ev, "plan_eviction", greedy)
    r = simulate_eviction(seed=3, steps=2000)
    assert any("had to stay" in v for v in r.violations)
