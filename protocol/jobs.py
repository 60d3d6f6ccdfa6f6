"""Jobs: a pipeline running on the mesh, with no head.

Theory of operation
-------------------
A job is three kinds of catalog records (``protocol.jobrecords``), each
written by the node that knows: the job (its placed pipeline), one step record
per part, and a cancel.  An action runs as one or more *parts*, each on one
node (``parts``): a download on its target; a copy or move once per target,
on the target; a delete once per device, on the device's node; a serve on its
GPUs' node; a health_check on the job's coordinator.  Nothing hands work out:
every node reads the records and starts the parts that are its own once the
action's dependencies are completed (``runnable``), and writes how they go.
So every node derives the same state from the same records (``job_view``), any
node can answer for any job, and a dead node loses nothing that others hold.

The coordinator (``coordinator``) is the node that took the job while it is
alive, else the live node with the smallest id: it runs health checks,
re-publishes the job record if its writer is dead (so it outlives the reap of
dead nodes' keys), and fails a part whose node has been unreachable for longer
than the bound.  Two nodes can both believe they coordinate only while their
views of who is alive differ (a partition), and what they do is idempotent:
a health check has no side effect, a verdict is the same record.

One node's job loop is ``plan_tick``: from every job's view, the clock and what
the node is running, it answers what to start (with the attempt, after the
backoff of ``next_attempt``), cancel, judge, re-publish and forget.  The daemon
(``meshnode.jobs``) carries that answer out, each part through the step runner
of its ``step_kind``; the simulator (``sim.jobs``) runs the same ``plan_tick``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from .jobrecords import (
    CANCEL_PREFIX,
    JOB_PREFIX,
    STEP_PREFIX,
    CancelRecord,
    JobRecord,
    PartStatus,
    StepRecord,
    cancel_key,
    job_key,
    merge_part,
    parse_step_key,
    step_key,
)
from .pipeline import Pipeline, PipelineStep, StepDevice
from .records import RecordError

__all__ = [
    "BACKOFF_MAX_S",
    "CANCEL_PREFIX",
    "JOB_PREFIX",
    "PARALLEL_MAX",
    "RETRYABLE",
    "STEP_PREFIX",
    "ActionStatus",
    "ActionView",
    "CancelRecord",
    "CopyPlan",
    "GpuLoad",
    "JobRecord",
    "JobStatus",
    "JobView",
    "Part",
    "PartKey",
    "PartStatus",
    "RecordError",
    "Retry",
    "Start",
    "StepKind",
    "StepRecord",
    "TickBounds",
    "TickPlan",
    "Verdict",
    "cancel_key",
    "coordinator",
    "copy_plan",
    "gpu_index",
    "gpu_load",
    "job_key",
    "job_view",
    "merge_part",
    "next_attempt",
    "overdue_parts",
    "parse_step_key",
    "parts",
    "plan_tick",
    "runnable",
    "step_key",
    "step_kind",
]

# -- parts ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Part:
    index: int
    node: str | None  # None: the job's coordinator runs it (a health check)
    device: StepDevice | None


def parts(a: PipelineStep) -> list[Part]:
    """Where an action runs, one part per node-side unit of work."""
    t = a.action_type
    if t == "download":
        return [Part(0, a.devices[0].node, a.devices[0])]
    if t in ("copy", "move"):
        return [Part(i, d.node, d) for i, d in enumerate(a.devices[1:])]
    if t == "delete":
        return [Part(i, d.node, d) for i, d in enumerate(a.devices)]
    if t == "serve":
        return [Part(0, a.devices[0].node if a.devices else None, a.devices[0] if a.devices else None)]
    if t == "stop_serve":
        nodes = sorted({d.node for d in a.devices if d.node is not None})
        return [Part(i, n, None) for i, n in enumerate(nodes)] or [Part(0, None, None)]
    return [Part(0, None, None)]  # health_check


# -- the derived view -------------------------------------------------------------------


class ActionStatus(enum.Enum):
    PENDING = "pending"
    WAITING_NODE = "waiting_node"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UPSTREAM_FAILED = "upstream_failed"

    @property
    def final(self) -> bool:
        return self in (ActionStatus.COMPLETED, ActionStatus.FAILED, ActionStatus.CANCELLED,
                        ActionStatus.UPSTREAM_FAILED)


class JobStatus(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(slots=True)
class ActionView:
    action: PipelineStep
    status: ActionStatus
    parts: dict[int, StepRecord | None]
    ready_ms: int | None = None  # when its dependencies were all completed
    error: tuple[str, str] | None = None

    @property
    def started_ms(self) -> int:
        return min((r.started_ms for r in self.parts.values() if r and r.started_ms), default=0)

    @property
    def finished_ms(self) -> int:
        if not self.status.final:
            return 0
        return max((r.finished_ms for r in self.parts.values() if r), default=0)


@dataclass(slots=True)
class JobView:
    job: JobRecord
    status: JobStatus
    actions: dict[str, ActionView] = field(default_factory=dict)
    cancelled: CancelRecord | None = None
    first_error: tuple[str, str, str] | None = None  # (action id, code, message)

    @property
    def finished_ms(self) -> int:
        if self.status in (JobStatus.PENDING, JobStatus.RUNNING):
            return 0
        return max([v.finished_ms for v in self.actions.values()] + [self.cancelled.at_ms if self.cancelled else 0])


def _order(pipe: Pipeline) -> list[PipelineStep]:
    """Dependencies first (the pipeline is acyclic: ``parse_pipeline`` checked)."""
    done: set[str] = set()
    out: list[PipelineStep] = []
    pending = list(pipe.actions)
    while pending:
        rest = []
        for a in pending:
            if all(d in done for d in a.dependencies):
                out.append(a)
                done.add(a.action_id)
            else:
                rest.append(a)
        if len(rest) == len(pending):  # unreachable for a parsed pipeline; never loop
            out.extend(rest)
            break
        pending = rest
    return out


def job_view(job: JobRecord, steps: Mapping[tuple[str, int], Iterable[StepRecord]], cancel: CancelRecord | None,
             reachable: Callable[[str], bool]) -> JobView:
    """Every action's status and the job's, from the records alone."""
    view = JobView(job, JobStatus.PENDING, cancelled=cancel)
    failed_any = False
    for a in _order(job.pipeline):
        recs = {p.index: merge_part(steps.get((a.action_id, p.index), ())) for p in parts(a)}
        av = ActionView(a, ActionStatus.PENDING, recs)
        view.actions[a.action_id] = av
        deps = [view.actions[d] for d in a.dependencies if d in view.actions]
        statuses = [r.status if r else None for r in recs.values()]
        if statuses and all(s is PartStatus.COMPLETED for s in statuses):
            av.status = ActionStatus.COMPLETED
        elif PartStatus.FAILED in statuses:
            av.status = ActionStatus.FAILED
            bad = min((r for r in recs.values() if r and r.status is PartStatus.FAILED), key=lambda r: r.finished_ms)
            av.error = (bad.error_code or "FAILED", bad.error_message)
        elif PartStatus.RUNNING in statuses:
            running_on = [r.node for r in recs.values() if r and r.status is PartStatus.RUNNING]
            av.status = ActionStatus.RUNNING if any(reachable(n) for n in running_on) else ActionStatus.WAITING_NODE
        elif PartStatus.CANCELLED in statuses:
            av.status = ActionStatus.CANCELLED
        elif any(d.status in (ActionStatus.FAILED, ActionStatus.UPSTREAM_FAILED) for d in deps):
            av.status = ActionStatus.UPSTREAM_FAILED
        elif any(d.status is ActionStatus.CANCELLED for d in deps):
            av.status = ActionStatus.CANCELLED
        elif all(d.status is ActionStatus.COMPLETED for d in deps):
            av.ready_ms = max([d.finished_ms for d in deps], default=job.submitted_ms)
            if cancel is not None or (failed_any and job.pipeline.fail_fast):
                av.status = ActionStatus.CANCELLED
            elif any(p.node is not None and not reachable(p.node) for p in parts(a) if recs[p.index] is None):
                av.status = ActionStatus.WAITING_NODE
        failed_any = failed_any or av.status is ActionStatus.FAILED
    failed = [av for av in view.actions.values() if av.status is ActionStatus.FAILED and av.error]
    if failed:
        first = min(failed, key=lambda av: av.finished_ms)
        assert first.error is not None
        view.first_error = (first.action.action_id, *first.error)
    states = [av.status for av in view.actions.values()]
    if all(s.final for s in states):
        if any(s in (ActionStatus.FAILED, ActionStatus.UPSTREAM_FAILED) for s in states):
            view.status = JobStatus.FAILED
        elif any(s is ActionStatus.CANCELLED for s in states):
            view.status = JobStatus.CANCELLED
        else:
            view.status = JobStatus.COMPLETED
    elif any(s is not ActionStatus.PENDING for s in states):
        view.status = JobStatus.RUNNING
    return view


# -- decisions --------------------------------------------------------------------------


def coordinator(job: JobRecord, alive: Callable[[str], bool], live_ids: Iterable[str]) -> str | None:
    """Who coordinates ``job``: its submitter while alive, else the smallest live id."""
    if alive(job.submitted_by):
        return job.submitted_by
    return min(live_ids, default=None)


def runnable(view: JobView, me: str, coordinating: bool) -> list[tuple[PipelineStep, Part]]:
    """The parts ``me`` should start now: its own, of actions whose dependencies
    are completed, that no record shows started anywhere (a part whose record is
    ``me``'s own ``running`` from before a restart is the caller's to resume)."""
    if view.status not in (JobStatus.PENDING, JobStatus.RUNNING) or view.cancelled is not None:
        return []
    out = []
    for av in view.actions.values():
        if av.status not in (ActionStatus.PENDING, ActionStatus.RUNNING, ActionStatus.WAITING_NODE):
            continue
        if not all(view.actions[d].status is ActionStatus.COMPLETED for d in av.action.dependencies):
            continue
        for p in parts(av.action):
            mine = p.node == me or (p.node is None and coordinating)
            rec = av.parts.get(p.index)
            if mine and (rec is None or (rec.status is PartStatus.RUNNING and rec.node == me)):
                out.append((av.action, p))
    return out


def overdue_parts(view: JobView, unreachable_since_ms: Callable[[str], int | None], now_ms: int,
                  bound_ms: int) -> list[tuple[PipelineStep, Part]]:
    """For the coordinator: parts whose node has been unreachable for longer than
    ``bound_ms`` while the part was due (ready, or running there): they fail with
    ``NODE_UNAVAILABLE``."""
    out = []
    for av in view.actions.values():
        if av.status is not ActionStatus.WAITING_NODE:
            continue
        for p in parts(av.action):
            rec = av.parts.get(p.index)
            node = rec.node if rec is not None else p.node
            if node is None or (rec is not None and rec.status.final):
                continue
            since = unreachable_since_ms(node)
            if since is None:
                continue
            due = max(since, av.ready_ms or 0, rec.started_ms if rec else 0)
            if now_ms - due >= bound_ms:
                out.append((av.action, p))
    return out


# -- one node's tick ------------------------------------------------------------------------

PartKey = tuple[str, str, int]  # (job id, action id, part index)

PARALLEL_MAX = 32  # parts one node runs at once
BACKOFF_MAX_S = 3600.0  # the longest wait between two attempts of a part
# Failures worth another attempt (when the action allows retries): the mesh or the network, not the request.
RETRYABLE = frozenset({"NODE_UNAVAILABLE", "PEER_UNREACHABLE", "PEER_ERROR", "NO_SOURCE", "UNAVAILABLE",
                       "TIMEOUT", "INTERRUPTED", "UNHEALTHY", "IO_ERROR"})


@dataclass(frozen=True, slots=True)
class Retry:
    """A part's next attempt, and the earliest time it may start."""

    attempt: int
    at_ms: int


