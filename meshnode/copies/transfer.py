"""One transfer as this node runs it: its state, what it shows, what it saves."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from protocol.actions import Source, Web, source_from_text, source_text
from protocol.errors import ProtocolError
from protocol.hlc import Stamp
from protocol.keys import ErrorRecord, XferRecord
from protocol.transfer import TransferStatus
from protocol.transfer.states import advance

from .sources.common import safe_url

__all__ = ["SOURCES_SHOWN", "Transfer"]

SOURCES_SHOWN = 16  # node ids a transfer's catalog record lists


@dataclass
class Transfer:
    model: str
    kind: str  # the tier on this node it builds the copy on
    source: Source
    manifest_hash: str | None = None
    keep_source: bool = True
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    status: TransferStatus = TransferStatus.QUEUED
    bytes_total: int = 0
    bytes_done: int = 0
    chunks_total: int = 0
    chunks_resumed: int = 0
    chunks_fetched: int = 0
    bad_chunks: int = 0
    rate_bps: float = 0.0
    sources: list[str] = field(default_factory=list)
    banned: list[str] = field(default_factory=list)
    error: ErrorRecord | None = None
    started_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    finished_ms: int = 0
    note: str = ""
    source_id: str | None = None  # a web source's canonical id (protocol.transfer.claims)
    claim: Stamp | None = None  # its claim to fetch that source for the mesh
    fetched: dict[str, Any] | None = None  # what a web fetch learned: revision, model type
    files_done: int = 0
    files_total: int = 0
    cancelled: str = ""  # why it was cancelled, once it is
    progress_every_s: float = 0.0  # its record's progress goes to the catalog at most this often (a swarm's size)

    def move(self, to: TransferStatus) -> None:
        self.status = advance(self.status, to)

    def fail(self, code: str, message: str) -> None:
        self.move(TransferStatus.FAILED)
        self.error = ErrorRecord(code, message)

    # -- what others see -------------------------------------------------------------

    def record(self) -> XferRecord:
        """Its ``xfer/<id>`` record in the catalog."""
        return XferRecord(
            model=self.model,
            kind=self.kind,
            status=self.status,
            manifest_hash=self.manifest_hash,
            bytes_done=self.bytes_done,
            bytes_total=self.bytes_total,
            rate_bps=round(self.rate_bps),
            sources=tuple(self.sources[:SOURCES_SHOWN]),
            error=self.error,
            started_ms=self.started_ms,
            finished_ms=self.finished_ms,
            note=self.note,
            files_done=self.files_done,
            files_total=self.files_total,
            source_id=self.source_id,
            claim=self.claim,
            chunks_total=self.chunks_total,
            chunks_fetched=self.chunks_fetched,
            chunks_resumed=self.chunks_resumed,
            source=_shown_source(self.source),
            keep_source=self.keep_source,
            bad_chunks=self.bad_chunks,
            banned=tuple(self.banned[:SOURCES_SHOWN]),
            options=self.source.options() if isinstance(self.source, Web) else {},
            fetched=self.fetched,
        )

    def public(self, node_id: str) -> dict[str, Any]:
        """What the API shows of it (the node that runs it knows the most)."""
        return {
            "transfer_id": self.id,
            "node_id": node_id,
            "target_device": f"{node_id}:{self.kind}",
            "model_name": self.model,
            "model": self.model,
            "kind": self.kind,
            "source": _shown_source(self.source),
            "options": self.source.options() if isinstance(self.source, Web) else {},
            "manifest_hash": self.manifest_hash,
            "keep_source": self.keep_source,
            "status": self.status.value,
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "chunks_total": self.chunks_total,
            "chunks_resumed": self.chunks_resumed,
            "chunks_fetched": self.chunks_fetched,
            "bad_chunks": self.bad_chunks,
            "rate_bps": self.rate_bps,
            "sources": self.sources,
            "banned": self.banned,
            "error": None if self.error is None else self.error.to_value(),
            "started_ms": self.started_ms,
            "finished_ms": self.finished_ms,
            "note": self.note,
            "source_id": self.source_id,
            "claim": None if self.claim is None else self.claim.to_wire(),
            "fetched": self.fetched,
            "files_done": self.files_done,
            "files_total": self.files_total,
        }

    # -- what survives a restart -------------------------------------------------------

    def intent(self) -> dict[str, Any]:
        """What a restart needs to resume it (``Intents``)."""
        return {
            "id": self.id,
            "model": self.model,
            "kind": self.kind,
            "source": _shown_source(self.source),
            "options": self.source.options() if isinstance(self.source, Web) else {},
            "manifest_hash": self.manifest_hash,
            "keep_source": self.keep_source,
            "started_ms": self.started_ms,
            "source_id": self.source_id,
            "claim": None if self.claim is None else self.claim.to_wire(),
            "chunks_resumed": self.chunks_resumed,
        }

    @classmethod
    def from_intent(cls, raw: Any) -> Transfer:
        """A transfer to resume, queued; ValueError if ``raw`` is not an intent."""
        if not isinstance(raw, dict):
            raise ValueError("an intent is a JSON object")
        try:
            t = cls(
                model=str(raw["model"]),
                kind=str(raw["kind"]),
                source=source_from_text(raw.get("source"), raw.get("options") or {}),
                manifest_hash=raw.get("manifest_hash"),
                keep_source=bool(raw.get("keep_source", True)),
                id=str(raw["id"]),
                started_ms=int(raw.get("started_ms") or 0),
                source_id=raw.get("source_id"),
                claim=None if raw.get("claim") is None else Stamp.from_wire(raw["claim"]),
            )
        except (KeyError, TypeError, ValueError, ProtocolError) as e:
            raise ValueError(f"not a transfer intent: {e}") from None
        return t


def _shown_source(src: Source) -> str | None:
    """The source as the catalog carries it: a URL without user info or query
    (a signed URL's token stays on the node that was given it)."""
    text = source_text(src)
    return safe_url(text) if isinstance(src, Web) and text is not None else text
