"""Peer actions: what one node hands another to run (``POST /mesh/v1/actions``), typed.

A ``PeerAction`` is not a pipeline's action (``pipeline.PipelineStep``, a
step of a job, which may lead to peer actions) nor a ``serving.ServiceAction``
(what the engine state machine tells its supervisor).

Theory of operation
-------------------
A request that must run on another node (a copy runs on its target, a
delete on the node that holds the copy) crosses the peer route as a JSON
object.  ``decode_action`` turns it, once, into one of the typed actions
below, checking every field (a ``"false"`` where a boolean belongs is an
error, not ``True``); anything wrong is ``InvalidInput``.  ``encode_action``
is its inverse, so the sender builds the same JSON older nodes expect::

    {"op": "transfer", "model", "kind", "source": "node:kind" | null, "manifest_hash", "keep_source"}
    {"op": "ingest",   "model", "kind", "path": "/abs/path", "source_url"}
    {"op": "fetch",    "model", "kind", "source_url": "hf://..." | "https://...", "options": {...}}
    {"op": "delete_copy", "model", "kind"}
    {"op": "serve",    "model", "gpus": [0, 1], "port": 8101 | null, "config": {...}}
    {"op": "stop_serve", "model", "port": 8101 | null}
    {"op": "verify_copy", "model", "manifest_hash", "chunk": 17}
    {"op": "cancel_transfer", "transfer_id"}   (a puller banned the holder for that chunk)

A transfer's source is typed too: ``CopyOf`` (another node's copy, or any
holder's), ``LocalPath`` (a path on the target node), ``Web`` (the Hugging
Face hub or an http(s) URL, with a revision and file patterns).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InvalidName
from .names import parse_device, validate_model_name
from .registry import InvalidInput
from .sources import SCHEMES, URL_MAX, is_outside

__all__ = [
    "TIERS",
    "WEB_SCHEMES",
    "CancelTransfer",
    "CopyOf",
    "DeleteCopy",
    "LocalPath",
    "PeerAction",
    "Source",
    "StartService",
    "StartTransfer",
    "StopService",
    "VerifyCopy",
    "Web",
    "decode_action",
    "encode_action",
    "source_from_text",
    "source_text",
]

TIERS = ("disk", "dram")  # where a copy can be stored (a GPU holds a model through an engine)
WEB_SCHEMES = tuple(f"{s}://" for s, k in SCHEMES.items() if k.outside)  # sources outside the mesh
_PATTERNS_MAX = 64
_LOCAL_PREFIX = "file://"  # + an absolute path: how a LocalPath is shown and sent


@dataclass(frozen=True, slots=True)
class CopyOf:
    """Another copy in the mesh: the one on ``device`` (``node:kind``), or any holder's."""

    device: str | None = None


@dataclass(frozen=True, slots=True)
class LocalPath:
    """A file or directory on the target node (checked against its ingest roots there)."""

    path: str


@dataclass(frozen=True, slots=True)
class Web:
    """The Hugging Face hub (``hf://owner/name``, a hub URL), an http(s) URL, or an S3 store (``s3://bucket/prefix``)."""

    url: str
    revision: str | None = None
    allow_patterns: tuple[str, ...] | None = None
    ignore_patterns: tuple[str, ...] | None = None

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.revision is not None:
            out["revision"] = self.revision
        if self.allow_patterns is not None:
            out["allow_patterns"] = list(self.allow_patterns)
        if self.ignore_patterns is not None:
            out["ignore_patterns"] = list(self.ignore_patterns)
        return out


Source = CopyOf | LocalPath | Web


def source_text(src: Source) -> str | None:
    """How a transfer shows its source: ``node:kind``, ``file:///path``, the URL; None for any holder."""
    if isinstance(src, CopyOf):
        return src.device
    if isinstance(src, LocalPath):
        return _LOCAL_PREFIX + src.path
    return src.url


def source_from_text(text: str | None, options: dict[str, Any] | None = None) -> Source:
    """The inverse of ``source_text`` (and the form of transfer intents saved by older versions)."""
    if text is None:
        return CopyOf()
    if text.startswith(_LOCAL_PREFIX):  # source_text's own form: the path as is, not a URL to unquote
        return LocalPath(text[len(_LOCAL_PREFIX) :])
    if "://" in text:  # a URL (never a device): classify says whether it is a web source
        return _web(text, options or {})
    return CopyOf(_device(text, "source"))


