"""The job records one node holds (``JobBook``): the index the daemon and the
simulator keep from catalog changes, and each job's view from it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .jobrecords import (
    CANCEL_PREFIX,
    JOB_PREFIX,
    STEP_PREFIX,
    CancelRecord,
    JobRecord,
    StepRecord,
    job_key,
    parse_step_key,
)
from .jobs import JobStatus, JobView, job_view
from .records import RecordError

__all__ = ["JobBook"]


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
