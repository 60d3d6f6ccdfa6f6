"""Jobs: the state every node derives from the records, and what each node starts."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.jobs import (
    ActionStatus,
    CancelRecord,
    JobRecord,
    JobStatus,
    PartStatus,
    RecordError,
    StepRecord,
    coordinator,
    job_view,
    overdue_parts,
    parse_step_key,
    parts,
    runnable,
    step_key,
)
from protocol.pipeline import parse_pipeline
from protocol.placement import GpuFacts, NodeFacts, NoPlacement, place, rank

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)
NODES = ("n1", "n2", "n3")


def copy(aid: str, src: str, *dsts: str, deps: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"action_id": aid, "action_type": "copy", "model_name": "m", "devices": [src, *dsts],
            "dependencies": list(deps)}


def job(*actions: dict[str, Any], fail_fast: bool = True) -> JobRecord:
    pipe = parse_pipeline({"name": "p", "actions": list(actions), "fail_fast": fail_fast})
    return JobRecord("j1", pipe, "n1", 1000)


Steps = dict[tuple[str, int], list[StepRecord]]


def done(node: str, t: int) -> StepRecord:
    return StepRecord(PartStatus.COMPLETED, node, started_ms=t - 1, finished_ms=t)


def failed(node: str, t: int, code: str = "BOOM") -> StepRecord:
    return StepRecord(PartStatus.FAILED, node, started_ms=t - 1, finished_ms=t, error_code=code, error_message="x")


def everyone(_n: str) -> bool:
    return True


def test_records_round_trip_and_hostile_values_are_refused() -> None:
    j = job(copy("a", "n1:disk", "n2:disk", "n3:dram"))
    assert JobRecord.from_value(j.to_value()) == j
    r = StepRecord(PartStatus.FAILED, "n2", 2, 5, 9, "NO_SOURCE", "gone", "note", "t1", 3, 4)
    assert StepRecord.from_value(r.to_value()) == r
    for bad in (None, 7, {"status": "exploded", "node": "n1"}, {"status": "running", "node": "a b"},
                {"status": "running", "node": "n1", "attempt": -1}):
        try:
            StepRecord.from_value(bad)
            raise AssertionError(bad)
        except RecordError:
            pass
    for bad_job in ({**j.to_value(), "pipeline": {"name": "x", "actions": "no"}}, {**j.to_value(), "submitted_by": ""}):
        try:
            JobRecord.from_value(bad_job)
            raise AssertionError(bad_job)
        except RecordError:
            pass
    assert CancelRecord.from_value(CancelRecord(5, "n3").to_value()) == CancelRecord(5, "n3")
    assert parse_step_key(step_key("j1", "a.b", 2)) == ("j1", "a.b", 2)
    assert parse_step_key("step/j1/a") is None and parse_step_key("step/j/a/x") is None


def test_parts_run_where_their_devices_say() -> None:
    j = job(copy("c", "n1:disk", "n2:disk", "n3:dram"),
            {"action_id": "d", "action_type": "delete", "model_name": "m", "devices": ["n1:disk", "n2:dram"]},
            {"action_id": "h", "action_type": "health_check", "target_url": "http://x/health"})
    assert [(p.node, str(p.device)) for p in parts(j.pipeline.action("c"))] == [("n2", "n2:disk"), ("n3", "n3:dram")]
    assert [p.node for p in parts(j.pipeline.action("d"))] == ["n1", "n2"]
    assert [p.node for p in parts(j.pipeline.action("h"))] == [None]


def test_independent_steps_start_at_once_on_their_nodes() -> None:
    j = job(copy("a", "n1:disk", "n2:disk"), copy("b", "n1:disk", "n3:disk"), copy("c", "n2:disk", "n3:dram", deps=("a",)))
    v = job_view(j, {}, None, everyone)
    assert v.status is JobStatus.PENDING
    assert [(a.action_id, p.node) for a, p in runnable(v, "n2", False)] == [("a", "n2")]
    assert [(a.action_id, p.node) for a, p in runnable(v, "n3", False)] == [("b", "n3")]
    v = job_view(j, {("a", 0): [done("n2", 5)]}, None, everyone)
    assert [a.action_id for a, _ in runnable(v, "n3", False)] == ["b", "c"]
    assert v.status is JobStatus.RUNNING and v.actions["c"].ready_ms == 5


def test_a_failure_ends_its_dependents_and_fail_fast_stops_new_starts() -> None:
    j = job(copy("a", "n1:disk", "n2:disk"), copy("b", "n1:disk", "n3:disk"), copy("c", "n2:disk", "n3:dram", deps=("a",)),
            copy("d", "n1:disk", "n3:dram", deps=("b",)))
    running_b = StepRecord(PartStatus.RUNNING, "n3", started_ms=3)
    v = job_view(j, {("a", 0): [failed("n2", 7)], ("b", 0): [running_b]}, None, everyone)
    assert v.actions["c"].status is ActionStatus.UPSTREAM_FAILED
    assert v.actions["d"].status is ActionStatus.PENDING and v.status is JobStatus.RUNNING  # b still runs
    assert runnable(v, "n3", False) == [(j.pipeline.action("b"), parts(j.pipeline.action("b"))[0])]  # n3 resumes its own
    v = job_view(j, {("a", 0): [failed("n2", 7)], ("b", 0): [done("n3", 9)]}, None, everyone)
    assert v.actions["d"].status is ActionStatus.CANCELLED  # fail_fast: nothing new starts
    assert v.status is JobStatus.FAILED and v.first_error == ("a", "BOOM", "x")
    j2 = job(*[a.to_value() for a in j.pipeline.actions], fail_fast=False)
    v = job_view(j2, {("a", 0): [failed("n2", 7)], ("b", 0): [done("n3", 9)]}, None, everyone)
    assert v.actions["d"].status is ActionStatus.PENDING and runnable(v, "n3", False)


def test_a_cancel_ends_the_job_once_running_parts_stop() -> None:
    j = job(copy("a", "n1:disk", "n2:disk"), copy("b", "n1:disk", "n3:disk", deps=("a",)))
    c = CancelRecord(10, "n3")
    v = job_view(j, {("a", 0): [StepRecord(PartStatus.RUNNING, "n2", started_ms=3)]}, c, everyone)
    assert v.status is JobStatus.RUNNING and runnable(v, "n2", False) == []
    v = job_view(j, {("a", 0): [StepRecord(PartStatus.CANCELLED, "n2", finished_ms=11)]}, c, everyone)
    assert v.status is JobStatus.CANCELLED and v.actions["b"].status is ActionStatus.CANCELLED


def test_an_unreachable_node_waits_then_fails_its_part() -> None:
    j = job(copy("a", "n1:disk", "n2:disk"))
    v = job_view(j, {}, None, lambda n: n != "n2")
    assert v.actions["a"].status is ActionStatus.WAITING_NODE
    since = {"n2": 2000}
    assert overdue_parts(v, since.get, 2000 + 59_000, 60_000) == []
    (over,) = overdue_parts(v, since.get, 2000 + 60_000, 60_000)
    assert over[0].action_id == "a" and over[1].node == "n2"
    verdict = StepRecord(PartStatus.FAILED, "n1", finished_ms=62_000, error_code="NODE_UNAVAILABLE")
    v = job_view(j, {("a", 0): [verdict]}, None, lambda n: n != "n2")
    assert v.status is JobStatus.FAILED and v.first_error is not None and v.first_error[1] == "NODE_UNAVAILABLE"
    assert runnable(job_view(j, {("a", 0): [verdict]}, None, everyone), "n2", False) == []  # back: not started


def test_the_coordinator_is_the_submitter_then_the_smallest_live_id() -> None:
    j = job(copy("a", "n1:disk", "n2:disk"))
    assert coordinator(j, everyone, NODES) == "n1"
    assert coordinator(j, lambda n: n != "n1", ["n3", "n2"]) == "n2"


def test_placement_prefers_holders_then_room_and_says_why_not() -> None:
    gib = 2**30
    facts = [NodeFacts("a", True, {"disk": 50 * gib}), NodeFacts("b", True, {"disk": 90 * gib}),
             NodeFacts("c", True, {"disk": 20 * gib}, holds=True), NodeFacts("d", False, {"disk": 900 * gib}),
             NodeFacts("e", True, {"disk": 1 * gib})]
    best, ranking = place("disk", 10 * gib, facts)
    assert [c.node_id for c in ranking][:3] == ["c", "b", "a"] and best.device == "c:disk"
    reasons = {c.node_id: c.reasons for c in ranking}
    assert reasons["d"] == ("not alive",) and "needs 10.0 GiB on disk" in reasons["e"][0]
    try:
        place("gpu", gib, facts)
        raise AssertionError("no GPU anywhere")
    except NoPlacement as e:
        assert e.code == "NO_CAPACITY" and all("no GPU" in c.reasons for c in e.ranking)
    g = rank("gpu", 10 * gib, [NodeFacts("x", True, gpus=(GpuFacts(0, 8 * gib), GpuFacts(1, 24 * gib, 4 * gib)))])
    assert g[0].fits and g[0].device == "x:gpu1"


@st.composite
def jobs_and_runs(draw: st.DrawFn) -> tuple[JobRecord, list[int], list[bool]]:
    n = draw(st.integers(1, 12))
    actions = []
    for i in range(n):
        deps = sorted({f"a{j}" for j in draw(st.lists(st.integers(0, i - 1), max_size=3))}) if i else []
        dsts = draw(st.lists(st.sampled_from(["n1:dram", "n2:disk", "n3:disk"]), min_size=1, max_size=2, unique=True))
        actions.append(copy(f"a{i}", "n1:disk", *dsts, deps=tuple(deps)))
    j = job(*actions, fail_fast=draw(st.booleans()))
    order = draw(st.lists(st.integers(0, 2), min_size=60, max_size=60))
    fails = draw(st.lists(st.booleans(), min_size=60, max_size=60))
    return j, order, fails


@SETTINGS
@given(jobs_and_runs())
def test_every_job_ends_and_no_part_runs_twice(case: tuple[JobRecord, list[int], list[bool]]) -> None:
    """Nodes take turns starting and finishing what ``runnable`` gives them,
    some parts failing: the job always ends, no part is started twice, and no
    part runs on a node its devices do not name."""
    j, order, fails = case
    steps: Steps = defaultdict(list)
    started: set[tuple[str, int]] = set()
    t = 2000
    for turn in range(400):
        v = job_view(j, steps, None, everyone)
        if v.status not in (JobStatus.PENDING, JobStatus.RUNNING):
            break
        # Each turn every node acts once, in an order the case draws.
        k = order[turn % len(order)]
        for node in NODES[k:] + NODES[:k]:
            v = job_view(j, steps, None, everyone)
            t = _act(j, v, node, steps, started, fails, turn, t)
    else:
        raise AssertionError("the job did not end")
    _check_end(j, steps, started)


def _act(j: JobRecord, v: Any, node: str, steps: Steps, started: set[tuple[str, int]], fails: list[bool],
         turn: int, t: int) -> int:
    for a, p in runnable(v, node, coordinator(j, everyone, NODES) == node):
        key = (a.action_id, p.index)
        assert key not in started, key
        assert p.node == node and p.device is not None and p.device.node == node
        started.add(key)
        t += 1
        bad = fails[(turn + p.index) % len(fails)] and turn % 3 == 0
        steps[key].append(failed(node, t) if bad else done(node, t))
    return t


def _check_end(j: JobRecord, steps: Steps, started: set[tuple[str, int]]) -> None:
    v = job_view(j, steps, None, everyone)
    assert v.status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)
    assert all(av.status.final for av in v.actions.values())
    if v.status is JobStatus.FAILED:
        assert v.first_error is not None or any(
            av.status is ActionStatus.UPSTREAM_FAILED for av in v.actions.values())
    if v.status is JobStatus.COMPLETED:
        assert len(started) == sum(len(parts(a)) for a in j.pipeline.actions)
