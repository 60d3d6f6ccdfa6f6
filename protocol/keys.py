"""Every catalog key family, and a typed record for each.

Theory of operation
-------------------
A node's own keys (``catalog.py``) hold plain values (msgpack-able dicts), so
that any version of the daemon can gossip them.  This module is the one place
that knows their shape: each family has a key function, a frozen record with
``to_value()``, and ``from_value(raw)``, which turns any malformed value (a
peer's, or an older version's) into one error, ``RecordError``.  No other
module parses a key or a value by hand: the field checks are public, in
``records.py`` (``field_str``, ``field_int``, ...), for every record module.

=================================  ================  =====================================
key                                record            written by
=================================  ================  =====================================
``reg/<model>``                    ``RegRecord``     any node (last writer wins on ``stamp``)
``loc/<model>@<node:device>``      ``LocRecord``     any node (last writer wins on ``stamp``)
``pin/<model>``                    ``PinRecord``     any node (last writer wins on ``stamp``)
``copy/<model>@<kind>``            ``CopyRecord``    the node that holds the copy
``xfer/<transfer id>``             ``XferRecord``    the node the transfer runs on
``src/<source id digest>``         ``SrcRecord``     a node that fetched a source
``node``                           ``NodeInfo``      each node, about itself
``storage``                        ``Storage``       each node, about itself
``job/``, ``step/``, ``jobcancel/``  see ``jobs.py``    pipelines: the job, its parts, a cancel
``gpus``                           see ``gpus.py``    each node, its GPUs (``GpusRecord``)
``svc/<model>@<node>:<port>``      see ``serving.py``  the node that runs the engine (``ServiceRecord``)
=================================  ================  =====================================
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import xxhash

from .digest import is_digest
from .errors import RemoteProtocolError
from .hlc import Stamp
from .records import RecordError, field_enum, field_int, field_map, field_stamp, field_str
from .replicas import InvalidPolicy, ReplicaPolicy, parse_labels
from .transfer.states import TRANSITIONS, TransferStatus

__all__ = [
    "COPY_PREFIX",
    "GPUS_KEY",
    "JOB_PREFIX",
    "LOC_PREFIX",
    "NODE_KEY",
    "PIN_PREFIX",
    "REG_PREFIX",
    "SRC_PREFIX",
    "STORAGE_KEY",
    "SVC_PREFIX",
    "TRANSITIONS",
    "XFER_PREFIX",
    "CopyRecord",
    "ErrorRecord",
    "LocOp",
    "LocRecord",
    "NodeInfo",
    "PinRecord",
    "RecordError",
    "RegOp",
    "RegRecord",
    "SrcRecord",
    "Storage",
    "TierUsage",
    "TransferStatus",
    "XferRecord",
    "copy_key",
    "loc_key",
    "model_of_key",
    "parse_copy_key",
    "parse_loc_key",
    "pin_key",
    "reg_key",
    "src_key",
    "xfer_key",
]

REG_PREFIX = "reg/"
LOC_PREFIX = "loc/"
PIN_PREFIX = "pin/"  # a model's replica policy (protocol/replicas.py)
COPY_PREFIX = "copy/"
XFER_PREFIX = "xfer/"
SRC_PREFIX = "src/"
SVC_PREFIX = "svc/"  # serving engines: protocol.serving.ServiceRecord
JOB_PREFIX = "job/"  # pipelines: protocol/jobs.py
NODE_KEY = "node"
STORAGE_KEY = "storage"
GPUS_KEY = "gpus"  # NVML readings: protocol.gpus.GpusRecord

# -- keys --------------------------------------------------------------------------------


def reg_key(model: str) -> str:
    return REG_PREFIX + model


def pin_key(model: str) -> str:
    return PIN_PREFIX + model


def loc_key(model: str, device: str) -> str:
    return f"{LOC_PREFIX}{model}@{device}"


def copy_key(model: str, kind: str) -> str:
    return f"{COPY_PREFIX}{model}@{kind}"


def xfer_key(transfer_id: str) -> str:
    return XFER_PREFIX + transfer_id


def src_key(source_id: str) -> str:
    return SRC_PREFIX + xxhash.xxh3_64_hexdigest(source_id.encode())


def _split_at(key: str, prefix: str) -> tuple[str, str] | None:
    if not key.startswith(prefix):
        return None
    name, sep, rest = key[len(prefix) :].rpartition("@")
    return (name, rest) if sep and name and rest else None


def parse_loc_key(key: str) -> tuple[str, str] | None:
    """``(model, device)`` of a ``loc/`` key, or None."""
    return _split_at(key, LOC_PREFIX)


def parse_copy_key(key: str) -> tuple[str, str] | None:
    """``(model, kind)`` of a ``copy/`` key, or None."""
    return _split_at(key, COPY_PREFIX)


def model_of_key(key: str) -> str | None:
    """The model a ``reg/``, ``pin/``, ``loc/`` or ``copy/`` key is about; None for other keys."""
    for prefix in (REG_PREFIX, PIN_PREFIX):
        if key.startswith(prefix):
            return key[len(prefix) :] or None
    parsed = parse_loc_key(key) or parse_copy_key(key)
    return parsed[0] if parsed else None


# -- the registry: written by any node, last writer wins ----------------------------------------


class RegOp(enum.Enum):
    REGISTER = "register"
    UNREGISTER = "unregister"


@dataclass(frozen=True, slots=True)
class RegRecord:
    """``reg/<model>``: a registration or an unregistration.  ``since`` is the
    stamp at which the current registration began (re-registering keeps it):
    locations recorded before it no longer count."""

    stamp: Stamp
    since: Stamp
    op: RegOp
    model_type: str | None = None
    source_url: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    purged: bool = False  # an unregistration that also deletes every copy, on every node

    def to_value(self) -> dict[str, Any]:
        if self.op is RegOp.UNREGISTER:
            out: dict[str, Any] = {"stamp": self.stamp.to_wire(), "since": self.since.to_wire(), "op": self.op.value}
            if self.purged:
                out["purged"] = True
            return out
        return {
            "stamp": self.stamp.to_wire(),
            "since": self.since.to_wire(),
            "op": self.op.value,
            "model_type": self.model_type,
            "source_url": self.source_url,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_value(cls, raw: Any) -> RegRecord:
        v = field_map(raw, "registration")
        stamp = field_stamp(v.get("stamp"), "registration stamp")
        try:
            since = Stamp.from_wire(v.get("since"))
        except RemoteProtocolError:
            since = stamp  # an older writer's value without one: the registration began with it
        op = field_enum(RegOp, v.get("op"), "registration op")
        meta = v.get("metadata")
        return cls(
            stamp=stamp,
            since=since,
            op=op,
            model_type=v.get("model_type") if isinstance(v.get("model_type"), str) else None,
            source_url=v.get("source_url") if isinstance(v.get("source_url"), str) else None,
            metadata=meta if isinstance(meta, dict) else {},
            purged=op is RegOp.UNREGISTER and v.get("purged") is True,
        )


class LocOp(enum.Enum):
    ADD = "add"
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class LocRecord:
    """``loc/<model>@<node:device>``: a location recorded or dropped by hand."""

    stamp: Stamp
    op: LocOp

    def to_value(self) -> dict[str, Any]:
        return {"stamp": self.stamp.to_wire(), "op": self.op.value}

    @classmethod
    def from_value(cls, raw: Any) -> LocRecord:
        v = field_map(raw, "location")
        return cls(field_stamp(v.get("stamp"), "location stamp"), field_enum(LocOp, v.get("op"), "location op"))


@dataclass(frozen=True, slots=True)
class PinRecord:
    """``pin/<model>``: the model's replica policy (None: unpinned), set by
    ``meshnode pin`` or a registration's ``replicas``; it counts only if
    written at or after the registration's ``since``."""

    stamp: Stamp
    policy: ReplicaPolicy | None

    def to_value(self) -> dict[str, Any]:
        return {"stamp": self.stamp.to_wire(), "policy": None if self.policy is None else self.policy.to_value()}

    @classmethod
    def from_value(cls, raw: Any) -> PinRecord:
        v = field_map(raw, "pin")
        policy = v.get("policy")
        try:
            return cls(field_stamp(v.get("stamp"), "pin stamp"), None if policy is None else ReplicaPolicy.from_value(policy))
        except InvalidPolicy as e:
            raise RecordError(f"pin policy: {e}") from None


