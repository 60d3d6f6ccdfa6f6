"""Changed by hand: a copy's files as this node last knew them good.

At publish the store records each file's stat (size, mtime_ns, inode,
ctime_ns) in ``.stat`` beside the manifest.  A scrub stats every file
(cheap); a file whose stat moved (a write, even one whose mtime was put back,
moves ctime; a file put in its place has another inode) is suspect: its
chunks are not served (``Store.locate``) until it is hashed again against the
manifest, a bounded slice a scrub.  Bad, the copy is withdrawn; good (touched
only), its new stat is recorded and it stays.  A file with no recorded stat
(a copy of an older version, an unreadable ``.stat``) has its stat recorded
as it is found; the slow re-verify of every chunk (``Store.verify_chunks``,
``meshnode.copies.verifier``) reads it in its turn.

``StatBook`` holds both (the recorded stats, the suspect files) for ``Store``.
Everything here blocks.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from protocol.manifest import Manifest

from ..persist import atomic_write
from .storefiles import Copy, open_source

__all__ = [
    "SCRUB_FILES_MAX",
    "SCRUB_REHASH_BYTES_MAX",
    "STAT_SUFFIX",
    "SUSPECT_MAX",
    "FileStat",
    "StatBook",
    "file_stat",
    "whole",
]

log = logging.getLogger("meshnode.copies.store")

STAT_SUFFIX = ".stat"
STAT_MAX_BYTES = 64 << 20  # a .stat larger than this is not ours
SCRUB_FILES_MAX = 10_000  # files one scrub looks at (the next ones at the next scrub)
SCRUB_REHASH_BYTES_MAX = 1 << 30  # bytes of changed files one scrub hashes again (the rest at the next)
SUSPECT_MAX = 100_000  # changed files waiting to be hashed again (more: found again by a later scrub)

FileStat = tuple[int, int, int, int]  # size, mtime_ns, inode, ctime_ns


@dataclass
class Recheck:
    """A file of a copy whose stat moved, being hashed again (``StatBook``)."""

    copy: Copy
    rel: str
    seen: FileStat | None = None  # its stat when this pass began; another one starts the pass again
    next: int = -1  # the next chunk to hash (-1: the file's first)


class StatBook:
    """The copies' files as last known good (what a scrub compares, kept in
    ``.stat`` beside each manifest), and the files whose stat moved, being
    hashed again (their chunks not served meanwhile)."""

    def __init__(self) -> None:
        self._scrub_from = 0  # where the next scrub starts, over every copy's files
        # (model, kind) -> (manifest hash, file path -> its stat as last known good): what a scrub compares
        self._stats: dict[tuple[str, str], tuple[str, dict[str, FileStat]]] = {}
        # (model, kind, file path) -> a changed file being hashed again; its chunks are not served meanwhile
        self._suspect: dict[tuple[str, str, str], Recheck] = {}

    def load(self, c: Copy) -> None:
        """Take the recorded stats of ``c``, a copy found at start."""
        self._stats[(c.model, c.kind)] = (c.manifest_hash, read_stats(
            c.path.with_name(c.path.name + STAT_SUFFIX), c.manifest))

    def known(self, model: str, kind: str, manifest_hash: str) -> dict[str, FileStat] | None:
        got = self._stats.get((model, kind))
        return got[1] if got is not None and got[0] == manifest_hash else None

    def record(self, c: Copy, stats: Mapping[str, FileStat]) -> None:
        """Add ``stats`` to what the copy's files are known good as, on disk too (``.stat``)."""
        known = dict(self.known(c.model, c.kind, c.manifest_hash) or {})
        known.update(stats)
        self._stats[(c.model, c.kind)] = (c.manifest_hash, known)
        try:
            atomic_write(c.path.with_name(c.path.name + STAT_SUFFIX), json.dumps(
                {"v": 1, "manifest": c.manifest_hash, "files": {k: list(v) for k, v in sorted(known.items())}},
                separators=(",", ":")).encode())
        except OSError as e:  # kept in memory; found again (and recorded as found) after a restart
            log.warning("could not record the stat of the copy of %s on %s: %s", c.model, c.kind, e.strerror or e)

    def installed(self, copy: Copy) -> None:
        """``copy`` was just written and verified by this node: its files' stats now are the good ones."""
        self._stats.pop((copy.model, copy.kind), None)
        self.record(copy, {f.path: st for f in copy.manifest.files
                           if (st := file_stat(copy.path / f.path)) is not None})

    def forget(self, model: str, kind: str) -> None:
        self._stats.pop((model, kind), None)
        for key in [k for k in list(self._suspect) if k[:2] == (model, kind)]:
            self._suspect.pop(key, None)

    def suspect(self, model: str, kind: str) -> list[str]:
        """The files of the copy being hashed again after their stat moved."""
        return [rel for (m, k, rel) in list(self._suspect) if (m, k) == (model, kind)]

    def is_suspect(self, model: str, kind: str, rel: str) -> bool:
        return (model, kind, rel) in self._suspect

    def look(self, copies: list[Copy], broken: dict[int, Copy], current: Callable[[Copy], bool]) -> None:
        """Stat up to ``SCRUB_FILES_MAX`` of the copies' files (the next ones
        at the next call): a missing file or a wrong type or size breaks its
        copy (into ``broken``); a file whose stat moved becomes suspect; a
        file with no recorded stat has it recorded (while ``current(copy)``)."""
        files = [(c, f.path, f.size) for c in copies for f in c.manifest.files]
        found: dict[int, tuple[Copy, dict[str, FileStat]]] = {}  # stats of files that had none recorded
        if files:
            start = self._scrub_from % len(files)
            window = (files[start:] + files[:start])[:SCRUB_FILES_MAX]
            self._scrub_from = start + len(window)
            for c, rel, size in window:
                if id(c) in broken:
                    continue
                st = look(c.path / rel, size)
                if st is False:
                    broken[id(c)] = c
                elif st is not None:
                    known = self.known(c.model, c.kind, c.manifest_hash)
                    if known is None or rel not in known:
                        found.setdefault(id(c), (c, {}))[1][rel] = st
                    elif known[rel] != st and (c.model, c.kind, rel) not in self._suspect \
                            and len(self._suspect) < SUSPECT_MAX:
                        log.warning("%s of the copy of %s on %s changed on disk (its size, times or inode "
                                    "moved): not served until it is hashed again", rel, c.model, c.kind)
                        self._suspect[(c.model, c.kind, rel)] = Recheck(c, rel)
        for c, stats in found.values():
            if id(c) not in broken and current(c):
                log.info("recorded the stat of %d file(s) of the copy of %s on %s (none was recorded)",
                         len(stats), c.model, c.kind)
                self.record(c, stats)

    def recheck(self, broken: dict[int, Copy], current: Callable[[Copy], bool], budget: int) -> None:
        """Hash the suspect files again, up to ``budget`` bytes in all (one
        chunk at least): a bad chunk breaks the copy (into ``broken``); a
        file read whole while its stat stayed put is good again."""
        for key, r in list(self._suspect.items()):
            c = r.copy
            if not current(c) or id(c) in broken:
                self._suspect.pop(key, None)
                continue
            if budget <= 0:
                break
            try:
                verdict, used = rehash(r, budget)
            except OSError as e:  # EIO, a stale handle: still not served, tried again at the next scrub
                log.warning("could not hash %s of the copy of %s on %s again: %s", r.rel, c.model, c.kind,
                            e.strerror or e)
                continue
            budget -= used
            if verdict is None:
                continue
            self._suspect.pop(key, None)
            if verdict is False:
                log.warning("%s of the copy of %s on %s does not match its manifest any more: withdrawn",
                            r.rel, c.model, c.kind)
                broken[id(c)] = c
            else:
                assert r.seen is not None
                log.info("%s of the copy of %s on %s changed on disk but its bytes still match: kept",
                         r.rel, c.model, c.kind)
                self.record(c, {r.rel: r.seen})

