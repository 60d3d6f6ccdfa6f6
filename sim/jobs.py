"""``python -m sim jobs``: pipelines on a mesh with no head, under crashes
and partitions, driven by ``protocol.jobs`` (the daemon's own decisions).

The model: N nodes, each holding the job records it has heard of.  A record
a node writes reaches every other node after a random delay, unless a
partition separates them (then on the heal) or the receiver is down (then
when it is back: anti-entropy).  Every ``TICK_S`` each live node derives
every job's view from its records (``job_view``), starts the parts
``runnable`` gives it (a part "works" for a random time, writing ``running``
then ``completed`` or, now and then, ``failed``), and, for the jobs it
coordinates (``coordinator``), fails with ``NODE_UNAVAILABLE`` the parts whose
node stayed unreachable past the bound (``overdue_parts``).  A node's view
of who is reachable follows the truth after a detection delay.  Crashes hit
executors and coordinators alike; a restarted node keeps its own records
(its state file) and resumes its own ``running`` parts.

Invariants, checked at the end, after the faults and a quiet time:

- every job ends, and every live node derives the same status for it;
- no part that names a node runs on another node;
- no part runs to completion twice (health checks, run by whoever
  coordinates, may run on both sides of a partition: counted, not a violation,
  since they have no side effect).
"""

from __future__ import annotations

import heapq
import random
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from typing import Any

from protocol.jobs import (
    JobBook,
    JobRecord,
    JobStatus,
    PartStatus,
    StepRecord,
    coordinator,
    job_key,
    overdue_parts,
    parts,
    runnable,
    step_key,
)
from protocol.pipeline import parse_pipeline

__all__ = ["JobsOutcome", "JobsSpec", "draw_jobs", "run_jobs", "sweep_jobs"]

TICK_S = 0.1
DETECT_S = 2.0  # how long until a node sees a crash or a partition
NODE_WAIT_S = 6.0  # the bound before NODE_UNAVAILABLE
Key = tuple[str, str, int]  # job, action, part


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


@dataclass
class _Node:
    nid: str
    up: bool = True
    book: JobBook = field(default_factory=JobBook)  # the daemon's own index of job records
    versions: dict[tuple[str, str], int] = field(default_factory=dict)  # (writer, key) -> version held
    working: set[Key] = field(default_factory=set)
    epoch: int = 0  # bumped by a crash: work of an older epoch is void


