"""The GPU publish rule in the simulator: peers never see figures beyond a
threshold of the truth, engine starts and stops are published at once, and
far fewer bytes are written than by writing every reading."""

from __future__ import annotations

from sim.__main__ import main
from sim.gpus import simulate_gpus


def test_the_rule_keeps_peers_close_to_the_truth_for_fewer_bytes() -> None:
    r = simulate_gpus(nodes=12, gpus_per_node=4, seed=3, hours=0.5)
    assert r.violations == []
    assert r.engine_changes > 0  # the run exercised starts and stops
    assert r.writes < r.reads and r.bytes_written < 0.6 * r.bytes_every_read


def test_the_command_prints_its_table(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["gpus", "--nodes", "4", "--gpus", "2", "--hours", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "publish_reason (the daemon's rule)" in out and "engine change late: 0" in out