def next_attempt(a: PipelineStep, attempt: int, code: str, failed_ms: int) -> Retry | None:
    """The retry policy: after attempt ``attempt`` of a part of ``a`` failed with
    ``code`` at ``failed_ms``, the next attempt, or None to give up (the code is
    not retryable, or the action's ``retries`` are spent).  The wait doubles from
    ``backoff_s`` on each attempt, up to ``BACKOFF_MAX_S``."""
    if code not in RETRYABLE or attempt > a.retries:
        return None
    delay_s = min(a.backoff_s * 2 ** (attempt - 1), BACKOFF_MAX_S)
    return Retry(attempt + 1, failed_ms + math.ceil(delay_s * 1000))


@dataclass(frozen=True, slots=True)
class TickBounds:
    parallel_max: int = PARALLEL_MAX
    node_wait_ms: int = 60_000  # a part whose node is unreachable this long fails NODE_UNAVAILABLE
    keep_ms: int = 24 * 3600 * 1000  # ended jobs are forgotten after this
    kept_max: int = 1024  # and past this many, oldest first


@dataclass(frozen=True, slots=True)
class Start:
    """Run attempt ``attempt`` of one of this node's parts."""

    job: JobRecord
    action: PipelineStep
    part: Part
    attempt: int

    @property
    def key(self) -> PartKey:
        return self.job.job_id, self.action.action_id, self.part.index


