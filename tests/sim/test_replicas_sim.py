"""sim/replicas.py: the replica rule under crashes, a partition and joiners
keeps every model in [min, max] without flapping; a rule whose nodes rank
differently (so that they disagree) is caught."""

from __future__ import annotations

import random

import pytest

import protocol.replicas as replicas
from sim.replicas import simulate_replicas


def test_the_rule_converges_without_flapping() -> None:
    r = simulate_replicas(nodes=12, models=15, seed=2)
    assert r.violations == [] and r.copies_started > 0 and r.copies_dropped > 0


def test_nodes_that_disagree_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(5)
    monkeypatch.setattr(replicas, "_rank", lambda model, node: rnd.random().hex().encode())
    r = simulate_replicas(nodes=12, models=15, seed=2)
    assert r.flaps + r.over_started > 0 and r.violations
