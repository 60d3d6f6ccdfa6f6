"""The model registry's rules: what a write puts in the catalog, and what
the mesh holds at a glance.  Shared by the daemon and the simulator.

Theory of operation
-------------------
A registration, an unregistration and a location written by hand are each
one key in the writer's own keyspace (``reg/<model>``, ``loc/<model>@<dev>``),
stamped by the writer's HLC and resolved last-writer-wins by the read view
(``view.py``).  The rules here decide those values:

* a write *observes* the newest stamp of the registration and the locations
  it read first, so that it wins over what it read even against a peer with a fast clock (a stamp from
  too far in the future is not followed: it is reported instead);
* re-registering keeps ``since``, the stamp at which the registration began,
  so the locations recorded under it stay; a first registration and an
  unregistration begin a new one;
* a replica policy (``pin/<model>``, ``pin_write``) is a key of its own, so
  that pinning does not rewrite the registration; a registration that
  carries ``replicas`` writes both, the pin stamped after the registration;
* unregistering with ``purge`` also drops every location the model had,
  and marks the unregistration ``purged``: while it is the model's newest
  record, every node deletes its copies of the model (``purged_models``).

``parse_registration`` checks what a client sends before anything is
written, and says what is wrong (``InvalidInput`` with a code).  One
registration's metadata is at most ``METADATA_BYTES_MAX`` bytes of JSON
(``TOO_LARGE``): every write crosses the mesh, and a flood of large ones
slowed everyone's gossip; a registration the node makes itself (a
download's) keeps to it with ``fit_metadata``.

``availability`` and ``totals`` are the mesh at a glance: which models live
on one online node only and which on every online node, and the sums over
the nodes' storage.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .digest import is_digest
from .errors import LocalProtocolError
from .hlc import HLC, ClockSkewError, Stamp
from .keys import (
    REG_PREFIX,
    LocOp,
    LocRecord,
    PinRecord,
    RecordError,
    RegOp,
    RegRecord,
    Storage,
    loc_key,
    pin_key,
    reg_key,
)
from .replicas import InvalidPolicy, ReplicaPolicy
from .serving import ENGINES
from .view import ModelView

__all__ = [
    "METADATA_BYTES_MAX",
    "METADATA_FILES_MAX",
    "Availability",
    "InvalidInput",
    "Registration",
    "Write",
    "availability",
    "changed_fields",
    "fit_metadata",
    "location_write",
    "metadata_bytes",
    "parse_policy",
    "parse_registration",
    "pin_write",
    "purged_models",
    "register_write",
    "storage_totals",
    "unregister_writes",
]

METADATA_FILES_MAX = 200  # a registration's metadata lists at most this many file names
METADATA_BYTES_MAX = 16 * 1024  # a registration's metadata, as compact JSON
_DESC_MAX = 4096
_TAGS_MAX = 64
_INT_LIMIT = 2**63

Write = tuple[str, Any]  # a catalog key and its new value (None: delete the key)


class InvalidInput(LocalProtocolError):
    """What a client asked for is not valid: ``code`` says which kind, ``message`` what and why."""

    def __init__(self, message: str, code: str = "INVALID_REQUEST") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Registration:
    """A registration as a client asks for it, checked."""

    model_type: str | None = None
    source_url: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    replicas: ReplicaPolicy | None = None  # None: the model's pin, if any, stays as it is


def parse_policy(raw: Any) -> ReplicaPolicy:
    """A replica policy a client sends (``{min, max, tier, labels, spread}``), or ``InvalidInput``."""
    try:
        return ReplicaPolicy.from_value(raw)
    except InvalidPolicy as e:
        raise InvalidInput(str(e), "INVALID_POLICY") from None


def _count(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < _INT_LIMIT:
        raise InvalidInput(f"{what} must be a number below 2**63")
    return v


def _clean_metadata(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidInput("metadata must be an object")
    out: dict[str, Any] = {}
    desc = raw.get("description")
    if desc is not None:
        if not isinstance(desc, str) or len(desc) > _DESC_MAX:
            raise InvalidInput(f"metadata.description must be a string of at most {_DESC_MAX} characters")
        out["description"] = desc
    tags = raw.get("tags")
    if tags is not None:
        if not isinstance(tags, list) or len(tags) > _TAGS_MAX or not all(isinstance(t, str) and 0 < len(t) <= 64 for t in tags):
            raise InvalidInput(f"metadata.tags must be a list of at most {_TAGS_MAX} short strings")
        out["tags"] = tags
    req = raw.get("requirements")
    if req is not None:
        if not isinstance(req, dict):
            raise InvalidInput("metadata.requirements must be an object")
        clean: dict[str, Any] = {}
        for k in ("min_memory", "min_vram"):
            if req.get(k) is not None:
                clean[k] = _count(req[k], f"metadata.requirements.{k} (bytes)")
        arch = req.get("gpu_arch")
        if arch is not None:
            # One architecture ("sm_80") or the list the seeds write (["sm_80", "sm_90"]).
            ok_str = isinstance(arch, str) and 0 < len(arch) <= 64
            ok_list = isinstance(arch, list) and 0 < len(arch) <= 16 and all(
                isinstance(a, str) and 0 < len(a) <= 64 for a in arch)
            if not (ok_str or ok_list):
                raise InvalidInput("metadata.requirements.gpu_arch must be a short string or a list of up to 16")
            clean["gpu_arch"] = arch
        unknown = set(req) - {"min_memory", "min_vram", "gpu_arch"}
        if unknown:
            raise InvalidInput(f"unknown requirements: {', '.join(sorted(unknown))[:200]}")
        out["requirements"] = clean
    rev = raw.get("revision")
    if rev is not None:
        if not isinstance(rev, str) or len(rev) > 64:
            raise InvalidInput("metadata.revision must be a string of at most 64 characters")
        out["revision"] = rev
    files = raw.get("files")
    if files is not None:
        if not isinstance(files, list) or len(files) > METADATA_FILES_MAX or not all(
            isinstance(f, str) and 0 < len(f) <= 1024 for f in files
        ):
            raise InvalidInput(f"metadata.files must be a list of at most {METADATA_FILES_MAX} paths")
        out["files"] = files
    if raw.get("file_count") is not None:
        out["file_count"] = _count(raw["file_count"], "metadata.file_count")
    digest = raw.get("digest")
    if digest is not None:
        if not isinstance(digest, str) or not is_digest(digest):
            raise InvalidInput("metadata.digest must be sha256:<64 lowercase hex digits>")
        out["digest"] = digest
    engine = raw.get("engine")
    if engine is not None:
        if engine not in ENGINES:
            raise InvalidInput(f"metadata.engine must be one of {', '.join(ENGINES)}")
        out["engine"] = engine
    unknown = set(raw) - {"description", "tags", "requirements", "revision", "files", "file_count", "engine", "digest"}
    if unknown:
        raise InvalidInput(f"unknown metadata fields: {', '.join(sorted(unknown))[:200]}")
    return out


def metadata_bytes(metadata: Mapping[str, Any]) -> int:
    """The size of ``metadata`` as compact UTF-8 JSON (what the limit counts)."""
    return len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode())


def fit_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """``metadata`` with as many of its ``files`` as fit in ``METADATA_BYTES_MAX``
    (``file_count`` still says how many there are): for registrations the
    node writes itself."""
    files = list(metadata.get("files") or [])
    out = dict(metadata)
    while files and metadata_bytes(out) > METADATA_BYTES_MAX:
        files = files[: len(files) * 3 // 4]
        out["files"] = files
    if "files" in out and not files:
        del out["files"]
    return out


def parse_registration(body: Any) -> Registration:
    """The registration a client's JSON body asks for, or ``InvalidInput``."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    unknown = set(body) - {"model_type", "source_url", "metadata", "replicas"}
    if unknown:
        raise InvalidInput(f"unknown fields: {', '.join(sorted(unknown))[:200]}")
    model_type = body.get("model_type")
    if model_type is not None and (not isinstance(model_type, str) or not 0 < len(model_type) <= 64):
        raise InvalidInput("model_type must be a string of 1 to 64 characters")
    source_url = body.get("source_url")
    if source_url is not None and (not isinstance(source_url, str) or len(source_url) > 2048):
        raise InvalidInput("source_url must be a string of at most 2048 characters")
    replicas = body.get("replicas")
    metadata = _clean_metadata(body.get("metadata"))
    size = metadata_bytes(metadata)
    if size > METADATA_BYTES_MAX:
        raise InvalidInput(f"metadata is {size} bytes of JSON; at most {METADATA_BYTES_MAX} "
                           f"({METADATA_BYTES_MAX // 1024} KiB) are kept per model", "TOO_LARGE")
    return Registration(model_type, source_url, metadata, None if replicas is None else parse_policy(replicas))


