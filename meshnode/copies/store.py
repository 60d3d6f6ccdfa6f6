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

Changed by hand: ``meshnode.copies.filestats`` (each file's stat recorded at
publish; a file whose stat moved is hashed again before its chunks are served).
A copy being built: ``meshnode.copies.partial``.  The file primitives:
``meshnode.copies.storefiles``.

Everything here blocks (file I/O): call it through ``trio.to_thread``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Container, Iterator
from pathlib import Path

from protocol.digest import tree_digest
from protocol.errors import RemoteProtocolError
from protocol.manifest import (
    Manifest,
    ManifestBuilder,
    choose_chunk_bytes,
    chunk_digest,
    validate_rel_path,
)

from ..persist import DIR_MODE, FILE_MODE, atomic_write, fsync_dir, make_dirs
from .filestats import (
    SCRUB_FILES_MAX,
    SCRUB_REHASH_BYTES_MAX,
    STAT_SUFFIX,
    SUSPECT_MAX,
    FileStat,
    StatBook,
    whole,
)
from .partial import Partial
from .storefiles import (
    FILES_MAX,
    PARTIAL_DIR,
    Copy,
    StoreError,
    deleting_leftovers,
    newest_mtime,
    open_source,
    os_error,
    read_digest,
    remove_tree,
    tighten_tree,
)

__all__ = [
    # the scrub's limits, re-exported: ``Store.scrub`` reads its byte budget from here
    "SCRUB_FILES_MAX",
    "SCRUB_REHASH_BYTES_MAX",
    "SUSPECT_MAX",
    "TIERS",
    "Copy",
    "FileStat",
    "Partial",
    "Store",
    "StoreError",
    "tree_bytes",
]

log = logging.getLogger("meshnode.copies.store")

TIERS = ("disk", "dram")
_MANIFEST_SUFFIX = ".manifest"
_DIGEST_SUFFIX = ".sha256"
_HASH_READ = 8 << 20
TOUCH_EVERY_S = 60.0  # a copy's last use reaches its manifest's mtime at most this often


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
        # (model, kind) -> (manifest hash, its sha256 digest): a digest counts only for the copy it was
        # computed from, so that a copy replaced while it was read never shows the old one's
        self._digests: dict[tuple[str, str], tuple[str, str]] = {}
        self._book = StatBook()  # each file's stat as last known good, and the files hashed again

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
            for suffix in (_MANIFEST_SUFFIX, _DIGEST_SUFFIX, STAT_SUFFIX):
                for tmp in root.rglob(".@*" + suffix + ".tmp-*"):
                    rel = tmp.relative_to(root)
                    if rel.parts[0] != PARTIAL_DIR and len(rel.parts) <= 3:  # beside a manifest, not in a copy
                        tmp.unlink(missing_ok=True)  # a write cut short (kill -9)
            for mfile in root.rglob("@*" + _MANIFEST_SUFFIX):
                rel = mfile.relative_to(root)
                if rel.parts[0] == PARTIAL_DIR:
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
                tighten_tree(copy_dir, manifest)
                self._copies[(model, kind)] = Copy(model, kind, manifest, copy_dir)
                with contextlib.suppress(OSError):
                    self._used[(model, kind)] = self._used_saved[(model, kind)] = mfile.stat().st_mtime
                digest = read_digest(copy_dir.with_name(copy_dir.name + _DIGEST_SUFFIX))
                if digest is not None:
                    self._digests[(model, kind)] = (manifest.hash, digest)
                self._book.load(self._copies[(model, kind)])
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
            with open_source(c.path / f.path) as fin:
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
                if id(c) not in broken and whole(path, size) is False:
                    broken[id(c)] = c
        self._book.look(copies, broken, self._is_current)
        self._book.recheck(broken, self._is_current, SCRUB_REHASH_BYTES_MAX)
        deleted = []
        for c in broken.values():
            if self._copies.get((c.model, c.kind)) is c:  # not replaced meanwhile
                self.delete(c.model, c.kind)
                deleted.append(c)
        return deleted

    def _is_current(self, c: Copy) -> bool:
        """``c`` is still the store's copy (not deleted or replaced meanwhile)."""
        return self._copies.get((c.model, c.kind)) is c

    def suspect(self, model: str, kind: str) -> list[str]:
        """The files of the copy being hashed again after their stat moved."""
        return self._book.suspect(model, kind)

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
                entries = list((root / PARTIAL_DIR).iterdir())
            except OSError:
                entries = []
            for p in entries:
                if p.name in active:
                    continue
                try:
                    if newest_mtime(p) > cutoff:
                        continue
                except OSError:
                    continue
                remove_tree(p, root)
                removed.append(p)
            for d in deleting_leftovers(root):
                remove_tree(d, root)
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
        return self.tier_root(kind) / PARTIAL_DIR / name

    def discard_partial(self, kind: str, manifest_hash: str) -> None:
        """Remove the partial copy of ``manifest_hash`` on ``kind`` (a cancelled transfer's)."""
        if not re.fullmatch(r"[0-9a-f]{16,64}", manifest_hash):
            return
        shutil.rmtree(self.tier_root(kind) / PARTIAL_DIR / manifest_hash, ignore_errors=True)

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
        if old is None or old.manifest_hash != manifest.hash or self._book.known(model, kind, manifest.hash) is None:
            # What a scrub compares: the files as this node wrote and verified them.
            self._book.installed(copy)
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
            with open_source(path) as f:
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
            raise os_error(e, kind, self.tier_root(kind)) from None
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
        self._book.forget(model, kind)
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
        c.path.with_name(c.path.name + STAT_SUFFIX).unlink(missing_ok=True)
        aside = c.path.with_name(f".deleting-{c.path.name}")
        try:
            os.rename(c.path, aside)
        except OSError:
            aside = c.path
        remove_tree(aside, self.tier_root(c.kind))

    def locate(self, manifest_hash: str, index: int) -> tuple[str, int, int] | None:
        """Where chunk ``index`` of a copy of ``manifest_hash`` is; never in a
        file that changed on disk and is not yet hashed again."""
        for c in list(self._copies.values()):
            if c.manifest_hash != manifest_hash:
                continue
            if not 0 <= index < c.manifest.n_chunks:
                return None
            ref = c.manifest.chunk(index)
            if self._book.is_suspect(c.model, c.kind, ref.path):
                continue
            self.touch(c.model, c.kind)  # a peer reads it: used
            return str(c.path / ref.path), ref.offset, ref.length
        return None


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
            if count > FILES_MAX:
                raise StoreError("TOO_MANY_FILES", f"{src} has more than {FILES_MAX} files")
            yield validate_rel_path(rel), p, st.st_size
