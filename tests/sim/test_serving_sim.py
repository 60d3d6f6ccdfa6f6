"""Engines that crash and hang under the daemon's service state machine: hangs
are caught within 30 s, crash loops give up by the rule, backoffs stay in
bounds; and the checks have teeth (a slower policy is caught)."""

from __future__ import annotations

from protocol.serving import LifePolicy
from sim.__main__ import main
from sim.serving import simulate_serving


def test_hangs_are_caught_in_time_and_crash_loops_give_up() -> None:
    r = simulate_serving(services=40, hours=2.0, seed=5, crash_every_s=90, hang_every_s=300)
    assert r.violations == []
    assert r.hangs_caught_s and max(r.hangs_caught_s) <= 30
    assert r.given_up > 0 and r.restarts > 0  # crashes every 90 s: some loop past 5 in 10 minutes


def test_a_policy_too_slow_for_the_target_is_caught() -> None:
    slow = LifePolicy(probe_interval_s=10.0, failure_threshold=5)
    r = simulate_serving(services=20, hours=2.0, seed=5, hang_every_s=600, policy=slow)
    assert any("a hang caught after" in v for v in r.violations)


def test_the_command_prints_its_table(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["serving", "--services", "10", "--hours", "1"]) == 0
    assert "hangs caught, p50 / max s" in capsys.readouterr().out
