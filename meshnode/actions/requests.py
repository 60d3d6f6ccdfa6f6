"""What the router is asked to do, typed: a copy (or move) and a download.

The API parses a request's body into one of these once, at its edge, after
the body's JSON schema was checked (``meshnode/api/requests.py``); internal
callers build them directly.  The router then checks only what needs the
mesh: the nodes named are known and up, the copy to read exists, the source
and target differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.names import Device

__all__ = ["CopyRequest", "DownloadRequest"]


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
