"""``python -m sim jobs``: pipelines on a mesh with no head, under crashes
and partitions, driven by ``protocol.jobs`` (the daemon's own decisions).

The model: N nodes, each holding the job records it has heard of.  A record
a node writes reaches every other node after a random delay, unless a
partition separates them (then on the heal) or the receiver is down (then
when it is back: anti-entropy).  Every ``TICK_S`` each live node runs one
round of the daemon's job loop, ``plan_tick``, on the views it derives from
its records, and carries the answer out as the daemon does: it starts the
parts given (a part "works" for a random time, writing ``running`` then
``completed`` or, now and then, ``failed``; a retryable failure is tried
again after ``next_attempt``'s backoff), re-publishes the jobs it coordinates
whose writer is gone, and writes the coordinator's verdicts (``NODE_UNAVAILABLE``
for a part whose node stayed unreachable past the bound).  A node's view of
who is reachable follows the truth after a detection delay.  Crashes hit
executors and coordinators alike; a restarted node keeps its own records
(its state file) and resumes its own ``running`` parts.

Invariants, checked as it runs and at the end, after the faults and a quiet time:

- every job ends, and every live node derives the same status for it;
- no part that names a node runs on another node;
- no part runs to completion twice (health checks, run by whoever
  coordinates, may run on both sides of a partition: counted, not a violation,
  since they have no side effect);
- no retry starts before its backoff, and no part gets more attempts than
  its action's ``retries`` allow.
"""

from __future__ import annotations

import heapq
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from typing import Any

from protocol.jobbook import JobBook
from protocol.jobs import (
    PARALLEL_MAX,
    JobRecord,
    JobStatus,
    PartStatus,
    Retry,
    Start,
    StepRecord,
    TickBounds,
    job_key,
    next_attempt,
    parts,
    plan_tick,
    step_key,
)
from protocol.pipeline import PipelineStep, parse_pipeline

__all__ = ["JobsOutcome", "JobsSpec", "draw_jobs", "run_jobs", "sweep_jobs"]

TICK_S = 0.1
DETECT_S = 2.0  # how long until a node sees a crash or a partition
NODE_WAIT_S = 6.0  # the bound before NODE_UNAVAILABLE
Key = tuple[str, str, int]  # job, action, part
# The daemon's bounds, but a simulated node forgets no ended job: the invariants read every job at the end.
BOUNDS = TickBounds(PARALLEL_MAX, int(NODE_WAIT_S * 1000), keep_ms=2**62, kept_max=2**62)


@dataclass(frozen=True)
class JobsSpec:
    nodes: int
    seed: int
    jobs: int
    crashes: int
    restarts: int
    partition: tuple[float, float] | None
    fail_rate: float = 0.05
    duration_s: float = 120.0
    quiet_s: float = 40.0


@dataclass
class JobsOutcome:
    violations: list[str]
    parts_run: int = 0
    health_checks_twice: int = 0
    ended: int = 0
    completed: int = 0
    failed: int = 0
    node_unavailable: int = 0
    retries: int = 0
    republished: int = 0


@dataclass
class _Node:
    nid: str
    up: bool = True
    book: JobBook = field(default_factory=JobBook)  # the daemon's own index of job records
    versions: dict[tuple[str, str], int] = field(default_factory=dict)  # (writer, key) -> version held
    working: set[Key] = field(default_factory=set)
    waiting: dict[Key, Retry] = field(default_factory=dict)  # parts between two attempts (``next_attempt``)
    failed: dict[Key, StepRecord] = field(default_factory=dict)  # ... and the attempt that failed
    epoch: int = 0  # bumped by a crash: work of an older epoch is void