# -- a node's own facts --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CopyRecord:
    """``copy/<model>@<kind>``: a complete copy this node holds."""

    manifest_hash: str
    size: int
    files: int = 0
    chunk_bytes: int = 0
    published_ms: int = 0
    sha256: str | None = None  # the copy's own digest (``protocol.digest``), once its node computed it

    def to_value(self) -> dict[str, Any]:
        return {
            "manifest_hash": self.manifest_hash,
            "size": self.size,
            "files": self.files,
            "chunk_bytes": self.chunk_bytes,
            "published_ms": self.published_ms,
            "sha256": self.sha256,
        }

    @classmethod
    def from_value(cls, raw: Any) -> CopyRecord:
        v = field_map(raw, "copy")
        return cls(
            manifest_hash=field_str(v.get("manifest_hash"), "copy manifest_hash", max_chars=64),
            size=field_int(v.get("size"), "copy size"),
            files=field_int(v.get("files", 0), "copy files"),
            chunk_bytes=field_int(v.get("chunk_bytes", 0), "copy chunk_bytes"),
            published_ms=field_int(v.get("published_ms", 0) or 0, "copy published_ms"),
            sha256=_digest(v.get("sha256")),
        )


def _digest(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not is_digest(raw):
        raise RecordError("copy sha256: expected sha256:<64 hex digits>")
    return raw


@dataclass(frozen=True, slots=True)
class ErrorRecord:
    code: str
    message: str

    def to_value(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def from_value(cls, raw: Any) -> ErrorRecord:
        v = field_map(raw, "error")
        return cls(field_str(v.get("code"), "error code", max_chars=64), field_str(v.get("message"), "error message"))


@dataclass(frozen=True, slots=True)
class XferRecord:
    """``xfer/<id>``: a transfer this node runs (it is the receiving end):
    its progress, and for an outside source its claim (``transfer.claims``)."""

    model: str
    kind: str
    status: TransferStatus
    manifest_hash: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    rate_bps: int = 0
    sources: tuple[str, ...] = ()
    error: ErrorRecord | None = None
    started_ms: int = 0
    finished_ms: int = 0
    note: str = ""
    files_done: int = 0
    files_total: int = 0
    source_id: str | None = None
    claim: Stamp | None = None
    chunks_total: int = 0
    chunks_fetched: int = 0
    chunks_resumed: int = 0
    # Also gossiped so that every node shows a transfer in one shape (absent from older peers' records).
    source: str | None = None  # as the API shows it; a URL without user info or query
    keep_source: bool = True
    bad_chunks: int = 0
    banned: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)  # a web source's revision and patterns
    fetched: Mapping[str, Any] | None = None  # what a web fetch learned: revision, model type

    def to_value(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "kind": self.kind,
            "manifest_hash": self.manifest_hash,
            "status": self.status.value,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "rate_bps": self.rate_bps,
            "sources": list(self.sources),
            "error": None if self.error is None else self.error.to_value(),
            "started_ms": self.started_ms,
            "finished_ms": self.finished_ms,
            "note": self.note,
            "files_done": self.files_done,
            "files_total": self.files_total,
            "source_id": self.source_id,
            "claim": None if self.claim is None else self.claim.to_wire(),
            "chunks_total": self.chunks_total,
            "chunks_fetched": self.chunks_fetched,
            "chunks_resumed": self.chunks_resumed,
            "source": self.source,
            "keep_source": self.keep_source,
            "bad_chunks": self.bad_chunks,
            "banned": list(self.banned),
            "options": dict(self.options),
            "fetched": None if self.fetched is None else dict(self.fetched),
        }

    @classmethod
    def from_value(cls, raw: Any) -> XferRecord:
        v = field_map(raw, "transfer")
        sources = v.get("sources") or []
        if not isinstance(sources, list) or len(sources) > 64 or not all(isinstance(s, str) for s in sources):
            raise RecordError("transfer sources: expected a list of node ids")
        banned = v.get("banned") or []
        if not isinstance(banned, list) or len(banned) > 64 or not all(isinstance(s, str) for s in banned):
            raise RecordError("transfer banned: expected a list of node ids")
        keep = v.get("keep_source", True)
        if not isinstance(keep, bool):
            raise RecordError("transfer keep_source: expected a boolean")
        return cls(
            model=field_str(v.get("model"), "transfer model", max_chars=512),
            kind=field_str(v.get("kind"), "transfer kind", max_chars=16),
            status=field_enum(TransferStatus, v.get("status"), "transfer status"),
            manifest_hash=field_str(v.get("manifest_hash"), "transfer manifest_hash", optional=True, max_chars=64),
            bytes_done=field_int(v.get("bytes_done", 0), "transfer bytes_done"),
            bytes_total=field_int(v.get("bytes_total", 0), "transfer bytes_total"),
            rate_bps=field_int(v.get("rate_bps", 0), "transfer rate_bps"),
            sources=tuple(sources),
            error=None if v.get("error") is None else ErrorRecord.from_value(v.get("error")),
            started_ms=field_int(v.get("started_ms", 0) or 0, "transfer started_ms"),
            finished_ms=field_int(v.get("finished_ms", 0) or 0, "transfer finished_ms"),
            note=field_str(v.get("note") or "", "transfer note"),
            files_done=field_int(v.get("files_done", 0) or 0, "transfer files_done"),
            files_total=field_int(v.get("files_total", 0) or 0, "transfer files_total"),
            source_id=field_str(v.get("source_id"), "transfer source_id", optional=True),
            claim=None if v.get("claim") is None else field_stamp(v.get("claim"), "transfer claim"),
            chunks_total=field_int(v.get("chunks_total", 0) or 0, "transfer chunks_total"),
            chunks_fetched=field_int(v.get("chunks_fetched", 0) or 0, "transfer chunks_fetched"),
            chunks_resumed=field_int(v.get("chunks_resumed", 0) or 0, "transfer chunks_resumed"),
            source=field_str(v.get("source"), "transfer source", optional=True, max_chars=4096),
            keep_source=keep,
            bad_chunks=field_int(v.get("bad_chunks", 0) or 0, "transfer bad_chunks"),
            banned=tuple(banned),
            options=_small_map(v.get("options") or {}, "transfer options"),
            fetched=None if v.get("fetched") is None else _small_map(v.get("fetched"), "transfer fetched"),
        )


SMALL_MAP_KEYS_MAX = 8


def _small_map(raw: Any, what: str) -> dict[str, Any]:
    """A few string keys, each a string, a number, null or a short list of strings."""
    v = field_map(raw, what)
    if len(v) > SMALL_MAP_KEYS_MAX:
        raise RecordError(f"{what}: at most {SMALL_MAP_KEYS_MAX} keys")
    out: dict[str, Any] = {}
    for k, x in v.items():
        field_str(k, f"{what} key", max_chars=64)
        if isinstance(x, list):
            if len(x) > 64 or not all(isinstance(i, str) and len(i) <= 1024 for i in x):
                raise RecordError(f"{what} {k}: a list of at most 64 short strings")
        elif not (x is None or isinstance(x, bool | int | float) or (isinstance(x, str) and len(x) <= 1024)):
            raise RecordError(f"{what} {k}: a string, a number, null or a list of strings")
        out[k] = x
    return out


@dataclass(frozen=True, slots=True)
class SrcRecord:
    """``src/<digest>``: this node holds a copy made from that outside source."""

    source_id: str
    manifest_hash: str
    model: str
    revision: str | None = None

    def to_value(self) -> dict[str, Any]:
        return {"source_id": self.source_id, "manifest_hash": self.manifest_hash, "model": self.model,
                "revision": self.revision}

    @classmethod
    def from_value(cls, raw: Any) -> SrcRecord:
        v = field_map(raw, "source")
        return cls(
            source_id=field_str(v.get("source_id"), "source id"),
            manifest_hash=field_str(v.get("manifest_hash"), "source manifest_hash", max_chars=64),
            model=field_str(v.get("model"), "source model", max_chars=512),
            revision=field_str(v.get("revision"), "source revision", optional=True, max_chars=256),
        )


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """``node``: how to reach this node's data plane, and what it runs."""

    address: str
    version: str
    started_ms: int
    data_port: int
    labels: Mapping[str, str] = field(default_factory=dict)  # ``--labels``, shown in /nodes and /v2/nodes

    def to_value(self) -> dict[str, Any]:
        return {"address": self.address, "version": self.version, "started_ms": self.started_ms,
                "data_port": self.data_port, "labels": dict(self.labels)}

    @classmethod
    def from_value(cls, raw: Any) -> NodeInfo:
        v = field_map(raw, "node info")
        port = field_int(v.get("data_port"), "node data_port")
        if not 0 < port < 65536:
            raise RecordError("node data_port: expected a port from 1 to 65535")
        return cls(
            address=field_str(v.get("address"), "node address", max_chars=300),
            version=field_str(v.get("version"), "node version", max_chars=64),
            started_ms=field_int(v.get("started_ms", 0), "node started_ms"),
            data_port=port,
            labels=_labels(v.get("labels")),
        )


def _labels(raw: Any) -> dict[str, str]:
    if raw is not None and not isinstance(raw, dict):
        raise RecordError("node labels: expected a map of strings")
    try:
        return parse_labels(raw)
    except InvalidPolicy as e:
        raise RecordError(f"node labels: {e}") from None


@dataclass(frozen=True, slots=True)
class TierUsage:
    total: int
    used: int
    free: int
    high: int = 100  # its high watermark, percent of used + free (``protocol.eviction``)

    def to_value(self) -> dict[str, int]:
        return {"total": self.total, "used": self.used, "free": self.free, "high": self.high}

    def room_for(self, size: int) -> bool:
        """``size`` more bytes stay under the high watermark."""
        return size <= self.free and (self.used + size) * 100 <= self.high * (self.used + self.free)


STORAGE_SLACK = 0.01  # a tier's free or used bytes move by this share of its size before it is gossiped again
STORAGE_SLACK_MAX = 1 << 30


@dataclass(frozen=True, slots=True)
class Storage:
    """``storage``: each tier's usage on this node, rounded to MiB."""

    tiers: Mapping[str, TierUsage]

    def to_value(self) -> dict[str, Any]:
        return {k: u.to_value() for k, u in self.tiers.items()}

    def moved(self, since: Storage | None) -> bool:
        """Worth telling the mesh, against what it was last told (``since``):
        a tier came or went, its size or watermark changed, or its free or
        used bytes moved by more than ``STORAGE_SLACK`` of its size (at most
        ``STORAGE_SLACK_MAX``).  A shared disk whose free space drifts by a
        few MiB a second (logs, other programs) is not news for every node
        of the mesh each time; placement only needs the rough figure, and a
        node refuses a copy it has no room for anyway."""
        if since is None or since.tiers.keys() != self.tiers.keys():
            return True
        for k, u in self.tiers.items():
            was = since.tiers[k]
            if (u.total, u.high) != (was.total, was.high):
                return True
            slack = min(u.total * STORAGE_SLACK, STORAGE_SLACK_MAX)
            if abs(u.free - was.free) > slack or abs(u.used - was.used) > slack:
                return True
        return False

    @classmethod
    def from_value(cls, raw: Any) -> Storage:
        v = field_map(raw, "storage")
        tiers = {}
        for name, usage in list(v.items())[:16]:
            u = field_map(usage, "storage tier")
            tiers[field_str(name, "storage tier name", max_chars=16)] = TierUsage(
                field_int(u.get("total"), "tier total"), field_int(u.get("used"), "tier used"), field_int(u.get("free"), "tier free"),
                field_int(u.get("high", 100), "tier high watermark", lo=1, hi=100),
            )
        return cls(tiers)
