"""Job records: the three catalog key families a job is made of, typed.

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

Merging a part's records from several writers (``merge_part``): completed wins
(the work is done; steps are idempotent), then failed, then cancelled, then
running.  What a job's records mean together is ``protocol.jobs``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .keys import JOB_PREFIX
from .names import validate_node_id
from .pipeline import InvalidPipeline, Pipeline, parse_pipeline
from .records import RecordError, field_enum, field_int, field_map, field_str

__all__ = [
    "CANCEL_PREFIX",
    "JOB_PREFIX",
    "STEP_PREFIX",
    "CancelRecord",
    "JobRecord",
    "PartStatus",
    "StepRecord",
    "cancel_key",
    "job_key",
    "merge_part",
    "parse_step_key",
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


TEXT_MAX = 2048  # characters of a step's error message or note
ID_MAX = 64  # characters of a job id, a transfer id, an error code


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
        raw = field_map(raw, "job")
        try:
            pipe = parse_pipeline(raw.get("pipeline"))
            by = validate_node_id(raw.get("submitted_by"))
        except (InvalidPipeline, ValueError) as e:
            raise RecordError(f"job: {e}") from None
        return cls(field_str(raw.get("job_id"), "job id", max_chars=ID_MAX), pipe, by,
                   field_int(raw.get("submitted_ms"), "job submitted_ms"))


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
        raw = field_map(raw, "step")
        status = field_enum(PartStatus, raw.get("status"), "step status")
        try:
            node = validate_node_id(raw.get("node"))
        except ValueError as e:
            raise RecordError(f"step: {e}") from None
        return cls(
            status, node, field_int(raw.get("attempt", 1), "step attempt"),
            field_int(raw.get("started_ms", 0), "step started"), field_int(raw.get("finished_ms", 0), "step finished"),
            field_str(raw.get("error_code", ""), "step error code", max_chars=ID_MAX),
            field_str(raw.get("error_message", ""), "step error", max_chars=TEXT_MAX),
            field_str(raw.get("note", ""), "step note", max_chars=TEXT_MAX),
            field_str(raw.get("transfer_id", ""), "step transfer id", max_chars=ID_MAX),
            field_int(raw.get("bytes_done", 0), "step bytes"), field_int(raw.get("bytes_total", 0), "step bytes"),
        )


@dataclass(frozen=True, slots=True)
class CancelRecord:
    at_ms: int
    by: str

    def to_value(self) -> dict[str, Any]:
        return {"at_ms": self.at_ms, "by": self.by}

    @classmethod
    def from_value(cls, raw: Any) -> CancelRecord:
        raw = field_map(raw, "cancel")
        try:
            by = validate_node_id(raw.get("by"))
        except ValueError as e:
            raise RecordError(f"cancel: {e}") from None
        return cls(field_int(raw.get("at_ms"), "cancel at_ms"), by)


def merge_part(records: Iterable[StepRecord]) -> StepRecord | None:
    """One part's record from its writers' records: the highest rank, then the latest end."""
    best: StepRecord | None = None
    for r in records:
        if best is None or (_PART_RANK[r.status], r.finished_ms) > (_PART_RANK[best.status], best.finished_ms):
            best = r
    return best