@dataclass(frozen=True, slots=True)
class Verdict:
    """The coordinator ends a part that its node cannot: ``NODE_UNAVAILABLE``, or cancelled."""

    job_id: str
    action: PipelineStep
    part: Part
    status: PartStatus
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class TickPlan:
    starts: tuple[Start, ...] = ()  # this node's parts to start now, higher priority first
    cancel: tuple[PartKey, ...] = ()  # this node's parts (running or waiting to retry) of cancelled jobs
    abandon: tuple[PartKey, ...] = ()  # retries no longer due: another record ended the part, or its job went
    verdicts: tuple[Verdict, ...] = ()
    republish: tuple[JobRecord, ...] = ()  # jobs this node coordinates whose writer is gone
    ended: tuple[JobView, ...] = ()  # jobs this node coordinates that have ended
    forget: tuple[str, ...] = ()  # jobs whose records this node drops


def _verdicts(v: JobView, down_since_ms: Callable[[str], int | None], now_ms: int,
              node_wait_ms: int) -> list[Verdict]:
    """The coordinator's verdicts for one job: its unreachable nodes' parts cancelled
    with the job, or failed once overdue."""
    jid = v.job.job_id
    out = []
    if v.cancelled is not None:
        for av in v.actions.values():
            if av.status is ActionStatus.WAITING_NODE:
                for p in parts(av.action):
                    rec = av.parts.get(p.index)
                    if rec is None or not rec.status.final:
                        out.append(Verdict(jid, av.action, p, PartStatus.CANCELLED, "", "the job was cancelled"))
        return out
    for a, p in overdue_parts(v, down_since_ms, now_ms, node_wait_ms):
        out.append(Verdict(jid, a, p, PartStatus.FAILED, "NODE_UNAVAILABLE",
                           f"node {p.node or '?'} was unreachable for over {node_wait_ms / 1000:g} s"))
    return out


