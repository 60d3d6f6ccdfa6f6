"""The local store: model copies on this node's devices.

Layout, per tier (``disk`` is ``<data-dir>/copies``, ``dram`` is a directory
on a RAM-backed filesystem, ``/dev/shm/meshnode-<node>`` by default)::

    <tier>/<model name>/@<manifest hash>/...files...   a published copy
    <tier>/<model name>/@<manifest hash>.manifest      its manifest
    <tier>/<model name>/@<manifest hash>.sha256        its digest, once computed (``compute_digest``)
    <tier>/<model name>/@<manifest hash>.stat          each file's (size, mtime_ns, inode, ctime_ns)
    <tier>/.partial/<manifest hash>/...files...        a copy being built

Model names hold at most one ``/`` and no ``..`` (``protocol.names``), and
``@`` is not allowed in them, so a copy directory cannot collide with a model.
A copy becomes visible only when complete: every chunk is verified, every
file fsynced, the manifest written, then one ``rename`` of the partial
directory (same filesystem) to its final name.  A reader never sees a partial
copy.  Deleting a copy renames it aside first, then removes it, never
following a symlink out of the store.

Each copy's last use (a chunk served, a local copy made from it, an engine
started on it) is kept in memory and, at most once a minute, as its
manifest's modification time, so that the least recently used copy is known
after a restart too (``touch``, ``last_used``).  ``scrub`` notices a copy
removed or changed by hand; ``sweep_partials`` removes what transfers that
no longer exist left in ``.partial``.

Changed by hand: at publish the store records each file's stat (size,
mtime_ns, inode, ctime_ns) in ``.stat`` beside the manifest.  A scrub stats
every file (cheap); a file whose stat moved (a write, even one whose mtime
was put back, moves ctime; a file put in its place has another inode) is
suspect: its chunks are not served (``locate``) until it is hashed again
against the manifest, a bounded slice a scrub.  Bad, the copy is withdrawn;
good (touched only), its new stat is recorded and it stays.  A file with no
recorded stat (a copy of an older version, an unreadable ``.stat``) has its
stat recorded as it is found; the slow re-verify of every chunk
(``verify_chunks``, ``meshnode.copies.verifier``) reads it in its turn.

Everything here blocks (file I/O): call it through ``trio.to_thread``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from protocol.digest import is_digest, tree_digest
from protocol.errors import RemoteProtocolError
from protocol.manifest import (
    Manifest,
    ManifestBuilder,
    choose_chunk_bytes,
    chunk_digest,
    validate_rel_path,
)

from ..errors import MeshError
from ..persist import DIR_MODE, FILE_MODE, atomic_write, fsync_dir, make_dirs

__all__ = ["TIERS", "Copy", "Partial", "Store", "StoreError", "tree_bytes"]

log = logging.getLogger("meshnode.copies.store")

TIERS = ("disk", "dram")
_PARTIAL = ".partial"
_MANIFEST_SUFFIX = ".manifest"
_DIGEST_SUFFIX = ".sha256"
_STAT_SUFFIX = ".stat"
_STAT_MAX_BYTES = 64 << 20  # a .stat larger than this is not ours
_HASH_READ = 8 << 20
_FILES_MAX = 100_000
TOUCH_EVERY_S = 60.0  # a copy's last use reaches its manifest's mtime at most this often
SCRUB_FILES_MAX = 10_000  # files one scrub looks at (the next ones at the next scrub)
SCRUB_REHASH_BYTES_MAX = 1 << 30  # bytes of changed files one scrub hashes again (the rest at the next)
SUSPECT_MAX = 100_000  # changed files waiting to be hashed again (more: found again by a later scrub)

FileStat = tuple[int, int, int, int]  # size, mtime_ns, inode, ctime_ns


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


@dataclass
class _Recheck:
    """A file of a copy whose stat moved, being hashed again (``Store.scrub``)."""

    copy: Copy
    rel: str
    seen: FileStat | None = None  # its stat when this pass began; another one starts the pass again
    next: int = -1  # the next chunk to hash (-1: the file's first)


class Partial:
    """A copy being assembled in ``<tier>/.partial/<hash>``; files preallocated to size."""

    def __init__(self, store: Store, kind: str, model: str, manifest: Manifest) -> None:
        self.store, self.kind, self.model, self.manifest = store, kind, model, manifest
        self.path = store.tier_root(kind) / _PARTIAL / manifest.hash
        self._fds: dict[str, int] = {}
        self.resumed = False  # open() found an earlier run's partial: worth re-verifying

    def open(self) -> None:
        self.resumed = self.path.exists()
        make_dirs(self.path)
        for f in self.manifest.files:
            p = self.path / f.path
            make_dirs(p.parent)
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
            _tighten(fd)
            self._fds[f.path] = fd
            if os.fstat(fd).st_size != f.size:
                os.ftruncate(fd, f.size)

    def verified_chunks(self) -> set[int]:
        """Re-check what is already here (after a crash): the chunks whose bytes match."""
        have: set[int] = set()
        for ref in self.manifest.chunks():
            fd = self._fds[ref.path]
            data = os.pread(fd, ref.length, ref.offset)
            if self.manifest.verify(ref.index, data):
                have.add(ref.index)
        return have

    def write_chunk(self, index: int, data: memoryview | bytes) -> None:
        ref = self.manifest.chunk(index)
        if len(data) != ref.length:
            raise StoreError("BAD_CHUNK", f"chunk {index} is {len(data)} bytes, expected {ref.length}")
        fd = self._fds[ref.path]
        done = 0
        view = memoryview(data)
        while done < ref.length:
            try:
                n = os.pwrite(fd, view[done:], ref.offset + done)
            except OSError as e:
                raise _os_error(e, self.kind, self.store.tier_root(self.kind)) from None
            done += n

    def fill_from(self, sources: Mapping[str, Path], skip: Container[int] = (), on_chunk: Callable[[int], None] | None = None) -> None:
        """Copy every chunk not in ``skip`` from ``sources[file path]``, each
        checked against the manifest before it is written (one read of the
        source, none of the copy); ``on_chunk(length)`` after each.  A chunk
        that does not match raises ``StoreError("SOURCE_CHANGED")``."""
        for f in self.manifest.files:
            todo = [i for i in self.manifest.file_chunks(f.path) if i not in skip]
            if not todo:
                continue
            with _open_source(sources[f.path]) as fin:
                for i in todo:
                    ref = self.manifest.chunk(i)
                    data = os.pread(fin.fileno(), ref.length, ref.offset)
                    if not self.manifest.verify(i, data):
                        raise StoreError("SOURCE_CHANGED", f"{sources[f.path]} does not match chunk {i} of the manifest")
                    self.write_chunk(i, data)
                    if on_chunk is not None:
                        on_chunk(ref.length)

    def locate(self, index: int) -> tuple[str, int, int]:
        ref = self.manifest.chunk(index)
        return str(self.path / ref.path), ref.offset, ref.length

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def publish(self) -> Copy:
        """fsync everything, write the manifest, then one rename: the copy appears whole."""
        try:
            for fd in self._fds.values():
                os.fsync(fd)
            self.close()
            for d in {(self.path / f.path).parent for f in self.manifest.files} | {self.path}:
                fsync_dir(d)
            return self.store._install(self.kind, self.model, self.manifest, self.path)
        except OSError as e:
            raise _os_error(e, self.kind, self.store.tier_root(self.kind)) from None

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)

    @contextlib.contextmanager
    def discarded_on_error(self) -> Iterator[None]:
        """Any error inside discards the partial; an OSError becomes a StoreError."""
        try:
            yield
        except OSError as e:
            self.discard()
            raise _os_error(e, self.kind, self.store.tier_root(self.kind)) from None
        except BaseException:
            self.discard()
            raise


def _tighten(fd: int) -> None:
    """A file the store holds is never group-writable or readable by others
    (copies made by an older version were 0644)."""
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & ~FILE_MODE:
        os.fchmod(fd, mode & FILE_MODE)


def _tighten_tree(copy_dir: Path, manifest: Manifest) -> None:
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


def _open_source(path: Path) -> BinaryIO:
    """A file to copy from, never through a symlink (one swapped in after the
    path was checked would lead out of the ingest roots or the store)."""
    return open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")


def _os_error(e: OSError, kind: str, root: Path) -> StoreError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError("NO_SPACE", f"{kind} is full ({root}): {e.strerror}")
    return StoreError("IO_ERROR", f"{kind} I/O error at {root}: {e.strerror or e}")


class Store:
    def __init__(self, node_id: str, data_dir: Path, dram_dir: Path | None = None) -> None:
        self.node_id = node_id
        self._roots = {
            "disk": data_dir / "copies",
            "dram": dram_dir if dram_dir is not None else Path("/dev/shm") / f"meshnode-{node_id}",
        }
        self._copies: dict[tuple[str, str], Copy] = {}  # (model, kind) -> copy
        self._used: dict[tuple[str, str], float] = {}  # (model, kind) -> wall time of its last use
        self._used_saved: dict[tuple[str, str], float] = {}  # ... as its manifest's mtime says
        self._scrub_from = 0  # where the next scrub starts, over every copy's files
        # (model, kind) -> (manifest hash, its sha256 digest): a digest counts only for the copy it was
        # computed from, so that a copy replaced while it was read never shows the old one's
        self._digests: dict[tuple[str, str], tuple[str, str]] = {}
        # (model, kind) -> (manifest hash, file path -> its stat as last known good): what a scrub compares
        self._stats: dict[tuple[str, str], tuple[str, dict[str, FileStat]]] = {}
        # (model, kind, file path) -> a changed file being hashed again; its chunks are not served meanwhile
        self._suspect: dict[tuple[str, str, str], _Recheck] = {}

    def tier_root(self, kind: str) -> Path:
        try:
            return self._roots[kind]
        except KeyError:
            raise StoreError("INVALID_DEVICE", f"this node has no device {kind!r} (it has {', '.join(TIERS)})") from None

    # -- scanning ------------------------------------------------------------------

    def scan(self) -> list[Copy]:
        """Find the published copies on every tier; clear out leftovers of deletions."""
        self._copies.clear()
        for kind, root in self._roots.items():
            try:
                make_dirs(root)
                if stat.S_IMODE(root.stat().st_mode) & ~DIR_MODE:
                    os.chmod(root, stat.S_IMODE(root.stat().st_mode) & DIR_MODE)
            except OSError as e:
                log.warning("cannot use %s at %s: %s", kind, root, e.strerror)
                continue
            for suffix in (_MANIFEST_SUFFIX, _DIGEST_SUFFIX, _STAT_SUFFIX):
                for tmp in root.rglob(".@*" + suffix + ".tmp-*"):
                    rel = tmp.relative_to(root)
                    if rel.parts[0] != _PARTIAL and len(rel.parts) <= 3:  # beside a manifest, not in a copy
                        tmp.unlink(missing_ok=True)  # a write cut short (kill -9)
            for mfile in root.rglob("@*" + _MANIFEST_SUFFIX):
                rel = mfile.relative_to(root)
                if rel.parts[0] == _PARTIAL:
                    continue
                model = str(rel.parent)
                copy_dir = mfile.with_name(mfile.name[: -len(_MANIFEST_SUFFIX)])
                try:
                    manifest = Manifest.decode(mfile.read_bytes(), expected_hash=copy_dir.name[1:])
                except (OSError, RemoteProtocolError) as e:
                    log.error("ignoring copy %s: unreadable manifest (%s)", copy_dir, e)
                    continue
                if copy_dir.is_symlink():
                    log.error("ignoring copy %s: it is a symlink (a copy lives inside the store)", copy_dir)
                    continue
                if not copy_dir.is_dir():
                    mfile.unlink(missing_ok=True)
                    continue
                prev = self._copies.get((model, kind))
                if prev is not None:
                    log.warning("two copies of %s on %s; keeping %s", model, kind, prev.manifest_hash)
                    continue
                _tighten_tree(copy_dir, manifest)
                self._copies[(model, kind)] = Copy(model, kind, manifest, copy_dir)
                with contextlib.suppress(OSError):
                    self._used[(model, kind)] = self._used_saved[(model, kind)] = mfile.stat().st_mtime
                digest = _read_digest(copy_dir.with_name(copy_dir.name + _DIGEST_SUFFIX))
                if digest is not None:
                    self._digests[(model, kind)] = (manifest.hash, digest)
                self._stats[(model, kind)] = (manifest.hash, _read_stats(
                    copy_dir.with_name(copy_dir.name + _STAT_SUFFIX), manifest))
        return list(self._copies.values())

    # -- digests -----------------------------------------------------------------------------

    def digest(self, model: str, kind: str) -> str | None:
        """The copy's sha256 digest (``protocol.digest``), or None until it is computed."""
        c = self._copies.get((model, kind))
        got = self._digests.get((model, kind))
        return got[1] if c is not None and got is not None and got[0] == c.manifest_hash else None

    def compute_digest(self, c: Copy) -> str:
        """Read ``c`` once, keep its digest beside its manifest, and return it."""
        files: dict[str, str] = {}
        for f in c.manifest.files:
            h = hashlib.sha256()
            with _open_source(c.path / f.path) as fin:
                while data := fin.read(_HASH_READ):
                    h.update(data)
            files[f.path] = h.hexdigest()
        digest = tree_digest(files)
        if self._copies.get((c.model, c.kind)) is c:  # still the copy (not deleted or replaced meanwhile)
            atomic_write(c.path.with_name(c.path.name + _DIGEST_SUFFIX),
                         json.dumps({"digest": digest, "files": files}).encode())
            self._digests[(c.model, c.kind)] = (c.manifest_hash, digest)
        return digest

    # -- use, and what went missing -------------------------------------------------------

    def touch(self, model: str, kind: str) -> None:
        """``model``'s copy on ``kind`` was just read (cheap: a dict write; the
        manifest's mtime follows at most once a minute)."""
        key = (model, kind)
        c = self._copies.get(key)
        if c is None:
            return
        now = time.time()
        self._used[key] = now
        if now - self._used_saved.get(key, 0.0) >= TOUCH_EVERY_S:
            self._used_saved[key] = now
            with contextlib.suppress(OSError):
                os.utime(c.path.with_name(c.path.name + _MANIFEST_SUFFIX), (now, now), follow_symlinks=False)

    def last_used(self, model: str, kind: str) -> float:
        return self._used.get((model, kind), 0.0)

    def scrub(self) -> list[Copy]:
        """The copies that are no longer whole on disk (removed or changed by
        hand): forgotten, and what is left of them removed.  Looks at every
        copy's directory and manifest, and at up to ``SCRUB_FILES_MAX`` of
        their files (the next ones at the next scrub): a missing path or a
        wrong type or size breaks a copy; a file whose stat moved since it
        was last known good is hashed again (``SCRUB_REHASH_BYTES_MAX`` a
        scrub; its chunks not served meanwhile) and breaks its copy when a
        chunk does not match.  Another I/O error (EIO, a stale NFS handle)
        skips a file until the next scrub."""
        broken: dict[int, Copy] = {}
        copies = list(self._copies.values())
        for c in copies:
            for path, size in ((c.path, None), (c.path.with_name(c.path.name + _MANIFEST_SUFFIX), -1)):
                if id(c) not in broken and _whole(path, size) is False:
                    broken[id(c)] = c
        files = [(c, f.path, f.size) for c in copies for f in c.manifest.files]
        found: dict[int, tuple[Copy, dict[str, FileStat]]] = {}  # stats of files that had none recorded
        if files:
            start = self._scrub_from % len(files)
            window = (files[start:] + files[:start])[:SCRUB_FILES_MAX]
            self._scrub_from = start + len(window)
            for c, rel, size in window:
                if id(c) in broken:
                    continue
                st = _look(c.path / rel, size)
                if st is False:
                    broken[id(c)] = c
                elif st is not None:
                    known = self._stat_record(c.model, c.kind, c.manifest_hash)
                    if known is None or rel not in known:
                        found.setdefault(id(c), (c, {}))[1][rel] = st
                    elif known[rel] != st and (c.model, c.kind, rel) not in self._suspect \
                            and len(self._suspect) < SUSPECT_MAX:
                        log.warning("%s of the copy of %s on %s changed on disk (its size, times or inode "
                                    "moved): not served until it is hashed again", rel, c.model, c.kind)
                        self._suspect[(c.model, c.kind, rel)] = _Recheck(c, rel)
        for c, stats in found.values():
            if id(c) not in broken and self._copies.get((c.model, c.kind)) is c:
                log.info("recorded the stat of %d file(s) of the copy of %s on %s (none was recorded)",
                         len(stats), c.model, c.kind)
                self._record_stats(c, stats)
        self._recheck(broken)
        deleted = []
        for c in broken.values():
            if self._copies.get((c.model, c.kind)) is c:  # not replaced meanwhile
                self.delete(c.model, c.kind)
                deleted.append(c)
        return deleted

    def _recheck(self, broken: dict[int, Copy]) -> None:
        """Hash the suspect files again, up to ``SCRUB_REHASH_BYTES_MAX`` in all
        (one chunk at least): a bad chunk breaks the copy; a file read whole
        while its stat stayed put is good again."""
        budget = SCRUB_REHASH_BYTES_MAX
        for key, r in list(self._suspect.items()):
            c = r.copy
            if self._copies.get((c.model, c.kind)) is not c or id(c) in broken:
                self._suspect.pop(key, None)
                continue
            if budget <= 0:
                break
            try:
                verdict, used = _rehash(r, budget)
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
                self._record_stats(c, {r.rel: r.seen})

    def suspect(self, model: str, kind: str) -> list[str]:
        """The files of the copy being hashed again after their stat moved."""
        return [rel for (m, k, rel) in list(self._suspect) if (m, k) == (model, kind)]

    def _stat_record(self, model: str, kind: str, manifest_hash: str) -> dict[str, FileStat] | None:
        got = self._stats.get((model, kind))
        return got[1] if got is not None and got[0] == manifest_hash else None

    def _record_stats(self, c: Copy, stats: Mapping[str, FileStat]) -> None:
        """Add ``stats`` to what the copy's files are known good as, on disk too (``.stat``)."""
        known = dict(self._stat_record(c.model, c.kind, c.manifest_hash) or {})
        known.update(stats)
        self._stats[(c.model, c.kind)] = (c.manifest_hash, known)
        try:
            atomic_write(c.path.with_name(c.path.name + _STAT_SUFFIX), json.dumps(
                {"v": 1, "manifest": c.manifest_hash, "files": {k: list(v) for k, v in sorted(known.items())}},
                separators=(",", ":")).encode())
        except OSError as e:  # kept in memory; found again (and recorded as found) after a restart
            log.warning("could not record the stat of the copy of %s on %s: %s", c.model, c.kind, e.strerror or e)

    def verify_chunks(self, c: Copy, first: int, count: int) -> list[int]:
        """Read chunks ``first`` to ``first + count - 1`` of ``c`` and check each
        against the manifest: the ones that do not match (none once ``c`` is
        no longer the store's copy).  A short read is a mismatch; another
        OSError is raised."""
        if self._copies.get((c.model, c.kind)) is not c:
            return []
        bad: list[int] = []
        fds: dict[str, int] = {}
        try:
            for i in range(first, min(first + count, c.manifest.n_chunks)):
                ref = c.manifest.chunk(i)
                fd = fds.get(ref.path)
                if fd is None:
                    try:
                        fd = fds[ref.path] = os.open(c.path / ref.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    except (FileNotFoundError, NotADirectoryError):
                        if self._copies.get((c.model, c.kind)) is not c:
                            return []  # deleted while it was read
                        raise
                if not c.manifest.verify(i, os.pread(fd, ref.length, ref.offset)):
                    bad.append(i)
        finally:
            for fd in fds.values():
                os.close(fd)
        return bad

    def withdraw(self, c: Copy) -> bool:
        """Forget ``c`` and remove its files (a chunk of it does not match):
        False when it is no longer the store's copy."""
        if self._copies.get((c.model, c.kind)) is not c:
            return False
        self.delete(c.model, c.kind)
        return True

    def sweep_partials(self, active: Container[str], older_than_s: float) -> list[Path]:
        """Remove ``.partial`` entries (a copy being built, a fetch's staging
        directory) that no active transfer names and that nothing wrote for
        ``older_than_s``; and what an interrupted delete left beside a copy."""
        removed: list[Path] = []
        cutoff = time.time() - older_than_s
        for kind in TIERS:
            root = self.tier_root(kind)
            try:
                entries = list((root / _PARTIAL).iterdir())
            except OSError:
                entries = []
            for p in entries:
                if p.name in active:
                    continue
                try:
                    if _newest_mtime(p) > cutoff:
                        continue
                except OSError:
                    continue
                _remove_tree(p, root)
                removed.append(p)
            for d in _deleting_leftovers(root):
                _remove_tree(d, root)
                removed.append(d)
        return removed

    def copies(self) -> list[Copy]:
        return list(self._copies.values())

    def get(self, model: str, kind: str) -> Copy | None:
        return self._copies.get((model, kind))

    def find(self, manifest_hash: str) -> Copy | None:
        for c in self._copies.values():
            if c.manifest_hash == manifest_hash:
                return c
        return None

    def usage(self, kind: str) -> dict[str, int]:
        root = self.tier_root(kind)
        target = root if root.exists() else root.parent
        u = shutil.disk_usage(target)
        return {"total": u.total, "used": u.used, "free": u.free}

    # -- building copies --------------------------------------------------------------

    def staging_dir(self, kind: str, name: str) -> Path:
        """A scratch directory on ``kind``'s filesystem, beside the partials
        (never taken for a copy by ``scan``), so its files can be renamed in."""
        return self.tier_root(kind) / _PARTIAL / name

    def discard_partial(self, kind: str, manifest_hash: str) -> None:
        """Remove the partial copy of ``manifest_hash`` on ``kind`` (a cancelled transfer's)."""
        if not re.fullmatch(r"[0-9a-f]{16,64}", manifest_hash):
            return
        shutil.rmtree(self.tier_root(kind) / _PARTIAL / manifest_hash, ignore_errors=True)

    def partial(self, kind: str, model: str, manifest: Manifest) -> Partial:
        free = self.usage(kind)["free"]
        p = Partial(self, kind, model, manifest)
        already = sum(os.path.getsize(p.path / f.path) for f in manifest.files if (p.path / f.path).is_file()) if p.path.exists() else 0
        if manifest.total_bytes - already > free:
            raise StoreError(
                "NO_SPACE",
                f"{self.node_id}:{kind} has {free} bytes free, {manifest.total_bytes - already} more are needed for {model}",
            )
        with p.discarded_on_error():
            p.open()
        return p

    def _install(self, kind: str, model: str, manifest: Manifest, built: Path) -> Copy:
        root = self.tier_root(kind)
        parent = root / model
        make_dirs(parent)
        final = parent / f"@{manifest.hash}"
        mfile = parent / f"@{manifest.hash}{_MANIFEST_SUFFIX}"
        old = self._copies.get((model, kind))
        if final.exists():
            shutil.rmtree(built, ignore_errors=True)  # the same copy is already here
        else:
            atomic_write(mfile, manifest.encode())
            os.rename(built, final)
            fsync_dir(parent)
        copy = Copy(model, kind, manifest, final)
        if old is None or old.manifest_hash != manifest.hash or self._stat_record(model, kind, manifest.hash) is None:
            # What a scrub compares: the files as this node wrote and verified them.
            self._stats.pop((model, kind), None)
            self._record_stats(copy, {f.path: st for f in manifest.files if (st := _file_stat(final / f.path)) is not None})
        self._copies[(model, kind)] = copy
        self._used[(model, kind)] = time.time()  # written now: not the least recently used copy
        if old is not None and old.manifest_hash != manifest.hash:
            self._remove_dir(old)
        return copy

    def ingest_path(self, kind: str, model: str, src: Path, chunk_bytes: int | None = None, *, adopt: bool = False,
                    accept: Callable[[str], None] | None = None, on_chunk: Callable[[int], None] | None = None) -> Copy:
        """Add a local file or directory as a copy: hash it once, copy it in, publish.

        ``accept(manifest_hash)``, once the content is hashed and before
        anything is copied or replaced, may refuse it (raise ``StoreError``).
        ``on_chunk(length)`` after each chunk written into the tier.

        ``adopt``: ``src`` is a staging directory this node filled on the tier's
        own filesystem (a web ingest): its files are renamed into the copy
        instead of copied, so the tier needs room for one copy, not two.
        """
        files = list(_walk(src))
        total = sum(size for _, _, size in files)
        cb = chunk_bytes or choose_chunk_bytes(total)
        builder = ManifestBuilder(cb)
        for rel, path, size in files:
            digests = []
            with _open_source(path) as f:
                left = size
                while left > 0:  # exactly the size it had when listed
                    data = f.read(min(cb, left))
                    if len(data) < min(cb, left):
                        raise StoreError("SOURCE_CHANGED", f"{path} shrank while it was being added; try again")
                    digests.append(chunk_digest(data))
                    left -= len(data)
                if os.fstat(f.fileno()).st_size != size:
                    raise StoreError("SOURCE_CHANGED", f"{path} grew while it was being added; try again")
            builder.add_file(rel, size, tuple(digests))
        manifest = builder.build()
        existing = self.get(model, kind)
        if existing is not None and existing.manifest_hash == manifest.hash:
            return existing
        if accept is not None:
            accept(manifest.hash)
        if adopt:
            adopted = self._adopt(kind, model, manifest, files)
            if adopted is not None:
                return adopted
        p = self.partial(kind, model, manifest)
        with p.discarded_on_error():
            try:  # each chunk checked as it is copied: a file that changed since it was hashed is caught
                p.fill_from({rel: path for rel, path, _ in files}, on_chunk=on_chunk)
            except StoreError as e:
                if e.code != "SOURCE_CHANGED":
                    raise
                raise StoreError("SOURCE_CHANGED", f"{src} changed while it was being added; try again") from None
            return p.publish()

    def _adopt(self, kind: str, model: str, manifest: Manifest, files: list[tuple[str, Path, int]]) -> Copy | None:
        """Rename ``files`` (just hashed into ``manifest``) into a partial and
        publish it; None (nothing moved) when they are not on this tier's
        filesystem or a partial of this manifest is already being built."""
        p = Partial(self, kind, model, manifest)
        try:
            tier_dev = self.tier_root(kind).stat().st_dev
            if any(path.stat().st_dev != tier_dev for _, path, _ in files):
                return None
            make_dirs(p.path.parent)
            p.path.mkdir(mode=DIR_MODE)  # FileExistsError: someone else's partial, left alone
        except FileExistsError:
            return None
        except OSError as e:
            raise _os_error(e, kind, self.tier_root(kind)) from None
        with p.discarded_on_error():
            for rel, path, size in files:
                dest = p.path / rel
                make_dirs(dest.parent)
                os.rename(path, dest)
                os.chmod(dest, FILE_MODE, follow_symlinks=False)
                if dest.stat().st_size != size:
                    raise StoreError("SOURCE_CHANGED", f"{path} changed while it was being added; try again")
            p.open()
            return p.publish()

    # -- deleting -----------------------------------------------------------------------

    def delete(self, model: str, kind: str) -> Copy | None:
        c = self._copies.pop((model, kind), None)
        self._digests.pop((model, kind), None)
        self._stats.pop((model, kind), None)
        for key in [k for k in list(self._suspect) if k[:2] == (model, kind)]:
            self._suspect.pop(key, None)
        if c is not None:
            self._remove_dir(c)
            self._prune(kind, model)
        return c

    def _prune(self, kind: str, model: str) -> None:
        """Remove the model's directories (``<root>/owner/name``) once nothing is left in them."""
        root = self.tier_root(kind)
        d = root / model
        while d != root and d.is_relative_to(root):
            try:
                d.rmdir()  # only when empty
            except OSError:
                return
            d = d.parent

    def _remove_dir(self, c: Copy) -> None:
        mfile = c.path.with_name(c.path.name + _MANIFEST_SUFFIX)
        mfile.unlink(missing_ok=True)  # first: without a manifest, it is no copy
        if (c.model, c.kind) not in self._copies:  # gone, not replaced by a newer copy
            self._used.pop((c.model, c.kind), None)
            self._used_saved.pop((c.model, c.kind), None)
        c.path.with_name(c.path.name + _DIGEST_SUFFIX).unlink(missing_ok=True)
        c.path.with_name(c.path.name + _STAT_SUFFIX).unlink(missing_ok=True)
        aside = c.path.with_name(f".deleting-{c.path.name}")
        try:
            os.rename(c.path, aside)
        except OSError:
            aside = c.path
        _remove_tree(aside, self.tier_root(c.kind))

    def locate(self, manifest_hash: str, index: int) -> tuple[str, int, int] | None:
        """Where chunk ``index`` of a copy of ``manifest_hash`` is; never in a
        file that changed on disk and is not yet hashed again."""
        for c in list(self._copies.values()):
            if c.manifest_hash != manifest_hash:
                continue
            if not 0 <= index < c.manifest.n_chunks:
                return None
            ref = c.manifest.chunk(index)
            if (c.model, c.kind, ref.path) in self._suspect:
                continue
            self.touch(c.model, c.kind)  # a peer reads it: used
            return str(c.path / ref.path), ref.offset, ref.length
        return None


def _deleting_leftovers(root: Path) -> list[Path]:
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
        if first.name == _PARTIAL:
            continue
        for second in dirs(Path(first.path)):
            if second.name.startswith(".deleting-@"):
                out.append(Path(second.path))
                continue
            out += [Path(e.path) for e in dirs(Path(second.path)) if e.name.startswith(".deleting-@")]
    return out[:1000]


def _whole(path: Path, size: int | None) -> bool | None:
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


def _file_stat(path: Path) -> FileStat | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns) if stat.S_ISREG(st.st_mode) else None