@dataclass(frozen=True, slots=True)
class StartTransfer:
    """Build a copy of ``model`` on this node's ``kind`` tier from ``source``."""

    model: str
    kind: str
    source: Source
    manifest_hash: str | None = None
    keep_source: bool = True


@dataclass(frozen=True, slots=True)
class DeleteCopy:
    """Delete this node's copy of ``model`` on ``kind``."""

    model: str
    kind: str


@dataclass(frozen=True, slots=True)
class StartService:
    """Serve ``model`` on this node's ``gpus`` (``config`` is checked there, by ``protocol.serving``)."""

    model: str
    gpus: tuple[int, ...]
    port: int | None
    config: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StopService:
    """Stop this node's services of ``model`` (the one on ``port``, or all)."""

    model: str
    port: int | None = None


@dataclass(frozen=True, slots=True)
class VerifyCopy:
    """Read this node's copy of ``model`` (``manifest_hash``) again, from ``chunk``
    on: a peer that pulled from it got a chunk that did not match."""

    model: str
    manifest_hash: str
    chunk: int


@dataclass(frozen=True, slots=True)
class CancelTransfer:
    """Stop this node's transfer ``transfer_id``, its partial files removed."""

    transfer_id: str


PeerAction = StartTransfer | DeleteCopy | StartService | StopService | VerifyCopy | CancelTransfer


# -- checks ---------------------------------------------------------------------------------


def _model(v: Any) -> str:
    try:
        return validate_model_name(v)
    except InvalidName as e:
        raise InvalidInput(str(e), "INVALID_MODEL_NAME") from None


def _kind(v: Any) -> str:
    if v not in TIERS:
        raise InvalidInput(f"no device {str(v)[:20]!r} to store a copy on (one of {', '.join(TIERS)})", "INVALID_DEVICE")
    return str(v)


def _device(v: Any, what: str) -> str:
    try:
        d = parse_device(v)
    except InvalidName as e:
        raise InvalidInput(f"{what}: {e}", "INVALID_DEVICE") from None
    if d.is_web or d.kind not in TIERS:
        raise InvalidInput(f"{what} must be node:disk or node:dram, not {d}", "INVALID_DEVICE")
    return str(d)


def _bool(raw: dict[str, Any], field: str, default: bool) -> bool:
    v = raw.get(field, default)
    if not isinstance(v, bool):
        raise InvalidInput(f"{field} must be true or false")
    return v


def _patterns(v: Any, field: str) -> tuple[str, ...] | None:
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) > _PATTERNS_MAX or not all(isinstance(x, str) and 0 < len(x) <= 256 for x in v):
        raise InvalidInput(f"{field} must be a list of at most {_PATTERNS_MAX} glob patterns")
    return tuple(v)


def _web(url: Any, options: Any) -> Web:
    if not is_outside(url):
        raise InvalidInput(f"a web source is an {', '.join(WEB_SCHEMES)} URL of at most {URL_MAX} characters")
    if not isinstance(options, dict) or set(options) - {"revision", "allow_patterns", "ignore_patterns"}:
        raise InvalidInput("options may hold revision, allow_patterns and ignore_patterns")
    rev = options.get("revision")
    if rev is not None and (not isinstance(rev, str) or not 0 < len(rev) <= 256):
        raise InvalidInput("revision must be a branch, tag or commit")
    return Web(url, rev, _patterns(options.get("allow_patterns"), "allow_patterns"),
               _patterns(options.get("ignore_patterns"), "ignore_patterns"))


