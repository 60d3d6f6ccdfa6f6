"""What the router is asked to do, typed: a copy (or move) and a download.

The API parses a request's body into one of these once, at its edge, after
the body's JSON schema was checked (``meshnode/api/requests.py``); internal
callers build them directly (``as_device`` parses a device they hold as text,
``DownloadRequest.of_step`` checks what a pipeline step's open ``config``
adds).  The router then checks only what needs the mesh: the nodes named are
known and up, the copy to read exists, the source and target differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protocol.errors import InvalidName
from protocol.names import Device, parse_device

from ..errors import MeshError

__all__ = ["PATTERNS_MAX", "CopyRequest", "DownloadRequest", "as_device"]

PATTERNS_MAX = 64  # glob patterns of a download (as protocol.actions takes them)
REVISION_CHARS_MAX = 256
PATTERN_CHARS_MAX = 256


def as_device(text: object, what: str) -> Device:
    """``text`` as a device; ``INVALID_DEVICE`` (naming ``what``) when it is not one."""
    try:
        return parse_device(text)
    except InvalidName as e:
        raise MeshError("INVALID_DEVICE", f"{what}: {e}") from None


@dataclass(frozen=True, slots=True)
class CopyRequest:
    """A copy of a model onto ``to_device`` (a node's disk or dram), read from
    the copy on ``from_device``, or from any holder's when it is None."""

    to_device: Device
    from_device: Device | None = None
    keep_source: bool | None = None  # None: a copy keeps its source, a move does not


@dataclass(frozen=True, slots=True)
class DownloadRequest:
    """A model fetched from outside the mesh (or from files on the target
    node) onto ``target_device``."""

    target_device: Device
    source_url: str | None = None  # None: the registration's URL, or hf://owner/name for an owner/name model
    revision: str | None = None  # a hub repository's branch, tag or commit
    allow_patterns: tuple[str, ...] | None = None  # glob patterns of the files to fetch
    ignore_patterns: tuple[str, ...] | None = None  # glob patterns of the files to leave

    @classmethod
    def of_step(cls, target_device: str, source_url: str | None, config: Mapping[str, Any]) -> DownloadRequest:
        """A pipeline's download step onto ``target_device``: its ``revision``,
        ``allow_patterns`` and ``ignore_patterns`` come in its ``config``, which
        the pipeline's schema leaves open, so they are checked here."""
        return cls(as_device(target_device, "target_device"), source_url or None,
                   _revision(config.get("revision")), _patterns(config.get("allow_patterns"), "allow_patterns"),
                   _patterns(config.get("ignore_patterns"), "ignore_patterns"))


def _revision(v: object) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not 0 < len(v) <= REVISION_CHARS_MAX:
        raise MeshError("INVALID_REQUEST", "revision must be a branch, tag or commit")
    return v


def _patterns(v: object, field: str) -> tuple[str, ...] | None:
    """One glob pattern, or a list of them."""
    if v is None:
        return None
    items = [v] if isinstance(v, str) else v if isinstance(v, list) else None
    globs = tuple(x for x in items or () if isinstance(x, str) and 0 < len(x) <= PATTERN_CHARS_MAX)
    if items is None or len(items) > PATTERNS_MAX or len(globs) != len(items):
        raise MeshError("INVALID_REQUEST", f"{field} must be a list of at most {PATTERNS_MAX} glob patterns")
    return globs
