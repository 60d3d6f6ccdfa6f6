"""Durable node state in the data directory.

Two files (``StateFile``): ``state.msgpack``, a snapshot of our node id, the
generation we last ran as, the HLC high-water mark, our own catalog keys and
the addresses of the members we knew, written atomically (a temporary file
in the same directory, fsync, rename over the old file, fsync of the
directory); and ``state.log``, the own keys that changed since, appended and
fsynced, folded into a new snapshot once it outgrows the last.  So a write
costs what it wrote, and ``kill -9`` at any moment loses nothing
acknowledged and leaves nothing torn that is read back.

A state file that cannot be read is moved aside (``state.msgpack.corrupt-<ms>``)
and the node starts from its peers; it says so in the log.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from protocol.errors import InvalidName
from protocol.names import validate_address
from protocol.wire import encoded_size

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "LOG_NAME",
    "DataDirError",
    "DataDirLock",
    "OwnKeysJournal",
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


LOG_NAME = "state.log"
_FRAME = struct.Struct("!II")  # payload length, crc32 of the payload
LOG_BATCH_BYTES = 4 << 20  # an append is cut into records of about this size
LOG_RECORD_MAX = 64 << 20  # a record bigger than this is damage, not data


class StateFile:
    """The node's own state: a snapshot and a log of what changed since.

    ``state.msgpack`` is a snapshot (written whole, atomically): node id,
    generation, HLC high-water mark, our own catalog keys, the peers we knew.
    ``state.log`` is appended to: framed records (length, crc32, msgpack),
    each a batch of own keys as they changed with the generation and HLC mark
    of the moment (``["b", generation, hlc_wall_ms, [[key, value, tombstone],
    ...]]``); one append is one record (a large one is cut into several), so
    a write of several keys is replayed whole or not at all.  A write
    costs what it wrote, not what the node holds; when the log outgrows the
    snapshot (and 1 MiB) it is folded into a new snapshot, so space and load
    time stay bounded.

    Loading reads the snapshot, then the log in order; a record cut short by
    a crash (or failing its checksum) ends the log there, and what follows is
    dropped.  A snapshot that cannot be read is moved aside and the node
    starts from its peers.  An append that fails (a full disk) is cut back to
    where the log was, so nothing half-written stays.
    """

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        self.path = data_dir / STATE_NAME
        self.log_path = data_dir / LOG_NAME
        self.snapshot_bytes = 0
        self.log_bytes = 0

    # -- loading ---------------------------------------------------------------

    def load(self, node_id: str) -> SavedState | None:
        """The saved state, or None if there is none (or it was unusable and moved aside)."""
        state = self._load_snapshot()
        if state is not None and state.node_id != node_id:
            raise DataDirError(
                f"data dir {self.dir} belongs to node {state.node_id!r}, not {node_id!r}; "
                "use that node id or another data dir"
            )
        records = self._read_log()
        if not records:
            return state
        if state is None:
            state = SavedState(node_id=node_id, generation=0)
        own = state.catalog.setdefault(
            node_id, {"generation": state.generation, "max_version": 0, "last_gc_version": 0, "entries": []}
        )
        entries = {e[0]: e for e in own.get("entries") or []}
        version = int(own.get("max_version") or 0)
        for _, generation, hlc_wall_ms, batch in records:
            state.generation = max(state.generation, generation)
            state.hlc_wall_ms = max(state.hlc_wall_ms, hlc_wall_ms)
            for key, value, tomb in batch:
                version += 1
                entries[key] = [key, version, None if tomb else value, tomb]
        own["entries"] = list(entries.values())
        own["max_version"] = version
        return state

    def _load_snapshot(self) -> SavedState | None:
        try:
            raw_bytes = self.path.read_bytes()
        except FileNotFoundError:
            return None
        self.snapshot_bytes = len(raw_bytes)
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
            stamp = int(time.time() * 1000)
            aside = self.dir / f"{STATE_NAME}.corrupt-{stamp}"
            os.replace(self.path, aside)
            if self.log_path.exists():  # the log is relative to that snapshot: keep it beside it
                os.replace(self.log_path, self.dir / f"{LOG_NAME}.corrupt-{stamp}")
            log.error(
                "state file %s is corrupt (%s: %s); kept a copy at %s and starting from peers",
                self.path, type(e).__name__, str(e)[:200], aside.name,
            )
            return None
        return state

    def _read_log(self) -> list[list[Any]]:
        """The log's whole records, in order; a torn or corrupt tail is cut off (on disk too)."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            self.log_bytes = 0
            return []
        out: list[list[Any]] = []
        pos = 0
        while pos + _FRAME.size <= len(data):
            length, crc = _FRAME.unpack_from(data, pos)
            payload = data[pos + _FRAME.size : pos + _FRAME.size + length]
            if length > LOG_RECORD_MAX or len(payload) != length or zlib.crc32(payload) != crc:
                break
            try:
                rec = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            except Exception:  # msgpack raises several unrelated types; a torn tail ends the log
                break
            if not _is_record(rec):
                break
            out.append(rec)
            pos += _FRAME.size + length
        if pos != len(data):
            log.warning("state log %s ends with %d bytes of a cut-short write; dropped them", self.log_path, len(data) - pos)
            with open(self.log_path, "r+b") as f:
                f.truncate(pos)
                os.fsync(f.fileno())
        self.log_bytes = pos
        return out

    # -- writing ----------------------------------------------------------------

    def append(self, records: list[tuple[str, Any, bool]], generation: int, hlc_wall_ms: int) -> None:
        """Append own keys (``(key, value, tombstone)``) and the current
        generation and HLC mark, then fsync: durable when this returns.
        Blocking.  On an error the log is cut back to where it was and the
        error (``OSError``, ENOSPC for a full disk) is raised."""
        frames = []
        batch: list[list[Any]] = []
        size = 0
        for key, value, tomb in records:
            rec = [key, None if tomb else value, tomb]
            batch.append(rec)
            size += len(key) + 64 + (0 if tomb else encoded_size(value))
            if size > LOG_BATCH_BYTES:
                frames.append(_frame(["b", generation, hlc_wall_ms, batch]))
                batch, size = [], 0
        if batch or not frames:
            frames.append(_frame(["b", generation, hlc_wall_ms, batch]))
        data = b"".join(frames)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
        try:
            before = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fdatasync(fd)
            except OSError:
                os.ftruncate(fd, before)  # nothing half-written stays
                raise
        finally:
            os.close(fd)
        if before == 0:
            fsync_dir(self.dir)
        self.log_bytes = before + len(data)

    def needs_compaction(self) -> bool:
        return self.log_bytes > max(1 << 20, self.snapshot_bytes)

    def save(self, state: SavedState) -> None:
        """Write a whole snapshot, then empty the log (blocking: run it in a thread)."""
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
        self.snapshot_bytes = len(data)
        if self.log_bytes or self.log_path.exists():
            with open(self.log_path, "r+b") as f:
                f.truncate(0)
                os.fsync(f.fileno())
            self.log_bytes = 0


