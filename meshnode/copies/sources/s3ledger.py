"""The S3 fetch's resume state in its staging directory (``s3.py`` step 5):
the objects listed (``_Object``), the ledger of what of each is already
there (``_Ledger``, written whole and throttled), the checks of a claimed
range against the bytes on disk (``_check_claims``, ``_md5_of``), and an
object's ``.part`` file written at offsets by its ranges (``_RangedPart``).
Apart from the fetch itself so that each reads on its own; ``s3`` imports
them back."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ...persist import FILE_MODE, atomic_write, make_dirs

log = logging.getLogger("meshnode.copies.sources")

_MD5 = re.compile(r"[0-9a-f]{32}\Z")

PIECE_BYTES = 1 << 20  # read, written and hashed at once, in a worker thread
LEDGER = ".meshnode-s3-resume.json"  # the resume record, in the staging directory
LEDGER_EVERY_S = 1.0  # at least; more when writing the record takes long (at most 5% of the time)
LEDGER_MAX_BYTES = 64 << 20  # a bigger record is not read (the fetch starts over)


@dataclass
class _Object:
    key: str
    rel: str
    size: int
    etag: str
    part_size: int | None = None  # multipart: the size of its parts (all but the last)
    parts: dict[int, bytes] = field(default_factory=dict)  # range index -> its MD5 (a part's, when aligned)
    ranges: list[tuple[int, int]] = field(default_factory=list)  # (offset, length)


class _Ledger:
    """What of each object is already in the staging directory (see the
    module's doc, step 5).  Entries: key -> {etag, size, ranges, done: {index:
    md5}, part: {index: [bytes, md5 of them]}}; written whole, throttled."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self._written_at = -float("inf")
        self._dirty = False
        self._lock = trio.Lock()

    def _leftovers(self) -> list[Path]:
        """Temp files of writes a kill cut short (they must not become files of the model)."""
        return list(self.path.parent.glob(f".{self.path.name}.tmp-*"))

    def load(self) -> None:
        """Blocking.  A missing, unreadable, oversized or malformed record is an empty one."""
        with contextlib.suppress(OSError):
            for t in self._leftovers():
                t.unlink(missing_ok=True)
        try:
            if self.path.stat().st_size > LEDGER_MAX_BYTES:
                return
            raw = json.loads(self.path.read_bytes())
        except (OSError, ValueError, RecursionError):
            return
        if isinstance(raw, dict):
            self.entries = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, dict)}

    def claims(self, o: _Object) -> tuple[dict[int, str], dict[int, tuple[int, str]]]:
        """The ranges done and the prefixes of ranges in flight the record holds
        for ``o`` as it is now listed (none when its ETag, size or ranges changed,
        or when the entry is not as this code writes it)."""
        e = self.entries.get(o.key)
        try:
            if not e or e.get("etag") != o.etag or e.get("size") != o.size \
                    or e.get("ranges") != [list(r) for r in o.ranges]:
                return {}, {}
            n = len(o.ranges)

            def index(k: Any) -> int | None:
                ok = isinstance(k, str) and 0 < len(k) <= 9 and k.isascii() and k.isdigit()
                return int(k) if ok and int(k) < n else None

            raw_done, raw_part = e.get("done"), e.get("part")
            done = {i: v for k, v in (raw_done.items() if isinstance(raw_done, dict) else ())
                    if (i := index(k)) is not None and isinstance(v, str) and _MD5.match(v)}
            part = {}
            for k, v in raw_part.items() if isinstance(raw_part, dict) else ():
                i = index(k)
                if (i is not None and i not in done and isinstance(v, list) and len(v) == 2
                        and type(v[0]) is int and 0 < v[0] < o.ranges[i][1]
                        and isinstance(v[1], str) and _MD5.match(v[1])):
                    part[i] = (v[0], v[1])
            return done, part
        except Exception as exc:  # a record this code did not write: believed in nothing
            log.warning("S3: the resume record for %s is not usable (%s): fetching it whole", o.key[:200],
                        type(exc).__name__)
            return {}, {}

    def begin(self, o: _Object) -> None:
        e: dict[str, Any] = {"etag": o.etag, "size": o.size, "ranges": [list(r) for r in o.ranges], "done": {},
                             "part": {}}
        self.entries[o.key] = e
        for i, d in o.parts.items():
            e["done"][str(i)] = d.hex()
        self._dirty = True

    def progress(self, o: _Object, index: int, done: int, h: Any) -> None:
        self.entries[o.key]["part"][str(index)] = [done, h.copy().hexdigest()]
        self._dirty = True

    def range_done(self, o: _Object, index: int, digest: bytes) -> None:
        e = self.entries[o.key]
        e["part"].pop(str(index), None)
        e["done"][str(index)] = digest.hex()
        self._dirty = True

    async def flush(self, now: bool = False) -> None:
        """Write the record when it changed, at most once per ``LEDGER_EVERY_S`` unless ``now``."""
        if not self._dirty or self._lock.locked() or (
                not now and trio.current_time() - self._written_at < LEDGER_EVERY_S):
            return
        async with self._lock:
            t0 = trio.current_time()
            self._dirty = False
            data = json.dumps(self.entries, separators=(",", ":")).encode()  # here: the entries change in trio
            try:  # not durable: what a crash loses is re-hashed, found missing and fetched again
                await trio.to_thread.run_sync(functools.partial(atomic_write, self.path, data, durable=False))
            except OSError as e:
                log.warning("S3: cannot keep the resume record %s: %s", self.path, e)
            # A big record (many objects, many ranges) is written less often: at most 5% of the time.
            self._written_at = trio.current_time() + 19 * (trio.current_time() - t0)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        for t in self._leftovers():
            t.unlink(missing_ok=True)