def _look(path: Path, size: int) -> FileStat | Literal[False] | None:
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


def _rehash(r: _Recheck, budget: int) -> tuple[bool | None, int]:
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


def _read_stats(path: Path, manifest: Manifest) -> dict[str, FileStat]:
    """The recorded stat of a copy's files (``.stat``): only well-formed
    entries of files the manifest lists; nothing when the file is missing,
    too large, not ours or not JSON."""
    try:
        with _open_source(path) as f:
            raw = f.read(_STAT_MAX_BYTES + 1)
        doc = json.loads(raw) if len(raw) <= _STAT_MAX_BYTES else None
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


def _read_digest(path: Path) -> str | None:
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    d = raw.get("digest") if isinstance(raw, dict) else None
    return d if isinstance(d, str) and is_digest(d) else None


def _remove_tree(path: Path, root: Path) -> None:
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


def _newest_mtime(path: Path) -> float:
    """The newest mtime of ``path`` and what it holds (a bounded walk: a
    partial holds at most ``_FILES_MAX`` files)."""
    newest = os.lstat(path).st_mtime
    if path.is_dir() and not path.is_symlink():
        for n, p in enumerate(path.rglob("*")):
            if n > _FILES_MAX:
                break
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(p).st_mtime)
    return newest


def tree_bytes(src: Path) -> int:
    """The bytes of the regular files under ``src`` (or of ``src``), as an ingest would count them."""
    return sum(size for _, _, size in _walk(src))


def _walk(src: Path) -> Iterator[tuple[str, Path, int]]:
    if not src.exists():
        raise StoreError("SOURCE_NOT_FOUND", f"{src} does not exist")
    if src.is_file():
        yield validate_rel_path(src.name), src, src.stat().st_size
        return
    count = 0
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            if not stat.S_ISREG(st.st_mode):
                continue  # symlinks and specials are not model files
            rel = p.relative_to(src).as_posix()
            count += 1
            if count > _FILES_MAX:
                raise StoreError("TOO_MANY_FILES", f"{src} has more than {_FILES_MAX} files")
            yield validate_rel_path(rel), p, st.st_size