def _manifest_hash(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or len(v) != 32 or any(c not in "0123456789abcdef" for c in v):
        raise InvalidInput("manifest_hash must be 32 hex characters")
    return v


def decode_action(raw: Any) -> PeerAction:
    """The typed action in a peer's JSON, or ``InvalidInput`` saying what is wrong."""
    if not isinstance(raw, dict):
        raise InvalidInput("an action is a JSON object")
    op = raw.get("op")
    fields = {
        "transfer": {"op", "model", "kind", "source", "manifest_hash", "keep_source"},
        "ingest": {"op", "model", "kind", "path", "source_url"},
        "fetch": {"op", "model", "kind", "source_url", "options"},
        "delete_copy": {"op", "model", "kind"},
        "serve": {"op", "model", "gpus", "port", "config"},
        "stop_serve": {"op", "model", "port"},
        "verify_copy": {"op", "model", "manifest_hash", "chunk"},
        "cancel_transfer": {"op", "transfer_id"},
    }.get(op if isinstance(op, str) else "")
    if fields is None:
        raise InvalidInput(f"unknown action {str(op)[:40]!r}")
    unknown = set(raw) - fields
    if unknown:
        raise InvalidInput(f"unknown fields in a {op} action: {', '.join(sorted(unknown))[:200]}")
    if op in ("serve", "stop_serve"):
        return _service_action(op, raw)
    if op == "cancel_transfer":
        tid = raw.get("transfer_id")
        if not isinstance(tid, str) or not 0 < len(tid) <= 64 or not tid.isalnum():
            raise InvalidInput("transfer_id: a transfer's id")
        return CancelTransfer(tid)
    if op == "verify_copy":
        chunk = raw.get("chunk")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or not 0 <= chunk < 2**31:
            raise InvalidInput("chunk: a chunk index, 0 or more")
        digest = _manifest_hash(raw.get("manifest_hash"))
        if digest is None:
            raise InvalidInput("manifest_hash must be 32 hex characters")
        return VerifyCopy(_model(raw.get("model")), digest, chunk)
    model, kind = _model(raw.get("model")), _kind(raw.get("kind"))
    if op == "delete_copy":
        return DeleteCopy(model, kind)
    if op == "transfer":
        src = raw.get("source")
        return StartTransfer(model, kind, CopyOf(None if src is None else _device(src, "source")),
                             _manifest_hash(raw.get("manifest_hash")), _bool(raw, "keep_source", True))
    if op == "ingest":
        path = raw.get("path")
        if not isinstance(path, str) or not path.startswith("/") or len(path) > 4096 or "\x00" in path:
            raise InvalidInput("ingest needs an absolute path")
        return StartTransfer(model, kind, LocalPath(path))
    return StartTransfer(model, kind, _web(raw.get("source_url"), raw.get("options") or {}))


def _port(v: Any) -> int | None:
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 65536:
        raise InvalidInput("port: 1 to 65535, or null")
    return v


def _service_action(op: str, raw: dict[str, Any]) -> StartService | StopService:
    model = _model(raw.get("model"))
    port = _port(raw.get("port"))
    if op == "stop_serve":
        return StopService(model, port)
    gpus = raw.get("gpus")
    if not isinstance(gpus, list) or len(gpus) > 64 or len(set(map(str, gpus))) != len(gpus) or not all(
            isinstance(g, int) and not isinstance(g, bool) and 0 <= g < 64 for g in gpus):
        raise InvalidInput("gpus: a list of distinct GPU indexes")
    config = raw.get("config") or {}
    if not isinstance(config, dict):
        raise InvalidInput("config: an object")
    return StartService(model, tuple(sorted(gpus)), port, config)


def encode_action(a: PeerAction) -> dict[str, Any]:
    """The JSON of ``a`` on the peer route."""
    if isinstance(a, StartService):
        return {"op": "serve", "model": a.model, "gpus": list(a.gpus), "port": a.port, "config": a.config}
    if isinstance(a, StopService):
        return {"op": "stop_serve", "model": a.model, "port": a.port}
    if isinstance(a, DeleteCopy):
        return {"op": "delete_copy", "model": a.model, "kind": a.kind}
    if isinstance(a, CancelTransfer):
        return {"op": "cancel_transfer", "transfer_id": a.transfer_id}
    if isinstance(a, VerifyCopy):
        return {"op": "verify_copy", "model": a.model, "manifest_hash": a.manifest_hash, "chunk": a.chunk}
    src = a.source
    if isinstance(src, LocalPath):
        return {"op": "ingest", "model": a.model, "kind": a.kind, "path": src.path, "source_url": _LOCAL_PREFIX + src.path}
    if isinstance(src, Web):
        return {"op": "fetch", "model": a.model, "kind": a.kind, "source_url": src.url, "options": src.options()}
    return {"op": "transfer", "model": a.model, "kind": a.kind, "source": src.device,
            "manifest_hash": a.manifest_hash, "keep_source": a.keep_source}
