"""The jobs model: pipelines with no head under crashes and partitions, each
node running the daemon's own ``plan_tick``.  CI runs README's
`python -m sim jobs --seeds 50` (tests/integration/test_readme_bench.py);
these check the model itself and that its invariants have teeth."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

import sim.jobs as sj
from protocol.jobs import Start, TickPlan, parts, plan_tick, runnable
from sim.jobs import JobsSpec, draw_jobs, run_jobs


def test_a_run_with_crashes_and_a_partition_keeps_every_invariant() -> None:
    spec = JobsSpec(nodes=8, seed=7, jobs=6, crashes=2, restarts=1, partition=(10.0, 30.0))
    out = run_jobs(spec)
    assert out.violations == [] and out.ended == 6 and out.parts_run > 10
    assert run_jobs(spec).parts_run == out.parts_run  # seeded: the same run again


def test_the_runs_retry_and_re_publish_as_the_daemon_does() -> None:
    """Across seeds, some parts fail retryably and are tried again, and some
    coordinators re-publish a job whose writer is gone: the model runs those
    decisions, with no violation."""
    outs = [run_jobs(dataclasses.replace(draw_jobs(s), fail_rate=0.3)) for s in range(1, 9)]
    assert all(o.violations == [] for o in outs), [o.violations for o in outs]
    assert sum(o.retries for o in outs) > 0 and sum(o.republished for o in outs) > 0


def test_the_invariants_catch_a_node_running_what_is_not_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    def greedy(views: Any, me: str, now_ms: int, **kw: Any) -> TickPlan:
        """Also take a ready part of another node, as a buggy executor might."""
        views = list(views)
        p = plan_tick(views, me, now_ms, **kw)
        others = [Start(v.job, a, q, 1) for v in views
                  for n in sorted({q.node for av in v.actions.values() for q in parts(av.action)} - {None, me})
                  for a, q in runnable(v, n, False)]
        return dataclasses.replace(p, starts=p.starts + tuple(others[:1]))

    monkeypatch.setattr(sj, "plan_tick", greedy)
    out = run_jobs(JobsSpec(nodes=5, seed=3, jobs=4, crashes=0, restarts=0, partition=None))
    assert any("ran on" in v for v in out.violations), out.violations


def test_the_invariants_catch_a_job_that_never_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_verdicts(*a: Any, **kw: Any) -> TickPlan:  # nobody fails the parts of a dead node
        return dataclasses.replace(plan_tick(*a, **kw), verdicts=())

    monkeypatch.setattr(sj, "plan_tick", no_verdicts)
    assert any(any("did not end" in v for v in run_jobs(draw_jobs(s)).violations) for s in range(1, 40)), \
        "a crashed executor that never returns must leave its job unfinished without the verdict"


def test_the_invariants_catch_a_retry_before_its_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    def impatient(*a: Any, **kw: Any) -> TickPlan:  # forgets when the retries are due
        return plan_tick(*a, **{**kw, "waiting": {k: dataclasses.replace(r, at_ms=0) for k, r in kw["waiting"].items()}})

    monkeypatch.setattr(sj, "plan_tick", impatient)
    outs = [run_jobs(dataclasses.replace(draw_jobs(s), fail_rate=0.3)) for s in range(1, 9)]
    assert any("before its backoff" in v for o in outs for v in o.violations)
