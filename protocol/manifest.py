"""Manifests: what a model copy is made of, chunk by chunk.

Theory of operation
-------------------
A model copy is a set of files.  Its manifest lists, for every file, the
POSIX relative path, the size in bytes, and the xxh3-128 digest (16 raw
bytes) of every fixed-size chunk of that file.  All chunks of a manifest
have the same ``chunk_bytes`` except the last chunk of each file, which may
be short; an empty file has no chunk at all.  Every file starts on a chunk
boundary, so no chunk ever spans two files and a chunk is verified, written
and served on its own.  Chunks are numbered globally, in file order::

    files:   a.bin (2.5 chunks)     b.bin (0 bytes)   c.bin (1 chunk)
    chunks:  [0][1][2 short]                          [3]

``Manifest.chunk(i)`` maps a global index to ``(path, offset, length,
digest)`` by bisecting the precomputed first-chunk index of every file, so
it costs O(log files).

Files are kept sorted by path (Python's code point order), paths are
unique, and no file path is a directory of another one (``a`` and ``a/b``
cannot both be files).  Those rules make the manifest a *canonical* value:
one model copy has exactly one manifest, and its msgpack encoding
(``encode()``) is byte-for-byte reproducible.  The manifest's identity,
``Manifest.hash``, is the hex xxh3-128 of that encoding; two copies on two
nodes are the same model exactly when their hashes match.  The wire form is::

    {"v": 1, "chunk_bytes": int, "files": [[path, size, digests], ...]}

where ``digests`` is one binary string: the file's chunk digests
concatenated (16 bytes each).  That is compact and decodes in one slice per
chunk instead of one msgpack object per chunk.

``Manifest.decode`` takes bytes from a peer and checks *everything* (size of
the raw bytes, every type, every bound, the path rules, the digest counts,
and the hash against the one we asked for) before a ``Manifest`` exists.
Any problem raises ``RemoteProtocolError``, never another exception type.
Constructing a ``Manifest`` or using ``ManifestBuilder`` with bad values
locally raises ``LocalProtocolError`` (``InvalidName`` for paths).

This module is pure: it hashes bytes handed to it and never touches a file.
The I/O layer reads files, digests their chunks with ``chunk_digest`` and
feeds a ``ManifestBuilder``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import xxhash

from .errors import InvalidName, LocalProtocolError, RemoteProtocolError

__all__ = [
    "CHUNK_BYTES_CEIL",
    "CHUNK_BYTES_FLOOR",
    "CHUNK_MAX_BYTES",
    "CHUNK_MIN_BYTES",
    "DIGEST_BYTES",
    "FILE_MAX_BYTES",
    "MANIFEST_MAX_BYTES",
    "MANIFEST_MAX_CHUNKS",
    "MANIFEST_MAX_FILES",
    "MANIFEST_VERSION",
    "PATH_MAX_CHARS",
    "PATH_MAX_SEGMENTS",
    "SEGMENT_MAX_BYTES",
    "TARGET_CHUNKS",
    "ChunkIndexError",
    "ChunkRef",
    "FileEntry",
    "Manifest",
    "ManifestBuilder",
    "UnknownFile",
    "choose_chunk_bytes",
    "chunk_digest",
    "file_digests",
    "manifest_from_bytes",
    "validate_rel_path",
]

MANIFEST_VERSION = 1
DIGEST_BYTES = 16

CHUNK_MIN_BYTES = 1024 * 1024
"""Smallest chunk ``choose_chunk_bytes`` picks.

