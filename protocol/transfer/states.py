"""A transfer's states and the moves between them (h11's ``_state.py`` style).

::

    QUEUED ──> RUNNING ──> DONE
       │          │  └──> FAILED
       │          └─────> QUEUED   (the node stopped: the intent stays, a restart resumes it)
       └──────────────> FAILED   (refused before it ran, or no intent left to resume)
"""

from __future__ import annotations

import enum

__all__ = ["TRANSITIONS", "IllegalTransition", "TransferStatus", "advance"]


class TransferStatus(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"

    @property
    def active(self) -> bool:
        return self in (TransferStatus.QUEUED, TransferStatus.RUNNING)

    @property
    def finished(self) -> bool:
        return self in (TransferStatus.DONE, TransferStatus.FAILED)

    def can_become(self, other: TransferStatus) -> bool:
        return other in TRANSITIONS[self]


TRANSITIONS: dict[TransferStatus, frozenset[TransferStatus]] = {
    TransferStatus.QUEUED: frozenset({TransferStatus.RUNNING, TransferStatus.FAILED}),
    TransferStatus.RUNNING: frozenset({TransferStatus.DONE, TransferStatus.FAILED, TransferStatus.QUEUED}),
    TransferStatus.DONE: frozenset(),
    TransferStatus.FAILED: frozenset(),
}


class IllegalTransition(Exception):
    """A transfer was asked to move where its state table has no arrow (a bug)."""


def advance(current: TransferStatus, to: TransferStatus) -> TransferStatus:
    """``to``, if the table allows the move from ``current``."""
    if not current.can_become(to):
        raise IllegalTransition(f"a transfer cannot go from {current.value} to {to.value}")
    return to
