"""Durable node state in the data directory.

One file, ``state.msgpack``: our node id, the generation we last ran as, the
HLC high-water mark, our own catalog keys (with the rest of the catalog we
knew) and the addresses of the members we knew.  Written atomically: a
temporary file in the same directory, fsync, rename over the old file, fsync
of the directory.  So ``kill -9`` at any moment leaves either the old or the
new state, never a torn one.

A state file that cannot be read is moved aside (``state.msgpack.corrupt-<ms>``)
and the node starts from its peers; it says so in the log.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from protocol.errors import InvalidName
from protocol.names import validate_address

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "DataDirError",
    "DataDirLock",
    "SavedState",
    "StateFile",
    "atomic_write",
    "check_data_dir",
    "fsync_dir",
    "make_dirs",
    "remove_leftovers",
]

log = logging.getLogger("meshnode.persist")

FORMAT = 1
STATE_NAME = "state.msgpack"
STATE_MAX_BYTES = 512 * 1024 * 1024


# What the node writes is its own: the owner reads and writes, its group
# (an operator's) reads, nobody else anything.  Explicit on every file and
# directory the node makes, whatever the process umask.
FILE_MODE = 0o640
DIR_MODE = 0o750


def make_dirs(path: Path, mode: int = DIR_MODE) -> None:
    """``mkdir -p`` that makes every missing directory with ``mode`` (Python's
    own gives the parents the umask's defaults)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=mode)
        except FileExistsError:
            pass


class DataDirError(Exception):
    """The data directory cannot be used."""


@dataclass
class SavedState:
    node_id: str
    generation: int
    hlc_wall_ms: int = 0
    catalog: dict[str, Any] = field(default_factory=dict)
    peers: list[str] = field(default_factory=list)


def check_data_dir(path: Path) -> None:
    """Create the data dir if needed and prove we can write to it."""
    try:
        make_dirs(path)
        probe = path / f".write-test-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"ok")
                f.flush()
                os.fsync(f.fileno())
        finally:  # a full disk must not leave the probe behind
            probe.unlink(missing_ok=True)
    except OSError as e:
        raise DataDirError(
            f"data dir {path} is not usable: {e.strerror or e}; "
            "choose another with --data-dir or fix its permissions"
        ) from None


class DataDirLock:
    """One process per data dir: an exclusive ``flock`` on ``<data-dir>/lock``
    held while the node runs (the kernel drops it when the process dies, even
    by kill -9), so a second node on the same directory exits with a clear
    error instead of interleaving writes with the first."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise DataDirError(
                f"data dir {self.path.parent} is in use by another meshnode process (pid {holder}); "
                "stop it, or give this one its own --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def remove_leftovers(directory: Path) -> int:
    """Delete what an interrupted write of this node left in ``directory``
    (``.<name>.tmp-<pid>`` of ``atomic_write``, ``.write-test-<pid>``); call
    it only while holding the data dir's lock.  Returns how many."""
    removed = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith(".write-test-") or (name.startswith(".") and ".tmp-" in name):
            try:
                (directory / name).unlink()
                removed += 1
            except (IsADirectoryError, FileNotFoundError):
                continue
    return removed


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, durable: bool = True, mode: int = FILE_MODE) -> None:
    """Replace ``path`` with ``data`` all at once: a temp file beside it, then
    a rename.  ``durable``: fsync the file before and its directory after, so
    a power cut leaves the old or the new contents (blocking: run it in a
    thread on a hot path).  A failure leaves no temp file behind."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        with open(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def _is_address(text: str) -> bool:
    try:
        validate_address(text)
    except InvalidName:
        return False
    return True


class StateFile:
    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        self.path = data_dir / STATE_NAME

    def load(self, node_id: str) -> SavedState | None:
        """The saved state, or None if there is none (or it was unusable and moved aside)."""
        try:
            raw_bytes = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            if len(raw_bytes) > STATE_MAX_BYTES:
                raise ValueError("state file is too large")
            raw = msgpack.unpackb(raw_bytes, raw=False, strict_map_key=False)
            if not isinstance(raw, dict) or raw.get("format") != FORMAT:
                raise ValueError("unknown state format")
            state = SavedState(
                node_id=str(raw["node_id"]),
                generation=int(raw["generation"]),
                hlc_wall_ms=int(raw.get("hlc_wall_ms", 0)),
                catalog=dict(raw.get("catalog") or {}),
                peers=[str(p) for p in raw.get("peers") or []],
            )
            bad_peers = [p for p in state.peers if not _is_address(p)]
            if bad_peers:
                # Saved by an older version that took any address from a peer: never dial them.
                log.warning("dropping %d unusable peer addresses from the state file", len(bad_peers))
                state.peers = [p for p in state.peers if _is_address(p)]
        except Exception as e:
            aside = self.dir / f"{STATE_NAME}.corrupt-{int(time.time() * 1000)}"
            os.replace(self.path, aside)
            log.error(
                "state file %s is corrupt (%s: %s); kept a copy at %s and starting from peers",
                self.path, type(e).__name__, str(e)[:200], aside.name,
            )
            return None
        if state.node_id != node_id:
            raise DataDirError(
                f"data dir {self.dir} belongs to node {state.node_id!r}, not {node_id!r}; "
                "use that node id or another data dir"
            )
        return state

    def save(self, state: SavedState) -> None:
        """Atomically replace the state file (blocking: run it in a thread)."""
        data = msgpack.packb(
            {
                "format": FORMAT,
                "node_id": state.node_id,
                "generation": state.generation,
                "hlc_wall_ms": state.hlc_wall_ms,
                "catalog": state.catalog,
                "peers": state.peers,
            },
            use_bin_type=True,
        )
        atomic_write(self.path, data, mode=0o600)