def _random_pipeline(rng: random.Random, nodes: list[str], i: int, retry_rng: random.Random) -> dict[str, Any]:
    n = rng.randint(1, 8)
    actions: list[dict[str, Any]] = []
    for k in range(n):
        deps = sorted({f"s{j}" for j in rng.sample(range(k), min(k, rng.randint(0, 2)))}) if k else []
        kind = rng.random()
        if kind < 0.15:
            actions.append({"action_id": f"s{k}", "action_type": "health_check", "target_url": "http://x/health",
                            "dependencies": deps})
        elif kind < 0.3:
            actions.append({"action_id": f"s{k}", "action_type": "delete", "model_name": "m",
                            "devices": [f"{rng.choice(nodes)}:disk"], "dependencies": deps})
        else:
            src, *dsts = rng.sample(nodes, min(len(nodes), rng.randint(2, 3)))
            actions.append({"action_id": f"s{k}", "action_type": "copy", "model_name": "m",
                            "devices": [f"{src}:disk", *[f"{d}:{rng.choice(['disk', 'dram'])}" for d in dsts]],
                            "dependencies": deps})
    for a in actions:  # some steps retry what fails retryably (``next_attempt``)
        a["retries"], a["backoff_s"] = retry_rng.choice((0, 0, 1, 2)), retry_rng.choice((0.2, 1.0))
    return {"name": f"job{i}", "actions": actions, "fail_fast": rng.random() < 0.7}


def draw_jobs(seed: int) -> JobsSpec:
    rng = random.Random(seed)
    n = rng.randint(3, 12)
    crashes = rng.randint(0, min(3, n - 2))
    t1 = rng.uniform(5.0, 40.0)
    return JobsSpec(nodes=n, seed=seed, jobs=rng.randint(1, 8), crashes=crashes,
                    restarts=rng.randint(0, crashes),
                    partition=(round(t1, 1), round(t1 + rng.uniform(3.0, 30.0), 1)) if rng.random() < 0.6 else None)


def run_jobs(spec: JobsSpec) -> JobsOutcome:
    return _Run(spec).run()