def _md5_of(path: Path, off: int, length: int) -> Any:
    """The MD5 of ``length`` bytes of ``path`` at ``off`` (fewer there: None)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        f.seek(off)
        left = length
        while left > 0:
            data = f.read(min(PIECE_BYTES * 8, left))
            if not data:
                return None
            h.update(data)
            left -= len(data)
    return h


def _check_claims(path: Path, o: _Object, done: dict[int, str], part: dict[int, tuple[int, str]]
                  ) -> tuple[dict[int, bytes], dict[int, tuple[int, Any]]]:
    """What of the record's claims for ``o`` the file at ``path`` bears out: the
    done ranges' digests, and the in-flight ranges' (bytes, MD5 so far).  Blocking."""
    try:
        if path.stat().st_size != o.size:
            return {}, {}
        ok_done = {}
        for i, want in done.items():
            h = _md5_of(path, *o.ranges[i])
            if h is not None and h.hexdigest() == want:
                ok_done[i] = h.digest()
        ok_part = {}
        for i, (n, want) in part.items():
            h = _md5_of(path, o.ranges[i][0], n)
            if h is not None and h.hexdigest() == want:
                ok_part[i] = (n, h)
        return ok_done, ok_part
    except OSError:
        return {}, {}


class _RangedPart:
    """An object's ``.part`` file, preallocated and written at offsets by its
    ranges in parallel (not ``http._StreamPart``, appended in order; see
    ``common``): opened by its first range, closed after its last, so that
    open files follow the ranges in flight, not the objects listed."""

    def __init__(self, path: Path, size: int, ranges: int, keep: bool = False) -> None:
        self.path, self.size, self.left = path, size, ranges
        self.keep = keep  # resumed: what is in it stays
        self.fd: int | None = None

    def open(self) -> int:
        if self.fd is None:
            make_dirs(self.path.parent)
            trunc = 0 if self.keep else os.O_TRUNC
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | trunc | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
            os.ftruncate(self.fd, self.size)
        return self.fd

    def range_done(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