def _random_pipeline(rng: random.Random, nodes: list[str], i: int) -> dict[str, Any]:
    n = rng.randint(1, 8)
    actions = []
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
    rng = random.Random(spec.seed)
    ids = [f"n{i}" for i in range(spec.nodes)]
    nodes = {nid: _Node(nid) for nid in ids}
    events: list[tuple[float, int, Any]] = []
    seq = 0
    version = 0
    now = 0.0
    side: dict[str, int] = dict.fromkeys(ids, 0)
    changed_at: dict[str, float] = dict.fromkeys(ids, 0.0)  # when a node's reachability last changed
    completions: dict[Key, int] = defaultdict(int)
    ran_on: list[tuple[Key, str, str | None]] = []
    out = JobsOutcome([])

    def at(t: float, fn: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, fn))

    def truly_reachable(a: str, b: str) -> bool:
        return nodes[b].up and side[a] == side[b]

    def seen_reachable(a: str, b: str) -> bool:
        """a's failure detector: the truth, DETECT_S late."""
        if a == b:
            return True
        truth = truly_reachable(a, b)
        return truth if now - changed_at[b] >= DETECT_S and now - changed_at[a] >= DETECT_S else not truth

    def deliver(to: str, key: str, writer: str, rec: tuple[int, Any]) -> None:
        n = nodes[to]
        if n.versions.get((writer, key), -1) < rec[0]:  # messages overtake each other; versions do not
            n.versions[(writer, key)] = rec[0]
            n.book.put(writer, key, rec[1])

    pending: list[tuple[str, str, str, tuple[int, Any]]] = []  # (to, key, writer, rec) blocked for now

    def publish(writer: str, key: str, value: Any) -> None:
        nonlocal version
        version += 1
        rec = (version, value)
        deliver(writer, key, writer, rec)
        for to in ids:
            if to != writer:
                send(to, key, writer, rec)

    def send(to: str, key: str, writer: str, rec: tuple[int, Any]) -> None:
        def arrive() -> None:
            if nodes[to].up and side[to] == side[writer]:
                deliver(to, key, writer, rec)
            else:  # anti-entropy brings it once they can talk (a down writer's records come from others too)
                pending.append((to, key, writer, rec))
        at(now + rng.uniform(0.01, 0.5), arrive)

    def retry_pending() -> None:
        nonlocal pending
        keep = []
        for item in pending:
            to, key, writer, rec = item
            # Any live node on the receiver's side that holds the record can pass it on.
            if nodes[to].up and any(nodes[h].up and side[h] == side[to]
                                    and nodes[h].versions.get((writer, key), -1) >= rec[0] for h in ids):
                deliver(to, key, writer, rec)
            else:
                keep.append(item)
        pending = keep

    def step(nid: str) -> None:
        n = nodes[nid]
        if not n.up:
            return
        live = [x for x in ids if seen_reachable(nid, x)]
        for v in n.book.views(lambda x: seen_reachable(nid, x)):
            if v.status not in (JobStatus.PENDING, JobStatus.RUNNING):
                continue
            job, jid = v.job, v.job.job_id
            coord = coordinator(job, lambda x: seen_reachable(nid, x), live) == nid
            for a, p in runnable(v, nid, coord):
                key = (jid, a.action_id, p.index)
                if key in n.working:
                    continue
                n.working.add(key)
                ran_on.append((key, nid, p.node))
                out.parts_run += 1
                publish(nid, step_key(*key), StepRecord(PartStatus.RUNNING, nid, 1, int(now * 1000)).to_value())
                epoch = n.epoch

                def finish(key: Key = key, epoch: int = epoch, health: bool = p.node is None) -> None:
                    if not n.up or n.epoch != epoch:
                        return  # crashed meanwhile: its own running record stays, the restart resumes it
                    n.working.discard(key)
                    bad = rng.random() < spec.fail_rate
                    rec = StepRecord(PartStatus.FAILED if bad else PartStatus.COMPLETED, nid, 1,
                                     int(now * 1000), int(now * 1000), "BOOM" if bad else "")
                    if not bad:
                        completions[key] += 1
                        if health and completions[key] > 1:
                            out.health_checks_twice += 1
                    publish(nid, step_key(*key), rec.to_value())
                at(now + rng.uniform(0.2, 3.0), finish)
            if coord:
                for a, p in overdue_parts(v, lambda x: None if seen_reachable(nid, x) else int(changed_at[x] * 1000),
                                          int(now * 1000), int(NODE_WAIT_S * 1000)):
                    key = (jid, a.action_id, p.index)
                    if (nid, step_key(*key)) in n.versions:
                        continue
                    publish(nid, step_key(*key), StepRecord(PartStatus.FAILED, nid, 0, int(now * 1000),
                                                            int(now * 1000), "NODE_UNAVAILABLE").to_value())

    # -- the schedule -------------------------------------------------------------------
    fault_end = spec.duration_s - spec.quiet_s
    for i in range(spec.jobs):
        def submit(i: int = i) -> None:
            live = [x for x in ids if nodes[x].up]
            if not live:
                return
            who = rng.choice(live)
            pipe = parse_pipeline(_random_pipeline(rng, ids, i))
            job = JobRecord(f"j{i}", pipe, who, int(now * 1000))
            publish(who, job_key(job.job_id), job.to_value())
        at(rng.uniform(0.5, fault_end * 0.6), submit)
    victims = rng.sample(ids, spec.crashes)
    for k, nid in enumerate(victims):
        t = rng.uniform(2.0, fault_end - 10.0)

        def crash(nid: str = nid) -> None:
            n = nodes[nid]
            n.up = False
            n.epoch += 1
            n.working.clear()
            changed_at[nid] = now
        at(t, crash)
        if k < spec.restarts:
            def restart(nid: str = nid) -> None:
                nodes[nid].up = True
                changed_at[nid] = now
            at(t + rng.uniform(3.0, 15.0), restart)
    if spec.partition is not None:
        t1, t2 = spec.partition
        t2 = min(t2, fault_end)

        def split() -> None:
            for x in ids:
                side[x] = rng.randrange(2)
                changed_at[x] = now
        def heal() -> None:
            for x in ids:
                side[x] = 0
                changed_at[x] = now
        at(t1, split)
        at(t2, heal)

    t = 0.0
    while t < spec.duration_s:
        t += TICK_S
        while events and events[0][0] <= t:
            now, _, fn = heapq.heappop(events)
            fn()
        now = t
        retry_pending()
        for nid in ids:
            step(nid)

    # -- invariants ------------------------------------------------------------------------
    v = out.violations
    live_nodes = [x for x in ids if nodes[x].up]
    for key, runner, allowed in ran_on:
        if allowed is not None and runner != allowed:
            v.append(f"part {key} of node {allowed} ran on {runner}")
    for key, count in completions.items():
        if count > 1 and _part_node(nodes, key) is not None:
            v.append(f"part {key} ran to completion {count} times")
    all_jobs = {jid for x in live_nodes for jid in nodes[x].book.jobs}
    for jid in sorted(all_jobs):
        statuses = set()
        for x in live_nodes:
            view = nodes[x].book.view(jid, partial(seen_reachable, x))
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
    return out


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