Why 1 MiB and not the anchors' 4 MiB: a swarm of ``r`` receivers loses about
``r / n_chunks`` of S/B at its start (the first chunks leave the seed at
B/r each before anyone can pass one on) and again in its endgame, so a
model should have about ``TARGET_CHUNKS`` chunks however small it is.  With
a 4 MiB floor a 256 MiB model had 64 chunks and its 6-receiver swarm took
1.26 to 1.36 x S/B; with 1 MiB chunks, 256 of them, 1.19 to 1.20 x
(``bench/swarm_netns.py``).  Each chunk costs a request, a digest call and
a write, well under a millisecond, so the at most ~256 chunks of a model
below 16 GiB add a fraction of a second to a transfer."""
CHUNK_MAX_BYTES = 64 * 1024 * 1024
"""Largest chunk ``choose_chunk_bytes`` picks."""
CHUNK_BYTES_FLOOR = 64 * 1024
"""Smallest chunk size a manifest may declare (small ones keep tests fast)."""
CHUNK_BYTES_CEIL = 1024 * 1024 * 1024
"""Largest chunk size a manifest may declare."""
TARGET_CHUNKS = 256

FILE_MAX_BYTES = 2**50 - 1
MANIFEST_MAX_BYTES = 16 * 1024 * 1024
MANIFEST_MAX_CHUNKS = 2**20
MANIFEST_MAX_FILES = 100_000

PATH_MAX_CHARS = 1024
PATH_MAX_SEGMENTS = 32
SEGMENT_MAX_BYTES = 255


class ChunkIndexError(LocalProtocolError, IndexError):
    """A chunk index outside ``range(manifest.n_chunks)``."""


class UnknownFile(LocalProtocolError, KeyError):
    """A path the manifest does not list."""


# -- small pure helpers -----------------------------------------------------


def choose_chunk_bytes(total_bytes: int) -> int:
    """A power-of-two chunk size giving about ``TARGET_CHUNKS`` chunks.

    The smallest power of two that cuts ``total_bytes`` into at most
    ``TARGET_CHUNKS`` chunks, clamped to ``[CHUNK_MIN_BYTES, CHUNK_MAX_BYTES]``.
    Monotone non-decreasing in ``total_bytes``.
    """
    if not isinstance(total_bytes, int) or isinstance(total_bytes, bool) or total_bytes < 0:
        raise LocalProtocolError(f"total_bytes must be an int >= 0, got {_short(total_bytes)}")
    per_chunk = max(1, -(-total_bytes // TARGET_CHUNKS))
    size = 1 << (per_chunk - 1).bit_length()
    return min(CHUNK_MAX_BYTES, max(CHUNK_MIN_BYTES, size))


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The 16-byte xxh3-128 digest of one chunk."""
    return xxhash.xxh3_128(data).digest()


def file_digests(data: bytes | bytearray | memoryview, chunk_bytes: int) -> tuple[bytes, ...]:
    """Digests of every chunk of one file held in memory (tests, small files)."""
    _check_chunk_bytes(chunk_bytes, LocalProtocolError)
    view = memoryview(data)
    return tuple(
        chunk_digest(view[off : off + chunk_bytes]) for off in range(0, len(view), chunk_bytes)
    )


def _short(value: object) -> str:
    """A bounded description of a bad value for an error message."""
    try:
        return repr(value)[:40]
    except Exception:  # ints past the str conversion limit, odd objects
        return f"<{type(value).__name__}>"


def _n_chunks_of(size: int, chunk_bytes: int) -> int:
    return -(-size // chunk_bytes)


def _check_chunk_bytes(chunk_bytes: object, err: type[Exception]) -> int:
    if (
        not isinstance(chunk_bytes, int)
        or isinstance(chunk_bytes, bool)
        or not CHUNK_BYTES_FLOOR <= chunk_bytes <= CHUNK_BYTES_CEIL
        or chunk_bytes & (chunk_bytes - 1)
    ):
        raise err(
            f"chunk_bytes must be a power of two in [{CHUNK_BYTES_FLOOR}, {CHUNK_BYTES_CEIL}],"
            f" got {_short(chunk_bytes)}"
        )
    return chunk_bytes


def validate_rel_path(path: str) -> str:
    """Return ``path`` if it is a safe POSIX relative path, else raise ``InvalidName``.

    Rejected: non-strings, empty paths, absolute paths, ``.``/``..``/empty
    segments (``a//b``, a trailing ``/``), backslashes, control characters
    (C0, DEL, C1, NUL included), text that is not encodable as UTF-8 (lone
    surrogates), segments over ``SEGMENT_MAX_BYTES`` UTF-8 bytes, paths over
    ``PATH_MAX_CHARS`` characters or ``PATH_MAX_SEGMENTS`` segments.
    """
    if not isinstance(path, str):
        raise InvalidName("path must be a string")
    if not path:
        raise InvalidName("path is empty")
    if len(path) > PATH_MAX_CHARS:
        raise InvalidName(f"path is longer than {PATH_MAX_CHARS} characters")
    if path.startswith("/"):
        raise InvalidName("path must be relative")
    if "\\" in path:
        raise InvalidName("path must not contain a backslash")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in path):
        raise InvalidName("path contains control characters")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidName("path is not valid UTF-8 text") from None
    segments = path.split("/")
    if len(segments) > PATH_MAX_SEGMENTS:
        raise InvalidName(f"path has more than {PATH_MAX_SEGMENTS} segments")
    for seg in segments:
        if seg in ("", ".", ".."):
            raise InvalidName(f"path has an empty or relative segment: {path[:80]!r}")
        if len(seg.encode("utf-8")) > SEGMENT_MAX_BYTES:
            raise InvalidName(f"path segment longer than {SEGMENT_MAX_BYTES} bytes")
    return path