def changed_fields(existing: ModelView | None, reg: Registration) -> list[str] | None:
    """What a registration changes of the one it replaces: None for a first
    registration, else the fields that differ (``[]``: the same again)."""
    if existing is None:
        return None
    out = [f for f in ("model_type", "source_url") if getattr(existing, f) != getattr(reg, f)]
    old, new = dict(existing.metadata), dict(reg.metadata)
    out += [f"metadata.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if reg.replicas is not None and reg.replicas != existing.policy:
        out.append("replicas")
    return out


def _observe(hlc: HLC, seen: Stamp | None, now_ms: int) -> str | None:
    """Advance past ``seen`` (a write after a read wins over what it read);
    a warning instead when ``seen`` is too far in the future to follow."""
    if seen is None:
        return None
    try:
        hlc.observe(seen, now_ms)
    except ClockSkewError as e:
        return f"not following a stamp from the future: {e}"
    return None


def register_write(
    name: str, reg: Registration, existing: ModelView | None, hlc: HLC, now_ms: int
) -> tuple[list[Write], str | None]:
    """The writes that register ``name`` (whose current view is ``existing``):
    the registration, and its pin when it carries ``replicas``; a warning
    for the log, if any."""
    warning = _observe(hlc, existing.seen if existing is not None else None, now_ms)
    stamp = hlc.now(now_ms)
    since = existing.since if existing is not None else stamp
    rec = RegRecord(stamp, since, RegOp.REGISTER, reg.model_type, reg.source_url, dict(reg.metadata))
    writes: list[Write] = [(reg_key(name), rec.to_value())]
    if reg.replicas is not None:
        writes.append((pin_key(name), PinRecord(hlc.now(now_ms), reg.replicas).to_value()))
    return writes, warning


def pin_write(view: ModelView, policy: ReplicaPolicy | None, hlc: HLC, now_ms: int) -> tuple[Write, str | None]:
    """Pin ``view``'s model to ``policy`` (None: unpin it)."""
    warning = _observe(hlc, view.seen, now_ms)
    return (pin_key(view.name), PinRecord(hlc.now(now_ms), policy).to_value()), warning


def unregister_writes(
    view: ModelView, hlc: HLC, now_ms: int, *, purge: bool = False
) -> tuple[list[str], list[Write], str | None]:
    """Unregister ``view``'s model; with ``purge`` drop its locations too.
    The dropped devices, the writes, and a warning for the log, if any."""
    warning = _observe(hlc, view.seen, now_ms)
    dropped: list[str] = []
    writes: list[Write] = []
    if purge:
        for dev in view.locations:
            writes.append((loc_key(view.name, dev), LocRecord(hlc.now(now_ms), LocOp.DROP).to_value()))
            dropped.append(dev)
    stamp = hlc.now(now_ms)
    writes.append((reg_key(view.name), RegRecord(stamp, stamp, RegOp.UNREGISTER, purged=purge).to_value()))
    return dropped, writes, warning


def purged_models(reg_items: Iterable[tuple[str, str, Any]]) -> set[str]:
    """The models whose newest ``reg/`` record, over every node's, is an
    unregistration with purge: every node deletes its copies of them (a node
    that was down does it when it is back; a registration after the purge
    ends it)."""
    newest: dict[str, RegRecord] = {}
    for _nid, key, value in reg_items:
        if not key.startswith(REG_PREFIX):
            continue
        try:
            rec = RegRecord.from_value(value)
        except RecordError:
            continue
        model = key[len(REG_PREFIX) :]
        cur = newest.get(model)
        if cur is None or rec.stamp > cur.stamp:
            newest[model] = rec
    return {m for m, r in newest.items() if r.op is RegOp.UNREGISTER and r.purged}


def location_write(view: ModelView, device: str, present: bool, hlc: HLC, now_ms: int) -> tuple[Write, str | None]:
    """Record (``present``) or drop a location of ``view``'s model by hand."""
    warning = _observe(hlc, view.seen, now_ms)
    rec = LocRecord(hlc.now(now_ms), LocOp.ADD if present else LocOp.DROP)
    return (loc_key(view.name, device), rec.to_value()), warning


@dataclass(frozen=True, slots=True)
class Availability:
    """llama-orch's view: which online nodes hold which models."""

    models_by_node: dict[str, list[str]]  # online or not
    replicated: list[str]  # on every online node (at least two)
    single_node: list[str]  # on exactly one online node


def availability(models: Mapping[str, ModelView], nodes: Iterable[str], online: set[str]) -> Availability:
    """Where each model lives, among ``nodes`` (``online`` of them up)."""
    held: dict[str, list[str]] = {n: [] for n in nodes}
    for mv in models.values():
        for nid in sorted({d.split(":", 1)[0] for d in mv.locations if ":" in d}):
            if nid in held:
                held[nid].append(mv.name)
    up = [n for n in held if n in online]
    replicated, single = [], []
    for name in sorted(models):
        holders = [n for n in up if name in held[n]]
        if len(holders) == 1:
            single.append(name)
        elif len(holders) >= 2 and len(holders) == len(up):
            replicated.append(name)
    return Availability(held, replicated, single)


def storage_totals(storages: Iterable[Storage]) -> dict[str, dict[str, int]]:
    """Per tier, the sums over every node's storage record."""
    out: dict[str, dict[str, int]] = {}
    for st in storages:
        for tier, u in st.tiers.items():
            t = out.setdefault(tier, {"total": 0, "used": 0, "free": 0})
            t["total"] += u.total
            t["used"] += u.used
            t["free"] += u.free
    return out
