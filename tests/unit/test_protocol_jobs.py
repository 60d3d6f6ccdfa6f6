"""Jobs: the state every node derives from the records, and what each node starts."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.jobs import (
    BACKOFF_MAX_S,
    RETRYABLE,
    ActionStatus,
    CancelRecord,
    CopyPlan,
    JobRecord,
    JobStatus,
    JobView,
    Part,
    PartKey,
    PartStatus,
    RecordError,
    Retry,
    StepKind,
    StepRecord,
    TickBounds,
    TickPlan,
    coordinator,
    copy_plan,
    gpu_load,
    job_view,
    next_attempt,
    overdue_parts,
    parse_step_key,
    parts,
    plan_tick,
    runnable,
    step_key,
    step_kind,
)
from protocol.pipeline import ACTION_TYPES, PipelineStep, StepDevice, parse_pipeline
from protocol.placement import GpuFacts, NoPlacement, PlacementFacts, place, rank

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


def test_a_bad_field_of_a_job_record_is_named() -> None:
    """The job records read their fields with ``protocol.records``' checks: a
    bad field is one ``RecordError`` that names it."""
    step = StepRecord(PartStatus.RUNNING, "n1", note="n").to_value()
    j = job(copy("a", "n1:disk", "n2:disk")).to_value()
    cases: list[tuple[Callable[[Any], object], Any, str]] = [
        (StepRecord.from_value, {**step, "attempt": True}, "step attempt"),
        (StepRecord.from_value, {**step, "started_ms": 2**63}, "step started"),
        (StepRecord.from_value, {**step, "note": "x" * 2049}, "step note"),
        (StepRecord.from_value, {**step, "error_code": "E" * 65}, "step error code"),
        (StepRecord.from_value, {**step, "transfer_id": 7}, "step transfer id"),
        (StepRecord.from_value, {**step, "status": ["running"]}, "step status"),
        (StepRecord.from_value, ["not", "a", "map"], "step"),
        (JobRecord.from_value, {**j, "job_id": "j" * 65}, "job id"),
        (JobRecord.from_value, {**j, "submitted_ms": -1}, "job submitted_ms"),
        (CancelRecord.from_value, {"at_ms": "soon", "by": "n1"}, "cancel at_ms"),
    ]
    for read, raw, field in cases:
        try:
            read(raw)
        except RecordError as e:
            assert str(e).startswith(f"{field}:"), (field, str(e))
        else:
            raise AssertionError(f"{field}: {raw!r} was accepted")
    assert StepRecord.from_value({**step, "note": "x" * 2048}).note == "x" * 2048


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
    facts = [PlacementFacts("a", True, {"disk": 50 * gib}), PlacementFacts("b", True, {"disk": 90 * gib}),
             PlacementFacts("c", True, {"disk": 20 * gib}, holds=True), PlacementFacts("d", False, {"disk": 900 * gib}),
             PlacementFacts("e", True, {"disk": 1 * gib})]
    best, ranking = place("disk", 10 * gib, facts)
    assert [c.node_id for c in ranking][:3] == ["c", "b", "a"] and best.device == "c:disk"
    reasons = {c.node_id: c.reasons for c in ranking}
    assert reasons["d"] == ("not alive",) and "needs 10.0 GiB on disk" in reasons["e"][0]
    try:
        place("gpu", gib, facts)
        raise AssertionError("no GPU anywhere")
    except NoPlacement as e:
        assert e.code == "NO_CAPACITY" and all("no GPU" in c.reasons for c in e.ranking)
    g = rank("gpu", 10 * gib, [PlacementFacts("x", True, gpus=(GpuFacts(0, 8 * gib), GpuFacts(1, 24 * gib, 4 * gib)))])
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


# -- one node's tick: plan_tick, next_attempt, the step kinds ------------------------------------

OTHER_CODES = ("BOOM", "INVALID_REQUEST", "MODEL_NOT_AVAILABLE", "NO_CAPACITY", "INTERNAL")


def no_one_down(_n: str) -> int | None:
    return None


def plan(views: list[JobView], me: str, now_ms: int, running: Collection[PartKey] = (),
         waiting: Mapping[PartKey, Retry] | None = None, held: Collection[str] = ("j1",),
         reachable: Callable[[str], bool] = everyone, down: Callable[[str], int | None] = no_one_down,
         bounds: TickBounds | None = None) -> TickPlan:
    return plan_tick(views, me, now_ms, reachable=reachable, live=[n for n in NODES if reachable(n)],
                     running=running, waiting=waiting or {}, holds_job=held.__contains__, down_since_ms=down,
                     bounds=bounds or TickBounds())


@SETTINGS
@given(retries=st.integers(0, 10), backoff_s=st.floats(0, 3600), attempt=st.integers(1, 14),
       code=st.sampled_from(sorted(RETRYABLE) + list(OTHER_CODES)), failed_ms=st.integers(0, 2**50))
def test_next_attempt_waits_its_backoff_and_gives_up_in_bounds(retries: int, backoff_s: float, attempt: int,
                                                               code: str, failed_ms: int) -> None:
    a = parse_pipeline({"name": "p", "actions": [{**copy("a", "n1:disk", "n2:disk"), "retries": retries,
                                                  "backoff_s": backoff_s}]}).actions[0]
    r = next_attempt(a, attempt, code, failed_ms)
    if code not in RETRYABLE or attempt > retries:
        assert r is None
        return
    assert r is not None and r.attempt == attempt + 1 <= retries + 1
    wait_ms = min(backoff_s * 2 ** (attempt - 1), BACKOFF_MAX_S) * 1000
    assert wait_ms <= r.at_ms - failed_ms <= wait_ms + 1  # never before its backoff, and no later than the ms after
    assert r.at_ms - failed_ms <= BACKOFF_MAX_S * 1000


def test_next_attempt_doubles_the_wait_and_stops_after_the_retries() -> None:
    a = parse_pipeline({"name": "p", "actions": [{**copy("a", "n1:disk", "n2:disk"), "retries": 3,
                                                  "backoff_s": 2}]}).actions[0]
    chain, attempt, t = [], 1, 0
    while (r := next_attempt(a, attempt, "PEER_UNREACHABLE", t)) is not None:
        chain.append(r.at_ms - t)
        attempt, t = r.attempt, r.at_ms
    assert chain == [2000, 4000, 8000] and attempt == 4
    assert next_attempt(a, 1, "BOOM", 0) is None  # not retryable: the first failure is final


def test_plan_starts_my_ready_parts_once_by_priority_within_the_bound() -> None:
    low = job(copy("a", "n1:disk", "n2:disk"), copy("b", "n1:disk", "n2:dram"))
    high = JobRecord("j2", dataclasses.replace(low.pipeline, priority=5), "n1", 1000)
    views = [job_view(low, {}, None, everyone), job_view(high, {}, None, everyone)]
    p = plan(views, "n2", 2000, held=("j1", "j2"))
    assert [s.key for s in p.starts] == [("j2", "a", 0), ("j2", "b", 0), ("j1", "a", 0), ("j1", "b", 0)]
    assert all(s.attempt == 1 for s in p.starts) and plan(views, "n3", 2000).starts == ()
    p = plan(views, "n2", 2000, running={("j2", "a", 0)}, held=("j1", "j2"), bounds=TickBounds(parallel_max=3))
    assert [s.key for s in p.starts] == [("j2", "b", 0), ("j1", "a", 0)]  # what runs is not started again
    assert plan(views, "n2", 2000, running={("j9", "x", 0)}, bounds=TickBounds(parallel_max=1)).starts == ()


def test_plan_retries_a_part_only_once_its_backoff_is_over() -> None:
    j = job(copy("a", "n1:disk", "n2:disk"))
    v = job_view(j, {("a", 0): [StepRecord(PartStatus.RUNNING, "n2", attempt=1, started_ms=5)]}, None, everyone)
    waiting = {("j1", "a", 0): Retry(2, 7000)}
    assert plan([v], "n2", 6999, waiting=waiting).starts == ()
    (s,) = plan([v], "n2", 7000, waiting=waiting).starts
    assert s.key == ("j1", "a", 0) and s.attempt == 2
    # Another record ended the part meanwhile (a verdict): the retry is dropped, nothing starts.
    verdict = StepRecord(PartStatus.FAILED, "n1", finished_ms=6000, error_code="NODE_UNAVAILABLE")
    v = job_view(j, {("a", 0): [StepRecord(PartStatus.RUNNING, "n2"), verdict]}, None, everyone)
    p = plan([v], "n2", 7000, waiting=waiting)
    assert p.starts == () and p.abandon == (("j1", "a", 0),)


def test_plan_cancels_judges_republishes_and_forgets() -> None:
    j = job(copy("a", "n1:disk", "n2:disk"), copy("b", "n1:disk", "n3:disk"))
    running = StepRecord(PartStatus.RUNNING, "n2", started_ms=3)
    on_n3 = StepRecord(PartStatus.RUNNING, "n3", started_ms=4)
    v = job_view(j, {("a", 0): [running], ("b", 0): [on_n3]}, CancelRecord(10, "n1"), lambda n: n != "n3")
    p = plan([v], "n2", 20, running={("j1", "a", 0)}, waiting={("j1", "b", 9): Retry(2, 0)},
             reachable=lambda n: n != "n3")
    assert p.cancel == (("j1", "a", 0), ("j1", "b", 9)) and p.starts == () and p.verdicts == ()
    p = plan([v], "n1", 20, reachable=lambda n: n != "n3")  # the coordinator cancels what runs on unreachable n3
    assert [(d.action.action_id, d.status) for d in p.verdicts] == [("b", PartStatus.CANCELLED)]
    # n1 (the writer) is gone: n2 coordinates, re-publishes the job, and fails n1's overdue part.
    j2 = job(copy("a", "n2:disk", "n1:disk"))
    v = job_view(j2, {}, None, lambda n: n != "n1")
    down = {"n1": 0}.get
    p = plan([v], "n2", 60_999, held=(), reachable=lambda n: n != "n1", down=down)  # ready at 1000: 60 s to wait
    assert p.republish == (j2,) and p.verdicts == ()
    assert plan([v], "n2", 60_999, held=("j1",), reachable=lambda n: n != "n1", down=down).republish == ()
    (d,) = plan([v], "n2", 61_000, held=(), reachable=lambda n: n != "n1", down=down).verdicts
    assert (d.status, d.code, d.part.node) == (PartStatus.FAILED, "NODE_UNAVAILABLE", "n1")
    assert plan([v], "n3", 61_000, reachable=lambda n: n != "n1", down=down).verdicts == ()  # not its coordinator
    ended = job_view(j2, {("a", 0): [done("n1", 5000)]}, None, everyone)
    assert plan([ended], "n1", 5000).ended == (ended,)
    assert plan([ended], "n2", 5000 + 10).forget == ()
    assert plan([ended], "n2", 5000 + 11, bounds=TickBounds(keep_ms=10)).forget == ("j1",)
    assert plan([ended], "n2", 5000, bounds=TickBounds(kept_max=0)).forget == ("j1",)


@st.composite
def retrying_runs(draw: st.DrawFn) -> tuple[JobRecord, list[int], list[str], int]:
    n = draw(st.integers(1, 8))
    actions = []
    for i in range(n):
        deps = sorted({f"a{j}" for j in draw(st.lists(st.integers(0, i - 1), max_size=2))}) if i else []
        dsts = draw(st.lists(st.sampled_from(["n1:dram", "n2:disk", "n3:disk"]), min_size=1, max_size=2, unique=True))
        actions.append({**copy(f"a{i}", "n1:disk", *dsts, deps=tuple(deps)), "retries": draw(st.integers(0, 3)),
                        "backoff_s": draw(st.sampled_from([0, 0.5, 2]))})
    j = job(*actions, fail_fast=draw(st.booleans()))
    steps_ms = draw(st.lists(st.integers(100, 3000), min_size=50, max_size=50))
    outcomes = draw(st.lists(st.sampled_from(["ok", "ok", "UNAVAILABLE", "TIMEOUT", "BOOM"]), min_size=50,
                             max_size=50))
    return j, steps_ms, outcomes, draw(st.integers(1, 3))


@SETTINGS
@given(retrying_runs())
def test_nodes_running_plan_tick_end_every_job_within_bounds(case: tuple[JobRecord, list[int], list[str], int]) -> None:
    """Three nodes run ``plan_tick`` round after round on a clock, their parts
    failing now and then with retryable codes and retrying by ``next_attempt``:
    no node claims a part twice, nor one under way, nor a retry before its
    backoff, nor more than ``parallel_max`` at once, nor an attempt past the
    action's retries; and the job ends."""
    j, steps_ms, outcomes, parallel = case
    steps: Steps = defaultdict(list)
    running: dict[str, dict[PartKey, int]] = {n: {} for n in NODES}
    waiting: dict[str, dict[PartKey, Retry]] = {n: {} for n in NODES}
    bounds = TickBounds(parallel_max=parallel)
    now, draws = 2000, 0
    for turn in range(500):
        v = job_view(j, steps, None, everyone)
        if v.status not in (JobStatus.PENDING, JobStatus.RUNNING):
            break
        now += steps_ms[turn % len(steps_ms)]
        for node in NODES:
            v = job_view(j, steps, None, everyone)
            p = plan([v], node, now, running=running[node].keys(), waiting=waiting[node], bounds=bounds)
            keys = [s.key for s in p.starts]
            assert len(keys) == len(set(keys)) and not set(keys) & running[node].keys()
            assert len(running[node]) + len(keys) <= parallel
            for key in p.abandon:
                waiting[node].pop(key)
            for s in p.starts:
                assert s.part.node == node and s.attempt <= s.action.retries + 1
                retry = waiting[node].pop(s.key, None)
                assert s.attempt == (retry.attempt if retry else 1) and (retry is None or retry.at_ms <= now)
                running[node][s.key] = s.attempt
                steps[s.key[1:]].append(StepRecord(PartStatus.RUNNING, node, s.attempt, now))
        for node in NODES:  # every attempt under way ends this turn
            for key, attempt in sorted(running[node].items()):
                code = outcomes[draws % len(outcomes)]
                draws += 1
                if code == "ok":
                    steps[key[1:]].append(done(node, now))
                    continue
                r = next_attempt(j.pipeline.action(key[1]), attempt, code, now)
                if r is None:
                    steps[key[1:]].append(failed(node, now, code))
                else:
                    waiting[node][key] = r
            running[node].clear()
    else:
        raise AssertionError("the job did not end")
    for node in NODES:  # a retry whose action ended meanwhile (another target failed) is given up
        p = plan([job_view(j, steps, None, everyone)], node, now, waiting=waiting[node], bounds=bounds)
        assert p.starts == () and set(p.abandon) == set(waiting[node])