# -- values -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a model copy.

    ``len(digests) == ceil(size / chunk_bytes)`` is checked by ``Manifest``
    (the entry does not know the chunk size); ``check(chunk_bytes)`` runs it.
    """

    path: str
    size: int
    digests: tuple[bytes, ...]

    def __post_init__(self) -> None:
        validate_rel_path(self.path)
        if (
            not isinstance(self.size, int)
            or isinstance(self.size, bool)
            or not 0 <= self.size <= FILE_MAX_BYTES
        ):
            raise LocalProtocolError(
                f"file size must be an int in [0, 2**50), got {_short(self.size)}"
            )
        if not isinstance(self.digests, tuple):
            raise LocalProtocolError("digests must be a tuple of bytes")
        for d in self.digests:
            if type(d) is not bytes or len(d) != DIGEST_BYTES:
                raise LocalProtocolError(f"every digest must be {DIGEST_BYTES} bytes")

    def check(self, chunk_bytes: int) -> None:
        expected = _n_chunks_of(self.size, chunk_bytes)
        if len(self.digests) != expected:
            raise LocalProtocolError(
                f"{self.path!r}: {self.size} bytes in chunks of {chunk_bytes} need"
                f" {expected} digests, got {len(self.digests)}"
            )


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """Where global chunk ``index`` lives: ``length`` bytes at ``offset`` in ``path``."""

    index: int
    path: str
    offset: int
    length: int
    digest: bytes


def _check_layout(files: tuple[FileEntry, ...], chunk_bytes: int) -> None:
    """Sorted, unique, no file under another file, digest counts, bounds."""
    if len(files) > MANIFEST_MAX_FILES:
        raise LocalProtocolError(f"more than {MANIFEST_MAX_FILES} files")
    prev: str | None = None
    n_chunks = 0
    for f in files:
        if not isinstance(f, FileEntry):
            raise LocalProtocolError("files must be FileEntry values")
        if prev is not None and f.path <= prev:
            what = "listed twice" if f.path == prev else "out of order (files are sorted by path)"
            raise LocalProtocolError(f"file {f.path[:80]!r} is {what}")
        prev = f.path
        f.check(chunk_bytes)
        n_chunks += len(f.digests)
        if n_chunks > MANIFEST_MAX_CHUNKS:
            raise LocalProtocolError(f"more than {MANIFEST_MAX_CHUNKS} chunks")
    paths = {f.path for f in files}
    for f in files:
        idx = f.path.find("/")
        while idx != -1:
            if f.path[:idx] in paths:
                raise LocalProtocolError(
                    f"{f.path[:idx][:80]!r} is both a file and a directory of {f.path[:80]!r}"
                )
            idx = f.path.find("/", idx + 1)


@dataclass(frozen=True, slots=True)
class Manifest:
    """An immutable, validated manifest.  See the module docstring."""

    chunk_bytes: int
    files: tuple[FileEntry, ...]
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _paths: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _n_chunks: int = field(init=False, repr=False, compare=False)
    _total_bytes: int = field(init=False, repr=False, compare=False)
    _encoded: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _hash: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_chunk_bytes(self.chunk_bytes, LocalProtocolError)
        if not isinstance(self.files, tuple):
            raise LocalProtocolError("files must be a tuple of FileEntry")
        _check_layout(self.files, self.chunk_bytes)
        starts: list[int] = []
        n = 0
        total = 0
        for f in self.files:
            starts.append(n)
            n += len(f.digests)
            total += f.size
        object.__setattr__(self, "_starts", tuple(starts))
        object.__setattr__(self, "_paths", tuple(f.path for f in self.files))
        object.__setattr__(self, "_n_chunks", n)
        object.__setattr__(self, "_total_bytes", total)

    # -- sizes and identity --

    @property
    def total_bytes(self) -> int:
        return self._total_bytes

    @property
    def n_chunks(self) -> int:
        return self._n_chunks

    @property
    def hash(self) -> str:
        """Hex xxh3-128 of the canonical encoding: the copy's identity."""
        h = self._hash
        if h is None:
            h = xxhash.xxh3_128(self.encode()).hexdigest()
            object.__setattr__(self, "_hash", h)
        return h

    # -- chunk lookup --

    def chunk(self, index: int) -> ChunkRef:
        """Global chunk ``index`` -> its file, offset, length and digest.  O(log files)."""
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < self._n_chunks:
            raise ChunkIndexError(f"chunk index {_short(index)} outside [0, {self._n_chunks})")
        # The last file whose first chunk is <= index.  Empty files share their
        # start with the next file, so bisect_right skips them.
        fi = bisect.bisect_right(self._starts, index) - 1
        return self._ref(fi, index)

    def _ref(self, fi: int, index: int) -> ChunkRef:
        f = self.files[fi]
        local = index - self._starts[fi]
        offset = local * self.chunk_bytes
        return ChunkRef(
            index=index,
            path=f.path,
            offset=offset,
            length=min(self.chunk_bytes, f.size - offset),
            digest=f.digests[local],
        )

    def chunks(self) -> Iterator[ChunkRef]:
        """Every chunk in global order."""
        for fi, f in enumerate(self.files):
            start = self._starts[fi]
            for local in range(len(f.digests)):
                yield self._ref(fi, start + local)

    def file_chunks(self, path: str) -> range:
        """The global chunk indexes of one file (empty for an empty file)."""
        fi = self._file_index(path)
        start = self._starts[fi]
        return range(start, start + len(self.files[fi].digests))

    def _file_index(self, path: str) -> int:
        if not isinstance(path, str):
            raise UnknownFile("file paths are strings")
        fi = bisect.bisect_left(self._paths, path)
        if fi == len(self._paths) or self._paths[fi] != path:
            raise UnknownFile(f"no file {str(path)[:80]!r} in this manifest")
        return fi

    def file(self, path: str) -> FileEntry:
        """The entry for ``path``; ``UnknownFile`` when it is not listed."""
        return self.files[self._file_index(path)]

    def verify(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        """True when ``data`` is exactly chunk ``index`` (length and digest)."""
        ref = self.chunk(index)
        return len(data) == ref.length and chunk_digest(data) == ref.digest

    # -- wire --

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": MANIFEST_VERSION,
            "chunk_bytes": self.chunk_bytes,
            "files": [[f.path, f.size, b"".join(f.digests)] for f in self.files],
        }

    def encode(self) -> bytes:
        """The canonical msgpack encoding (cached)."""
        enc = self._encoded
        if enc is None:
            enc = msgpack.packb(self.to_wire(), use_bin_type=True)
            assert isinstance(enc, bytes)
            object.__setattr__(self, "_encoded", enc)
        return enc

    @classmethod
    def decode(
        cls,
        data: bytes | bytearray | memoryview,
        *,
        max_bytes: int = MANIFEST_MAX_BYTES,
        expected_hash: str | None = None,
    ) -> Manifest:
        """Decode and validate a manifest received from a peer.

        Any problem, including a hash that differs from ``expected_hash``:
        ``RemoteProtocolError``.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise RemoteProtocolError("manifest is not bytes")
        if len(data) > max_bytes:
            raise RemoteProtocolError(
                f"manifest of {len(data)} bytes is over the {max_bytes} byte limit"
            )
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        except Exception as e:  # msgpack raises several unrelated types
            raise RemoteProtocolError(f"undecodable manifest ({type(e).__name__})") from None
        try:
            m = _from_wire(raw)
        except RemoteProtocolError:
            raise
        except LocalProtocolError as e:  # InvalidName and layout rules
            raise RemoteProtocolError(f"invalid manifest: {e}") from None
        if expected_hash is not None and m.hash != expected_hash:
            raise RemoteProtocolError(
                f"manifest hash {m.hash} does not match the expected {_short(expected_hash)}"
            )
        return m


def _from_wire(raw: object) -> Manifest:
    if not isinstance(raw, dict):
        raise RemoteProtocolError("manifest is not a map")
    if set(raw) != {"v", "chunk_bytes", "files"}:
        raise RemoteProtocolError("manifest must have exactly the keys v, chunk_bytes, files")
    if type(raw["v"]) is not int or raw["v"] != MANIFEST_VERSION:
        raise RemoteProtocolError(f"unsupported manifest version {_short(raw['v'])}")
    chunk_bytes = _check_chunk_bytes(raw["chunk_bytes"], RemoteProtocolError)
    files_raw = raw["files"]
    if not isinstance(files_raw, list):
        raise RemoteProtocolError("manifest files is not a list")
    if len(files_raw) > MANIFEST_MAX_FILES:
        raise RemoteProtocolError(f"manifest lists more than {MANIFEST_MAX_FILES} files")
    files: list[FileEntry] = []
    n_chunks = 0
    for item in files_raw:
        if not isinstance(item, list) or len(item) != 3:
            raise RemoteProtocolError("manifest file entry is not [path, size, digests]")
        path, size, blob = item
        if not isinstance(path, str):
            raise RemoteProtocolError("file path is not a string")
        if type(size) is not int or not 0 <= size <= FILE_MAX_BYTES:
            raise RemoteProtocolError(f"file size {_short(size)} outside [0, 2**50)")
        if not isinstance(blob, bytes):
            raise RemoteProtocolError("file digests are not a binary string")
        expected = _n_chunks_of(size, chunk_bytes)
        if len(blob) != expected * DIGEST_BYTES:
            raise RemoteProtocolError(
                f"file of {size} bytes needs {expected} digests of {DIGEST_BYTES} bytes,"
                f" got {len(blob)} bytes"
            )
        n_chunks += expected
        if n_chunks > MANIFEST_MAX_CHUNKS:
            raise RemoteProtocolError(f"manifest has more than {MANIFEST_MAX_CHUNKS} chunks")
        digests = tuple(blob[i : i + DIGEST_BYTES] for i in range(0, len(blob), DIGEST_BYTES))
        files.append(FileEntry(path, size, digests))
    return Manifest(chunk_bytes, tuple(files))


# -- building ---------------------------------------------------------------


class ManifestBuilder:
    """Collects files in any order and builds a canonical ``Manifest``.

    The I/O layer reads each file, digests its chunks with ``chunk_digest``
    and calls ``add_file``; ``build`` sorts and checks the whole set.
    """

    __slots__ = ("_chunk_bytes", "_files", "_n_chunks")

    def __init__(self, chunk_bytes: int) -> None:
        self._chunk_bytes = _check_chunk_bytes(chunk_bytes, LocalProtocolError)
        self._files: dict[str, FileEntry] = {}
        self._n_chunks = 0

    @property
    def chunk_bytes(self) -> int:
        return self._chunk_bytes

    def __len__(self) -> int:
        return len(self._files)

    def add_file(self, path: str, size: int, digests: Iterable[bytes]) -> FileEntry:
        """Add one file; raises ``InvalidName`` / ``LocalProtocolError`` on bad input."""
        entry = FileEntry(path, size, tuple(digests))
        entry.check(self._chunk_bytes)
        if path in self._files:
            raise LocalProtocolError(f"file {path[:80]!r} added twice")
        if len(self._files) >= MANIFEST_MAX_FILES:
            raise LocalProtocolError(f"more than {MANIFEST_MAX_FILES} files")
        if self._n_chunks + len(entry.digests) > MANIFEST_MAX_CHUNKS:
            raise LocalProtocolError(f"more than {MANIFEST_MAX_CHUNKS} chunks")
        self._files[path] = entry
        self._n_chunks += len(entry.digests)
        return entry

    def build(self) -> Manifest:
        files = tuple(self._files[p] for p in sorted(self._files))
        return Manifest(self._chunk_bytes, files)


def manifest_from_bytes(files: Mapping[str, bytes], chunk_bytes: int) -> Manifest:
    """A manifest for in-memory file contents (tests and tools)."""
    b = ManifestBuilder(chunk_bytes)
    for path, data in files.items():
        b.add_file(path, len(data), file_digests(data, chunk_bytes))
    return b.build()
