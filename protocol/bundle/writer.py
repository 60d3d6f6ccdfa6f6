"""Writing a bundle: each entry's bytes but the files' own (the caller streams
those), the length of the whole stream before a byte is read
(``bundle_bytes``), and the holders an export reads from
(``export_sources``).  Nothing here reads a file or a clock: the caller
passes ``mtime_s``.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import LocalProtocolError
from ..manifest import Manifest
from .header import (
    HEADER_MAX_BYTES,
    HEADER_NAME,
    BundleHeader,
    file_entry_name,
    sums_bytes,
    sums_entry_name,
    sums_text,
)
from .tar import END_OF_ARCHIVE, padding, tar_header

__all__ = ["bundle_bytes", "export_sources", "file_header", "header_entry", "sums_entry"]


def header_entry(header: BundleHeader, mtime_s: int) -> bytes:
    """The bundle's first entry, whole: its tar header, the JSON, the padding."""
    data = header.encode()
    if len(data) > HEADER_MAX_BYTES:
        raise LocalProtocolError(f"the bundle's header would be {len(data)} bytes, over {HEADER_MAX_BYTES}")
    return tar_header(HEADER_NAME, len(data), mtime_s) + data + padding(len(data))


def file_header(model: str, manifest_hash: str, path: str, size: int, mtime_s: int) -> bytes:
    return tar_header(file_entry_name(model, manifest_hash, path), size, mtime_s)


def sums_entry(model: str, manifest: Manifest, sums: Mapping[str, str], mtime_s: int) -> bytes:
    data = sums_text(manifest, sums)
    return tar_header(sums_entry_name(model, manifest.hash), len(data), mtime_s) + data + padding(len(data))


def bundle_bytes(header: BundleHeader, mtime_s: int) -> int:
    """The length of the whole stream, as the writer's functions make it."""
    total = len(header_entry(header, mtime_s)) + len(END_OF_ARCHIVE)
    for m in header.models:
        for f in m.manifest.files:
            total += len(file_header(m.name, m.manifest.hash, f.path, f.size, mtime_s)) + f.size + len(padding(f.size))
        n = sums_bytes(m.manifest)
        total += len(tar_header(sums_entry_name(m.name, m.manifest.hash), n, mtime_s)) + n + len(padding(n))
    return total


def export_sources(found: Mapping[str, bool], labels: Mapping[str, Mapping[str, str]],
                   mine: Mapping[str, str]) -> list[str]:
    """The holders an export reads from, nearest first: ``found`` maps each
    reachable holder to whether its copy is complete; a complete copy comes
    first, then the holder that shares the most labels with this node (its
    rack, its zone), then by id, so that every export picks alike."""

    def near(nid: str) -> tuple[int, int, str]:
        theirs = labels.get(nid, {})
        shared = sum(1 for k, v in mine.items() if theirs.get(k) == v)
        return (0 if found[nid] else 1, -shared, nid)

    return sorted(found, key=near)
