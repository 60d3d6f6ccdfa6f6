"""The store's file primitives: what a copy is, and file operations that never
go through a symlink, keep owner-only modes and name a full disk.

``Store`` (``meshnode.copies.store``) holds the copies; ``Partial``
(``meshnode.copies.partial``) builds one; ``meshnode.copies.filestats``
notices one changed by hand.  All three use these.  Everything here blocks.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from protocol.digest import is_digest
from protocol.manifest import Manifest

from ..errors import MeshError
from ..persist import DIR_MODE, FILE_MODE

__all__ = [
    "FILES_MAX",
    "PARTIAL_DIR",
    "Copy",
    "StoreError",
    "deleting_leftovers",
    "newest_mtime",
    "open_source",
    "os_error",
    "read_digest",
    "remove_tree",
    "tighten",
    "tighten_tree",
]

log = logging.getLogger("meshnode.copies.store")

PARTIAL_DIR = ".partial"  # <tier>/.partial/<manifest hash>: a copy being built
FILES_MAX = 100_000  # files in one copy (and in one walk of a partial)


class StoreError(MeshError):
    """A store operation failed; the message says why (and what to do)."""


@dataclass(frozen=True)
class Copy:
    model: str
    kind: str  # "disk" or "dram"
    manifest: Manifest
    path: Path

    @property
    def manifest_hash(self) -> str:
        return self.manifest.hash


def tighten(fd: int) -> None:
    """A file the store holds is never group-writable or readable by others
    (copies made by an older version were 0644)."""
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & ~FILE_MODE:
        os.fchmod(fd, mode & FILE_MODE)


def tighten_tree(copy_dir: Path, manifest: Manifest) -> None:
    """Owner-only modes on a copy found at start (an older version wrote 0644
    files in 0755 directories)."""
    paths = [copy_dir / f.path for f in manifest.files]
    dirs = {copy_dir} | {p.parent for p in paths}
    for p, limit in [*((d, DIR_MODE) for d in dirs), *((p, FILE_MODE) for p in paths)]:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if mode & ~limit and not stat.S_ISLNK(st.st_mode):
            os.chmod(p, mode & limit)


def open_source(path: Path) -> BinaryIO:
    """A file to copy from, never through a symlink (one swapped in after the
    path was checked would lead out of the ingest roots or the store)."""
    return open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")


def os_error(e: OSError, kind: str, root: Path) -> StoreError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError("NO_SPACE", f"{kind} is full ({root}): {e.strerror}")
    return StoreError("IO_ERROR", f"{kind} I/O error at {root}: {e.strerror or e}")


def deleting_leftovers(root: Path) -> list[Path]:
    """What interrupted deletes left beside copies (``<root>/name/.deleting-@*``,
    ``<root>/owner/name/.deleting-@*``), never looking through a symlink."""
    out: list[Path] = []

    def dirs(d: Path) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(d) as it:
                return [e for e in it if e.is_dir(follow_symlinks=False)]
        except OSError:
            return []

    for first in dirs(root):
        if first.name == PARTIAL_DIR:
            continue
        for second in dirs(Path(first.path)):
            if second.name.startswith(".deleting-@"):
                out.append(Path(second.path))
                continue
            out += [Path(e.path) for e in dirs(Path(second.path)) if e.name.startswith(".deleting-@")]
    return out[:1000]


def read_digest(path: Path) -> str | None:
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    d = raw.get("digest") if isinstance(raw, dict) else None
    return d if isinstance(d, str) and is_digest(d) else None


def remove_tree(path: Path, root: Path) -> None:
    """Remove ``path``, inside ``root``: a symlink is unlinked, never followed
    (``rmtree`` unlinks the links inside without following them)."""
    if not path.is_relative_to(root):
        log.error("not removing %s: it is outside the store's %s", path, root)
        return
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
            return
    except OSError:
        return
    shutil.rmtree(path, ignore_errors=True)


def newest_mtime(path: Path) -> float:
    """The newest mtime of ``path`` and what it holds (a bounded walk: a
    partial holds at most ``FILES_MAX`` files)."""
    newest = os.lstat(path).st_mtime
    if path.is_dir() and not path.is_symlink():
        for n, p in enumerate(path.rglob("*")):
            if n > FILES_MAX:
                break
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(p).st_mtime)
    return newest

