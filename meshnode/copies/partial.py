"""A copy being built: ``<tier>/.partial/<manifest hash>``, its files
preallocated to size, each chunk written where the manifest puts it, and
published by one ``rename`` once every chunk is verified (``Store.partial``
makes one; ``Store`` installs it).  Everything here blocks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Container, Iterator, Mapping
from pathlib import Path
from typing import Protocol

from protocol.manifest import Manifest

from ..persist import FILE_MODE, fsync_dir, make_dirs
from .storefiles import PARTIAL_DIR, Copy, StoreError, open_source, os_error, tighten

__all__ = ["CopyHome", "Partial"]


class CopyHome(Protocol):
    """What a partial needs of the store that publishes it (``Store``)."""

    def tier_root(self, kind: str) -> Path: ...

    def _install(self, kind: str, model: str, manifest: Manifest, built: Path) -> Copy: ...


class Partial:
    """A copy being assembled in ``<tier>/.partial/<hash>``; files preallocated to size."""

    def __init__(self, store: CopyHome, kind: str, model: str, manifest: Manifest) -> None:
        self.store, self.kind, self.model, self.manifest = store, kind, model, manifest
        self.path = store.tier_root(kind) / PARTIAL_DIR / manifest.hash
        self._fds: dict[str, int] = {}
        self.resumed = False  # open() found an earlier run's partial: worth re-verifying

    def open(self) -> None:
        self.resumed = self.path.exists()
        make_dirs(self.path)
        for f in self.manifest.files:
            p = self.path / f.path
            make_dirs(p.parent)
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
            tighten(fd)
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
                raise os_error(e, self.kind, self.store.tier_root(self.kind)) from None
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
            with open_source(sources[f.path]) as fin:
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
            raise os_error(e, self.kind, self.store.tier_root(self.kind)) from None

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
            raise os_error(e, self.kind, self.store.tier_root(self.kind)) from None
        except BaseException:
            self.discard()
            raise