def _frame(rec: list[Any]) -> bytes:
    payload: bytes = msgpack.packb(rec, use_bin_type=True)
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _is_record(rec: Any) -> bool:
    return (
        isinstance(rec, list)
        and len(rec) == 4
        and rec[0] == "b"
        and isinstance(rec[1], int)
        and isinstance(rec[2], int)
        and isinstance(rec[3], list)
        and all(
            isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and isinstance(r[2], bool) for r in rec[3]
        )
    )


class OwnKeysJournal:
    """A catalog listener that remembers which of our own keys changed since
    they were last written to the log (each once, however often it changed)."""

    def __init__(self, own_id: str) -> None:
        self.own_id = own_id
        self._pending: dict[str, None] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def key_changed(self, node_id: str, key: str, value: Any | None) -> None:
        if node_id == self.own_id:
            self._pending[key] = None

    def node_cleared(self, node_id: str) -> None:
        pass  # our own keys are cleared only by a restore, which is on disk already

    def drain(self) -> list[str]:
        keys = list(self._pending)
        self._pending.clear()
        return keys

    def put_back(self, keys: list[str]) -> None:
        for k in keys:
            self._pending.setdefault(k, None)

    def discard(self, keys: list[str]) -> None:
        for k in keys:
            self._pending.pop(k, None)
