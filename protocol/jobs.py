"""Jobs: a pipeline running on the mesh, with no head.

Theory of operation
-------------------
A job is three kinds of catalog records, each written by the node that knows:

=====================================  ===============  ========================================
key                                    record           written by
=====================================  ===============  ========================================
``job/<job id>``                       ``JobRecord``    the node that took the pipeline (and,
                                                        once it is dead, the job's coordinator)
``step/<job id>/<action id>/<part>``   ``StepRecord``   the node that runs that part; the
                                                        coordinator, for a part whose node
                                                        stayed unreachable (``NODE_UNAVAILABLE``)
``jobcancel/<job id>``                 ``CancelRecord`` any node asked to cancel
=====================================  ===============  ========================================

An action runs as one or more *parts*, each on one node (``parts``): a
download on its target; a copy or move once per target, on the target; a
delete once per device, on the device's node; a serve on its GPUs' node; a
health_check on the job's coordinator.  Nothing hands work out: every node
reads the records and starts the parts that are its own once the action's
dependencies are completed (``runnable``), and writes how they go.  So every
node derives the same state from the same records (``job_view``), any node
can answer for any job, and a dead node loses nothing that others hold.

The coordinator (``coordinator``) is the node that took the job while it is
alive, else the live node with the smallest id: it runs health checks,
re-publishes the job record if its writer is dead (so it outlives the reap of
dead nodes' keys), and fails a part whose node has been unreachable for longer
than the bound.  Two nodes can both believe they coordinate only while their
views of who is alive differ (a partition), and what they do is idempotent:
a health check has no side effect, a verdict is the same record.

Merging a part's records from several writers: completed wins (the work is
done; steps are idempotent), then failed, then cancelled, then running.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .keys import JOB_PREFIX, RecordError
from .names import validate_node_id
from .pipeline import Action, InvalidPipeline, Pipeline, StepDevice, parse_pipeline

__all__ = [
    "CANCEL_PREFIX",
    "JOB_PREFIX",
    "STEP_PREFIX",
    "ActionStatus",
    "ActionView",
    "CancelRecord",
    "JobBook",
    "JobRecord",
    "JobStatus",
    "JobView",
    "Part",
    "PartStatus",
    "StepRecord",
    "cancel_key",
    "coordinator",
    "job_key",
    "job_view",
    "overdue_parts",
    "parse_step_key",
    "parts",
    "runnable",
    "step_key",
]

STEP_PREFIX = "step/"
CANCEL_PREFIX = "jobcancel/"


def job_key(job_id: str) -> str:
    return JOB_PREFIX + job_id


def step_key(job_id: str, action_id: str, part: int) -> str:
    return f"{STEP_PREFIX}{job_id}/{action_id}/{part}"


def cancel_key(job_id: str) -> str:
    return CANCEL_PREFIX + job_id


def parse_step_key(key: str) -> tuple[str, str, int] | None:
    if not key.startswith(STEP_PREFIX):
        return None
    bits = key[len(STEP_PREFIX):].split("/")
    if len(bits) != 3 or not bits[2].isdigit() or len(bits[2]) > 3:
        return None
    return bits[0], bits[1], int(bits[2])


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
        raise RecordError(f"{what}: expected a non-negative integer")
    return v


def _str(v: Any, what: str, limit: int = 2048) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise RecordError(f"{what}: expected a string of at most {limit} characters")
    return v


@dataclass(frozen=True, slots=True)
class JobRecord:
    job_id: str
    pipeline: Pipeline  # devices already placed: every part names its node (health checks aside)
    submitted_by: str
    submitted_ms: int

    def to_value(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "pipeline": self.pipeline.to_value(), "submitted_by": self.submitted_by,
                "submitted_ms": self.submitted_ms}

    @classmethod
    def from_value(cls, raw: Any) -> JobRecord:
        if not isinstance(raw, Mapping):
            raise RecordError("job: expected a mapping")
        try:
            pipe = parse_pipeline(raw.get("pipeline"))
            by = validate_node_id(raw.get("submitted_by"))
        except (InvalidPipeline, ValueError) as e:
            raise RecordError(f"job: {e}") from None
        return cls(_str(raw.get("job_id"), "job id", 64), pipe, by, _int(raw.get("submitted_ms"), "job submitted_ms"))


class PartStatus(enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self is not PartStatus.RUNNING


_PART_RANK = {PartStatus.COMPLETED: 3, PartStatus.FAILED: 2, PartStatus.CANCELLED: 1, PartStatus.RUNNING: 0}


@dataclass(frozen=True, slots=True)
class StepRecord:
    status: PartStatus
    node: str  # who ran it (or, for a verdict, who judged it)
    attempt: int = 1
    started_ms: int = 0
    finished_ms: int = 0
    error_code: str = ""
    error_message: str = ""
    note: str = ""
    transfer_id: str = ""
    bytes_done: int = 0
    bytes_total: int = 0

    def to_value(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status.value, "node": self.node, "attempt": self.attempt,
                               "started_ms": self.started_ms, "finished_ms": self.finished_ms}
        for k in ("error_code", "error_message", "note", "transfer_id"):
            if getattr(self, k):
                out[k] = getattr(self, k)
        if self.bytes_total:
            out["bytes_done"], out["bytes_total"] = self.bytes_done, self.bytes_total
        return out

    @classmethod
    def from_value(cls, raw: Any) -> StepRecord:
        if not isinstance(raw, Mapping):
            raise RecordError("step: expected a mapping")
        try:
            status = PartStatus(raw.get("status"))
            node = validate_node_id(raw.get("node"))
        except ValueError as e:
            raise RecordError(f"step: {e}") from None
        return cls(
            status, node, _int(raw.get("attempt", 1), "step attempt"), _int(raw.get("started_ms", 0), "step started"),
            _int(raw.get("finished_ms", 0), "step finished"), _str(raw.get("error_code", ""), "step error code", 64),
            _str(raw.get("error_message", ""), "step error"), _str(raw.get("note", ""), "step note"),
            _str(raw.get("transfer_id", ""), "step transfer id", 64), _int(raw.get("bytes_done", 0), "step bytes"),
            _int(raw.get("bytes_total", 0), "step bytes"),
        )


@dataclass(frozen=True, slots=True)
class CancelRecord:
    at_ms: int
    by: str

    def to_value(self) -> dict[str, Any]:
        return {"at_ms": self.at_ms, "by": self.by}

    @classmethod
    def from_value(cls, raw: Any) -> CancelRecord:
        if not isinstance(raw, Mapping):
            raise RecordError("cancel: expected a mapping")
        try:
            by = validate_node_id(raw.get("by"))
        except ValueError as e:
            raise RecordError(f"cancel: {e}") from None
        return cls(_int(raw.get("at_ms"), "cancel at_ms"), by)


# -- parts ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Part:
    index: int
    node: str | None  # None: the job's coordinator runs it (a health check)
    device: StepDevice | None


def parts(a: Action) -> list[Part]:
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
    action: Action
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


def merge_part(records: Iterable[StepRecord]) -> StepRecord | None:
    best: StepRecord | None = None
    for r in records:
        if best is None or (_PART_RANK[r.status], r.finished_ms) > (_PART_RANK[best.status], best.finished_ms):
            best = r
    return best


def _order(pipe: Pipeline) -> list[Action]:
    """Dependencies first (the pipeline is acyclic: ``parse_pipeline`` checked)."""
    done: set[str] = set()
    out: list[Action] = []
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


def runnable(view: JobView, me: str, coordinating: bool) -> list[tuple[Action, Part]]:
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
                  bound_ms: int) -> list[tuple[Action, Part]]:
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


class JobBook:
    """The job records one node holds, by job and writer, kept from catalog
    changes (``put``, ``clear_writer``), with each job's view cached until a
    record of that job changes.  A finished job's view is reused (only a new
    record can change it); an unfinished one is derived again each time, as
    it also depends on who is reachable.  Bad records are skipped and
    counted."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, JobRecord]] = {}
        self.steps: dict[str, dict[tuple[str, int], dict[str, StepRecord]]] = {}
        self.cancels: dict[str, dict[str, CancelRecord]] = {}
        self._views: dict[str, JobView] = {}
        self.bad_records = 0

    def put(self, writer: str, key: str, value: Any | None) -> str | None:
        """Take one key of ``writer`` (None: it is gone); the job it touches, if any."""
        try:
            if key.startswith(JOB_PREFIX):
                jid = key[len(JOB_PREFIX):]
                recs = self.jobs.setdefault(jid, {})
                if value is None:
                    recs.pop(writer, None)
                else:
                    rec = JobRecord.from_value(value)
                    if rec.job_id != jid:
                        raise RecordError("job: the record names another job")
                    recs[writer] = rec
                if not recs:
                    del self.jobs[jid]
            elif key.startswith(STEP_PREFIX):
                parsed = parse_step_key(key)
                if parsed is None:
                    raise RecordError("step: a bad key")
                jid = parsed[0]
                by_part = self.steps.setdefault(jid, {})
                by_writer = by_part.setdefault((parsed[1], parsed[2]), {})
                if value is None:
                    by_writer.pop(writer, None)
                else:
                    by_writer[writer] = StepRecord.from_value(value)
            elif key.startswith(CANCEL_PREFIX):
                jid = key[len(CANCEL_PREFIX):]
                c = self.cancels.setdefault(jid, {})
                if value is None:
                    c.pop(writer, None)
                else:
                    c[writer] = CancelRecord.from_value(value)
            else:
                return None
        except RecordError:
            self.bad_records += 1
            return None
        self._views.pop(jid, None)
        return jid

    def clear_writer(self, writer: str) -> None:
        for jid in [j for j, recs in self.jobs.items() if writer in recs]:
            self.put(writer, job_key(jid), None)
        for jid, by_part in self.steps.items():
            for by_writer in by_part.values():
                if by_writer.pop(writer, None) is not None:
                    self._views.pop(jid, None)
        for jid, c in self.cancels.items():
            if c.pop(writer, None) is not None:
                self._views.pop(jid, None)

    def view(self, jid: str, reachable: Callable[[str], bool]) -> JobView | None:
        cached = self._views.get(jid)
        if cached is not None:
            return cached
        recs = self.jobs.get(jid)
        if not recs:
            return None
        job = recs[min(recs)]  # copies of one job are the same record
        steps = {k: list(w.values()) for k, w in self.steps.get(jid, {}).items()}
        cancels = self.cancels.get(jid) or {}
        cancel = min(cancels.values(), key=lambda c: c.at_ms) if cancels else None
        v = job_view(job, steps, cancel, reachable)
        if v.status not in (JobStatus.PENDING, JobStatus.RUNNING):
            self._views[jid] = v
        return v

    def views(self, reachable: Callable[[str], bool]) -> list[JobView]:
        out = []
        for jid in list(self.jobs):
            v = self.view(jid, reachable)
            if v is not None:
                out.append(v)
        return out