def whole(path: Path, size: int | None) -> bool | None:
    """``path`` is a directory (``size`` None), a regular file (``size`` -1) or
    a regular file of ``size`` bytes: True; it is not: False; unknown (an I/O
    error other than a missing path): None."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return None
    if size is None:
        return stat.S_ISDIR(st.st_mode)
    return stat.S_ISREG(st.st_mode) and (size < 0 or st.st_size == size)


def file_stat(path: Path) -> FileStat | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns) if stat.S_ISREG(st.st_mode) else None


def look(path: Path, size: int) -> FileStat | Literal[False] | None:
    """A copy's file: its stat when it is a regular file of ``size`` bytes;
    False when it is missing or is not; None when unknown (an I/O error)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        return False
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def rehash(r: Recheck, budget: int) -> tuple[bool | None, int]:
    """Hash ``r``'s file on from where the last slice stopped, up to
    ``budget`` bytes (one chunk at least): (False: a chunk does not match or
    the file is gone; True: every chunk matches and the stat did not move
    meanwhile; None: not done yet, or the file moved again: its pass starts
    over), and the bytes read."""
    m = r.copy.manifest
    chunks = m.file_chunks(r.rel)
    try:
        fd = os.open(r.copy.path / r.rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return False, 0
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink swapped in
            return False, 0
        raise
    used = 0
    try:
        st = os.fstat(fd)
        now = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        if not stat.S_ISREG(st.st_mode) or st.st_size != m.file(r.rel).size:
            return False, 0
        if r.seen != now or r.next < 0:  # a first pass, or the file moved since the last slice
            r.seen, r.next = now, chunks.start
        while r.next < chunks.stop and (used == 0 or used < budget):
            ref = m.chunk(r.next)
            data = os.pread(fd, ref.length, ref.offset)
            used += ref.length
            if not m.verify(r.next, data):
                return False, used
            r.next += 1
        if r.next < chunks.stop:
            return None, used
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns) != r.seen:  # written while it was read
            r.next = -1
            return None, used
        return True, used
    finally:
        os.close(fd)


def read_stats(path: Path, manifest: Manifest) -> dict[str, FileStat]:
    """The recorded stat of a copy's files (``.stat``): only well-formed
    entries of files the manifest lists; nothing when the file is missing,
    too large, not ours or not JSON."""
    try:
        with open_source(path) as f:
            raw = f.read(STAT_MAX_BYTES + 1)
        doc = json.loads(raw) if len(raw) <= STAT_MAX_BYTES else None
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(doc, dict) or doc.get("v") != 1 or doc.get("manifest") != manifest.hash:
        return {}
    files = doc.get("files")
    if not isinstance(files, dict):
        return {}
    sizes = {f.path: f.size for f in manifest.files}
    out: dict[str, FileStat] = {}
    for rel, v in files.items():
        if (rel in sizes and isinstance(v, list) and len(v) == 4 and v[0] == sizes[rel]
                and all(type(x) is int and 0 <= x < 2**64 for x in v)):
            out[rel] = (v[0], v[1], v[2], v[3])
    return out

