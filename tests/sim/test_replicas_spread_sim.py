"""sim/replicas.py, issue 24.3: at the end of the faults, every model spread over
the zones has its copies in as many zones as it may; a rule that ignores the
spread (ranks alone, as before) is caught."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

import sim.replicas
from protocol.replicas import Plan, ReplicaPolicy, plan


def test_spread_models_end_in_as_many_zones_as_they_may() -> None:
    r = sim.replicas.simulate_replicas(nodes=12, models=15, seed=5)
    assert r.spread_models > 0 and r.spread_unmet == 0 and r.violations == []


def test_a_rule_that_ignores_the_spread_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def spread_blind(model: str, policy: ReplicaPolicy, *args: Any, **kwargs: Any) -> Plan:
        return plan(model, dataclasses.replace(policy, spread=None), *args, **kwargs)

    monkeypatch.setattr(sim.replicas, "plan", spread_blind)
    r = sim.replicas.simulate_replicas(nodes=12, models=15, seed=5)
    assert r.spread_unmet > 0 and any("zones at the end" in v for v in r.violations)