def test_every_action_type_has_a_step_kind_and_gpus_load_or_free() -> None:
    gpu = StepDevice("n2", "gpu1")
    for t in ACTION_TYPES:
        a = PipelineStep("a", t, "m", (StepDevice("n1", "disk"), StepDevice("n2", "disk")), ())
        assert step_kind(a, Part(0, "n2", StepDevice("n2", "disk"))).value == t
        a_gpu = dataclasses.replace(a, devices=(StepDevice("n1", "disk"), gpu))
        want = {"serve": StepKind.SERVE, "stop_serve": StepKind.STOP_SERVE, "delete": StepKind.FREE_GPU}
        assert step_kind(a_gpu, Part(0, "n2", gpu)) is want.get(t, StepKind.LOAD_GPU)
        assert step_kind(a, Part(0, None, None)).value == t


def test_a_move_to_several_targets_drops_its_source_from_the_last_one() -> None:
    one = parse_pipeline({"name": "p", "actions": [{**copy("a", "n1:disk", "n2:disk"), "action_type": "move"}]})
    (p,) = parts(one.actions[0])
    assert copy_plan(one.actions[0], p) == CopyPlan("n1:disk", "n2:disk", True, False)
    many = parse_pipeline({"name": "p", "actions": [{**copy("a", "n1:disk", "n2:disk", "n3:disk"),
                                                     "action_type": "move"}]}).actions[0]
    assert [(c.move, c.drop_source_last) for c in (copy_plan(many, q) for q in parts(many))] == [
        (False, False), (False, True)]
    kept = dataclasses.replace(many, keep_source=True)
    assert not any(copy_plan(kept, q).drop_source_last for q in parts(kept))
    plain = dataclasses.replace(many, action_type="copy")
    assert not any(copy_plan(plain, q).move or copy_plan(plain, q).drop_source_last for q in parts(plain))