def plan_tick(views: Iterable[JobView], me: str, now_ms: int, *, reachable: Callable[[str], bool],
              live: Collection[str], running: Collection[PartKey], waiting: Mapping[PartKey, Retry],
              holds_job: Callable[[str], bool], down_since_ms: Callable[[str], int | None],
              bounds: TickBounds = TickBounds()) -> TickPlan:
    """What node ``me``'s job loop does now, from every job's view.

    ``running``: its parts under way; ``waiting``: its parts between two attempts
    (``next_attempt``); ``holds_job``: whether it holds a job record of that job
    itself; ``down_since_ms``: since when a node is unreachable (None: reachable).
    A part starts when it is ``runnable`` for ``me``, not under way, and, between
    attempts, not before its retry is due; at most ``parallel_max`` run at once."""
    views = list(views)
    starts: list[tuple[int, Start]] = []
    cancel: list[PartKey] = []
    verdicts: list[Verdict] = []
    republish: list[JobRecord] = []
    ended: list[JobView] = []
    due: set[PartKey] = set()
    for v in views:
        jid = v.job.job_id
        coord = coordinator(v.job, reachable, live) == me
        if v.cancelled is not None:
            cancel.extend(k for k in (*running, *waiting) if k[0] == jid)
        if coord:
            if v.status not in (JobStatus.PENDING, JobStatus.RUNNING):
                ended.append(v)
            if not holds_job(jid) and not reachable(v.job.submitted_by):
                republish.append(v.job)  # outlives the reap of its dead writer's keys
            verdicts.extend(_verdicts(v, down_since_ms, now_ms, bounds.node_wait_ms))
        for a, p in runnable(v, me, coord):
            key = (jid, a.action_id, p.index)
            due.add(key)
            retry = waiting.get(key)
            if key in running or (retry is not None and retry.at_ms > now_ms):
                continue
            starts.append((v.job.pipeline.priority, Start(v.job, a, p, retry.attempt if retry else 1)))
    starts.sort(key=lambda s: -s[0])
    room = max(bounds.parallel_max - len(running), 0)
    gone = tuple(k for k in waiting if k not in due and k not in cancel)
    return TickPlan(tuple(s for _, s in starts[:room]), tuple(dict.fromkeys(cancel)), gone, tuple(verdicts),
                    tuple(republish), tuple(ended), tuple(_to_forget(views, now_ms, bounds)))


