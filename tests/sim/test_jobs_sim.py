"""The jobs model: pipelines with no head under crashes and partitions.
CI runs README's `python -m sim jobs --seeds 50` (tests/integration/test_readme_bench.py);
these check the model itself and that its invariants have teeth."""

from __future__ import annotations

import pytest

import sim.jobs as sj
from protocol.jobs import parts, runnable
from sim.jobs import JobsSpec, draw_jobs, run_jobs


def test_a_run_with_crashes_and_a_partition_keeps_every_invariant() -> None:
    spec = JobsSpec(nodes=8, seed=7, jobs=6, crashes=2, restarts=1, partition=(10.0, 30.0))
    out = run_jobs(spec)
    assert out.violations == [] and out.ended == 6 and out.parts_run > 10
    assert run_jobs(spec).parts_run == out.parts_run  # seeded: the same run again


def test_the_invariants_catch_a_node_running_what_is_not_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    def greedy(view, me, coordinating):  # type: ignore[no-untyped-def]
        """Also take a ready part of another node, as a buggy executor might."""
        others = [(a, p) for n in sorted({p.node for av in view.actions.values() for p in parts(av.action)} - {None, me})
                  for a, p in runnable(view, n, False)]
        return runnable(view, me, coordinating) + others[:1]

    monkeypatch.setattr(sj, "runnable", greedy)
    out = run_jobs(JobsSpec(nodes=5, seed=3, jobs=4, crashes=0, restarts=0, partition=None))
    assert any("ran on" in v for v in out.violations), out.violations


def test_the_invariants_catch_a_job_that_never_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sj, "overdue_parts", lambda *a, **k: [])  # nobody fails the parts of a dead node
    assert any(any("did not end" in v for v in run_jobs(draw_jobs(s)).violations) for s in range(1, 40)), \
        "a crashed executor that never returns must leave its job unfinished without the verdict"