@SETTINGS
@given(targets=st.lists(st.sampled_from(["n1:gpu0", "n1:gpu1", "n1:gpu2", "n2:gpu0", "n2:disk"]), min_size=1,
                        max_size=4, unique=True),
       need=st.integers(0, 2**40), dram=st.booleans(), move=st.booleans(), keep=st.booleans())
def test_a_gpu_load_shares_the_vram_among_this_nodes_gpus(targets: list[str], need: int, dram: bool,
                                                          move: bool, keep: bool) -> None:
    a = parse_pipeline({"name": "p", "actions": [{"action_id": "a", "action_type": "move" if move else "copy",
                                                  "model_name": "m", "devices": ["n3:disk", *targets],
                                                  "keep_source": keep and move}]}).actions[0]
    share = sum(1 for t in targets if t.startswith("n1:gpu"))
    for p in parts(a):
        if p.node != "n1" or p.device is None or p.device.tier != "gpu":
            continue
        g = gpu_load(a, p, "n1", need, ("disk", "dram") if dram else ("disk",))
        assert g.gpu == int(str(p.device)[-1]) and g.stage_device == ("n1:dram" if dram else "n1:disk")
        assert g.reserve_bytes * share >= need > (g.reserve_bytes - 1) * share  # its even share, rounded up
        last = p.index == len(targets) - 1
        assert g.drop_source == (move and not keep and last)
        assert g.wait_for_others == (g.drop_source and sum(t.split(":")[1].startswith("gpu") for t in targets) > 1)