def _to_forget(views: list[JobView], now_ms: int, bounds: TickBounds) -> list[str]:
    """Jobs that ended more than ``keep_ms`` ago, and the oldest ended past ``kept_max``."""
    ended = sorted((v.finished_ms, v.job.job_id) for v in views if v.status not in (JobStatus.PENDING, JobStatus.RUNNING))
    over = max(len(ended) - bounds.kept_max, 0)
    return [jid for i, (fin, jid) in enumerate(ended) if i < over or now_ms - fin > bounds.keep_ms]


# -- how one part runs ------------------------------------------------------------------------


class StepKind(enum.Enum):
    """Which step runner does a part's work: the action's type, but a copy, move
    or download to ``node:gpuN`` loads the model for that GPU and a delete of
    ``node:gpuN`` frees it."""

    DOWNLOAD = "download"
    COPY = "copy"
    MOVE = "move"
    SERVE = "serve"
    STOP_SERVE = "stop_serve"
    DELETE = "delete"
    HEALTH_CHECK = "health_check"
    LOAD_GPU = "load_gpu"
    FREE_GPU = "free_gpu"


def step_kind(a: PipelineStep, p: Part) -> StepKind:
    kind = StepKind(a.action_type)
    if kind in (StepKind.SERVE, StepKind.STOP_SERVE) or p.device is None or p.device.tier != "gpu":
        return kind
    return StepKind.FREE_GPU if kind is StepKind.DELETE else StepKind.LOAD_GPU


@dataclass(frozen=True, slots=True)
class CopyPlan:
    source: str
    target: str
    move: bool  # the transfer itself drops the source (a move to one target)
    drop_source_last: bool  # this part drops the source once every other target has its copy


def copy_plan(a: PipelineStep, p: Part) -> CopyPlan:
    """A copy or move part: one target of several.  A move to one target is the
    transfer's own (copy, then drop the source); to several, every target copies
    and the last one drops the source after the others."""
    assert p.device is not None
    drop = a.action_type == "move" and not a.keep_source
    one = len(a.devices) == 2
    return CopyPlan(str(a.devices[0]), str(p.device), drop and one,
                    drop and not one and p.index == len(a.devices) - 2)


@dataclass(frozen=True, slots=True)
class GpuLoad:
    gpu: int
    reserve_bytes: int  # VRAM held on ``gpu`` until a serve there takes it
    stage_device: str  # where the weights are staged: this node's fastest tier
    drop_source: bool  # a move: this part drops the source
    wait_for_others: bool  # ... once the other targets have their copy


def gpu_index(device: StepDevice) -> int:
    return int(device.kind[3:]) if device.kind[3:].isdigit() else 0


def gpu_load(a: PipelineStep, p: Part, me: str, need_bytes: int, tiers: Collection[str]) -> GpuLoad:
    """A copy or move to ``me:gpuN`` (``LOAD_GPU``): the model needs ``need_bytes``
    of VRAM (``placement.vram_needed``), shared evenly between the GPUs of this
    node the action targets; the weights are staged on ``dram`` when this node
    has it (``tiers``), else ``disk``."""
    assert p.device is not None
    share_of = sum(1 for d in a.devices[1:] if d.node == me and d.tier == "gpu")
    stage = f"{me}:{'dram' if 'dram' in tiers else 'disk'}"
    src = str(a.devices[0])
    gpu_targets = sum(1 for d in a.devices[1:] if d.tier == "gpu")
    drop = (a.action_type == "move" and not a.keep_source and src != stage and p.index == len(a.devices) - 2)
    return GpuLoad(gpu_index(p.device), -(-need_bytes // max(share_of, 1)), stage, drop, drop and gpu_targets > 1)
