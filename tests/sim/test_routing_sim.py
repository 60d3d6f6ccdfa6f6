"""Inference routed by every node alone, with the daemon's own decision on
load figures as stale as the catalog makes them: every node routes a prefix
alike, within the slack; a dead service moves only its own prefixes; and the
checks have teeth (a decision that favours the deciding node is caught)."""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping

from protocol.routing import route
from protocol.serving import ServiceRecord
from sim.__main__ import main
from sim.routing import POLICIES, RoutingSpec, simulate_routing

SMALL = RoutingSpec(nodes=5, services=3, prompts=6, rate=5.0, duration_s=120.0, seed=1, kill_at_s=60.0)


def test_every_node_routes_alike_and_within_the_slack() -> None:
    r = simulate_routing(SMALL)
    assert r.violations == []
    assert r.requests > 400 and r.alike_checks == 6 * 119
    assert 0 < r.alike_overloaded < r.alike_checks  # load did take over at times, and not always
    assert r.moved_prompts >= 1  # the dead service's prompts went elsewhere (and only those: no violation)
    assert r.failed > 0  # its requests in flight were cut off when it died


def test_affinity_finds_prefixes_cached_more_often_than_without() -> None:
    mine, least, rr = (simulate_routing(SMALL, p) for p in POLICIES)
    assert mine.requests == least.requests == rr.requests  # the same arrivals
    assert mine.warm_share > least.warm_share + 0.1 and mine.warm_share > rr.warm_share + 0.1
    assert least.violations == [] and rr.violations == []


def selfish(services: Iterable[ServiceRecord], model: str, me: str, reachable: Container[str],
            inflight: Mapping[tuple[str, int], int], key: str | None = None, **kw: int) -> list[ServiceRecord]:
    """A broken decision: the deciding node's own service first, when it has one."""
    order = route(services, model, me, reachable, inflight, key, **kw)
    return sorted(order, key=lambda s: s.node != me)


def test_a_decision_that_favours_its_own_node_is_caught() -> None:
    r = simulate_routing(SMALL, route_fn=selfish)
    assert any("by nodes that see it not overloaded" in v for v in r.violations)


def test_the_command_prints_its_table(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["routing", "--nodes", "4", "--services", "2", "--prompts", "4", "--duration", "60"]) == 0
    out = capsys.readouterr().out
    assert "max / mean in flight across services" in out and "Every node routes alike: yes; violations: 0" in out