class _Run:
    """One seeded run: the virtual network and clock, the nodes' job loops, the faults."""

    def __init__(self, spec: JobsSpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.retry_rng = random.Random(spec.seed + 0x5EED)  # retries and failure codes: apart from the rest's draws
        self.ids = [f"n{i}" for i in range(spec.nodes)]
        self.nodes = {nid: _Node(nid) for nid in self.ids}
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = 0
        self.version = 0
        self.now = 0.0
        self.side: dict[str, int] = dict.fromkeys(self.ids, 0)
        self.changed_at: dict[str, float] = dict.fromkeys(self.ids, 0.0)  # when reachability last changed
        self.completions: dict[Key, int] = defaultdict(int)
        self.ran_on: list[tuple[Key, str, str | None]] = []
        self.pending: list[tuple[str, str, str, tuple[int, Any]]] = []  # (to, key, writer, rec) blocked for now
        self.out = JobsOutcome([])

    def run(self) -> JobsOutcome:
        self._schedule()
        t = 0.0
        while t < self.spec.duration_s:
            t += TICK_S
            while self.events and self.events[0][0] <= t:
                self.now, _, fn = heapq.heappop(self.events)
                fn()
            self.now = t
            self._retry_pending()
            for nid in self.ids:
                self._step(nid)
        self._check()
        return self.out

    def _at(self, t: float, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, fn))

    # -- the network ------------------------------------------------------------------------

    def _seen_reachable(self, a: str, b: str) -> bool:
        """a's failure detector: the truth, DETECT_S late."""
        if a == b:
            return True
        truth = self.nodes[b].up and self.side[a] == self.side[b]
        late = self.now - self.changed_at[b] >= DETECT_S and self.now - self.changed_at[a] >= DETECT_S
        return truth if late else not truth

    def _deliver(self, to: str, key: str, writer: str, rec: tuple[int, Any]) -> None:
        n = self.nodes[to]
        if n.versions.get((writer, key), -1) < rec[0]:  # messages overtake each other; versions do not
            n.versions[(writer, key)] = rec[0]
            n.book.put(writer, key, rec[1])

    def _publish(self, writer: str, key: str, value: Any) -> None:
        self.version += 1
        rec = (self.version, value)
        self._deliver(writer, key, writer, rec)
        for to in self.ids:
            if to != writer:
                self._at(self.now + self.rng.uniform(0.01, 0.5), partial(self._arrive, to, key, writer, rec))

    def _arrive(self, to: str, key: str, writer: str, rec: tuple[int, Any]) -> None:
        if self.nodes[to].up and self.side[to] == self.side[writer]:
            self._deliver(to, key, writer, rec)
        else:  # anti-entropy brings it once they can talk (a down writer's records come from others too)
            self.pending.append((to, key, writer, rec))

    def _retry_pending(self) -> None:
        keep = []
        for item in self.pending:
            to, key, writer, rec = item
            # Any live node on the receiver's side that holds the record can pass it on.
            if self.nodes[to].up and any(self.nodes[h].up and self.side[h] == self.side[to]
                                         and self.nodes[h].versions.get((writer, key), -1) >= rec[0] for h in self.ids):
                self._deliver(to, key, writer, rec)
            else:
                keep.append(item)
        self.pending = keep

    # -- a node's job loop ----------------------------------------------------------------------

    def _step(self, nid: str) -> None:
        """One round of node ``nid``'s job loop: ``plan_tick``, as the daemon runs it."""
        n = self.nodes[nid]
        if not n.up:
            return
        now_ms = int(self.now * 1000)
        reach = partial(self._seen_reachable, nid)
        plan = plan_tick(n.book.views(reach), nid, now_ms, reachable=reach, live=[x for x in self.ids if reach(x)],
                         running=n.working, waiting=n.waiting, holds_job=lambda jid: nid in n.book.jobs.get(jid, {}),
                         down_since_ms=lambda x: None if reach(x) else int(self.changed_at[x] * 1000), bounds=BOUNDS)
        for key in plan.abandon:  # its action ended meanwhile: the failed attempt is the part's end
            n.waiting.pop(key)
            self._publish(nid, step_key(*key), n.failed.pop(key).to_value())
        for job in plan.republish:
            self._publish(nid, job_key(job.job_id), job.to_value())
            self.out.republished += 1
        for d in plan.verdicts:
            self._publish(nid, step_key(d.job_id, d.action.action_id, d.part.index),
                          StepRecord(d.status, nid, 0, now_ms, now_ms, d.code, d.message).to_value())
        for s in plan.starts:
            self._start(n, s, now_ms)

    def _start(self, n: _Node, s: Start, now_ms: int) -> None:
        key = s.key
        retry = n.waiting.pop(key, None)
        n.failed.pop(key, None)
        if retry is not None and retry.at_ms > now_ms:
            self.out.violations.append(f"part {key} retried at {now_ms} ms, before its backoff ({retry.at_ms} ms)")
        if s.attempt > s.action.retries + 1:
            self.out.violations.append(f"part {key}: attempt {s.attempt} of {s.action.retries + 1}")
        n.working.add(key)
        if retry is None:
            self.ran_on.append((key, n.nid, s.part.node))
            self.out.parts_run += 1
        else:
            self.out.retries += 1
        self._publish(n.nid, step_key(*key), StepRecord(PartStatus.RUNNING, n.nid, s.attempt, now_ms).to_value())
        self._at(self.now + self.rng.uniform(0.2, 3.0),
                 partial(self._finish, n, s.action, key, s.attempt, n.epoch, s.part.node is None))

    def _finish(self, n: _Node, action: PipelineStep, key: Key, attempt: int, epoch: int, health: bool) -> None:
        if not n.up or n.epoch != epoch:
            return  # crashed meanwhile: its own running record stays, the restart resumes it
        n.working.discard(key)
        now_ms = int(self.now * 1000)
        bad = self.rng.random() < self.spec.fail_rate
        code = self.retry_rng.choice(("UNAVAILABLE", "BOOM")) if bad else ""
        rec = StepRecord(PartStatus.FAILED if bad else PartStatus.COMPLETED, n.nid, attempt, now_ms, now_ms, code)
        retry = next_attempt(action, attempt, code, now_ms) if bad else None
        if retry is not None:
            n.waiting[key], n.failed[key] = retry, rec  # its record stays running, as the daemon's does
            return
        if not bad:
            self.completions[key] += 1
            if health and self.completions[key] > 1:
                self.out.health_checks_twice += 1
        self._publish(n.nid, step_key(*key), rec.to_value())

    # -- the schedule: jobs and faults --------------------------------------------------------------

    def _schedule(self) -> None:
        spec, rng = self.spec, self.rng
        fault_end = spec.duration_s - spec.quiet_s
        for i in range(spec.jobs):
            self._at(rng.uniform(0.5, fault_end * 0.6), partial(self._submit, i))
        victims = rng.sample(self.ids, spec.crashes)
        for k, nid in enumerate(victims):
            t = rng.uniform(2.0, fault_end - 10.0)
            self._at(t, partial(self._crash, nid))
            if k < spec.restarts:
                self._at(t + rng.uniform(3.0, 15.0), partial(self._restart, nid))
        if spec.partition is not None:
            t1, t2 = spec.partition
            self._at(t1, self._split)
            self._at(min(t2, fault_end), self._heal)

    def _submit(self, i: int) -> None:
        live = [x for x in self.ids if self.nodes[x].up]
        if not live:
            return
        who = self.rng.choice(live)
        pipe = parse_pipeline(_random_pipeline(self.rng, self.ids, i, self.retry_rng))
        job = JobRecord(f"j{i}", pipe, who, int(self.now * 1000))
        self._publish(who, job_key(job.job_id), job.to_value())

    def _crash(self, nid: str) -> None:
        n = self.nodes[nid]
        n.up = False
        n.epoch += 1
        n.working.clear()
        n.waiting.clear()
        n.failed.clear()
        self.changed_at[nid] = self.now

    def _restart(self, nid: str) -> None:
        self.nodes[nid].up = True
        self.changed_at[nid] = self.now

    def _split(self) -> None:
        for x in self.ids:
            self.side[x] = self.rng.randrange(2)
            self.changed_at[x] = self.now

    def _heal(self) -> None:
        for x in self.ids:
            self.side[x] = 0
            self.changed_at[x] = self.now

    # -- invariants ------------------------------------------------------------------------

    def _check(self) -> None:
        v, out, nodes = self.out.violations, self.out, self.nodes
        live_nodes = [x for x in self.ids if nodes[x].up]
        for key, runner, allowed in self.ran_on:
            if allowed is not None and runner != allowed:
                v.append(f"part {key} of node {allowed} ran on {runner}")
        for key, count in self.completions.items():
            if count > 1 and _part_node(nodes, key) is not None:
                v.append(f"part {key} ran to completion {count} times")
        all_jobs = {jid for x in live_nodes for jid in nodes[x].book.jobs}
        for jid in sorted(all_jobs):
            statuses = set()
            for x in live_nodes:
                view = nodes[x].book.view(jid, partial(self._seen_reachable, x))
                if view is None:
                    v.append(f"node {x} never heard of job {jid}")
                    continue
                statuses.add(view.status)
                if x == live_nodes[0] and view.first_error and view.first_error[1] == "NODE_UNAVAILABLE":
                    out.node_unavailable += 1
            if any(s in (JobStatus.PENDING, JobStatus.RUNNING) for s in statuses):
                v.append(f"job {jid} did not end: {sorted(s.value for s in statuses)}")
            elif len(statuses) > 1:
                v.append(f"job {jid}: live nodes disagree: {sorted(s.value for s in statuses)}")
            else:
                out.ended += 1
                out.completed += JobStatus.COMPLETED in statuses
                out.failed += JobStatus.FAILED in statuses


def _part_node(nodes: dict[str, _Node], key: Key) -> str | None:
    for n in nodes.values():
        recs = n.book.jobs.get(key[0])
        if recs:
            job = next(iter(recs.values()))
            for p in parts(job.pipeline.action(key[1])):
                if p.index == key[2]:
                    return p.node
    return None


def _one(seed: int) -> tuple[int, JobsOutcome]:
    return seed, run_jobs(draw_jobs(seed))


def sweep_jobs(seeds: range, processes: int = 0) -> dict[int, JobsOutcome]:
    with get_context("fork").Pool(processes or None) as pool:
        return dict(pool.imap_unordered(_one, seeds, chunksize=4))
