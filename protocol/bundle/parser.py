"""Reading a bundle: ``BundleParser``, a sans-IO state machine (h11's shape).
Bytes in, in pieces of any size; events out (``Header``, ``Chunk``,
``Sums``, ``End``).  The rules it checks and the bounds it keeps: the
theory of operation in ``protocol.bundle``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .header import (
    HEADER_MAX_BYTES,
    HEADER_NAME,
    BadBundle,
    BundleHeader,
    BundleTruncated,
    file_entry_name,
    parse_sums,
    sums_bytes,
    sums_entry_name,
)
from .tar import BLOCK, PAX_RECORD_MAX, parse_block, parse_pax, pax_int

__all__ = ["TRAILER_MAX_BYTES", "BundleParser", "Chunk", "End", "Event", "Header", "Sums"]

TRAILER_MAX_BYTES = 1024 * 1024  # zero bytes after the end that a reader still takes (tar pads to records)


# -- events --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    header: BundleHeader


@dataclass(frozen=True, slots=True)
class Chunk:
    """Chunk ``index`` of model ``model`` (its place in the header), whole: not yet verified."""

    model: int
    index: int
    data: bytearray


@dataclass(frozen=True, slots=True)
class Sums:
    model: int
    sums: dict[str, str]


@dataclass(frozen=True, slots=True)
class End:
    pass


Event = Header | Chunk | Sums | End


# -- the machine ---------------------------------------------------------------------------


class _State(enum.Enum):
    BLOCK = "a tar header"  # waiting for a header block (or the end)
    DATA = "an entry's bytes"
    PAD = "an entry's padding"
    TRAILER = "the end of the archive"
    DONE = "nothing more"


@dataclass
class _Entry:
    name: str
    size: int
    kind: str  # "header", "file", "sums", "pax", "skip"
    left: int = 0
    buf: bytearray = field(default_factory=bytearray)


class BundleParser:
    """Bytes in, events out.  ``feed(data)`` any number of times, then ``close()``.

    After a ``BadBundle`` the parser is spent: every later call raises it again.
    """

    def __init__(self) -> None:
        self.header: BundleHeader | None = None
        self.bytes_in = 0
        self._state = _State.BLOCK
        self._block = bytearray()
        self._entry: _Entry | None = None
        self._pad = 0
        self._pax: dict[str, str] = {}
        self._zeros = 0  # zero blocks seen where a header was expected
        self._trailer = 0
        self._ended = False
        self._error: BadBundle | None = None
        # where the next file entry is: model, file, and chunk within the model
        self._model = 0
        self._file = 0
        self._chunk = 0
        self._chunk_buf = bytearray()
        self._chunk_want = 0

    # -- the public face --

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self._error is not None:
            raise self._error
        try:
            return self._feed(memoryview(data).cast("B"))
        except BadBundle as e:
            self._error = e
            raise

    def close(self) -> list[Event]:
        """The input ended: ``[End()]`` when the bundle did, else ``BundleTruncated``."""
        if self._error is not None:
            raise self._error
        if self._state is _State.DONE:
            if self._ended:
                return []
            self._ended = True
            return [End()]
        self._error = BundleTruncated(f"the bundle stops after {self.bytes_in} bytes, in {self._where()}")
        raise self._error

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def _where(self) -> str:
        if self.header is None:
            return "its header"
        if self._model >= len(self.header.models):
            return "its end"
        m = self.header.models[self._model]
        files = m.manifest.files
        if self._file < len(files):
            return f"{m.name}'s file {files[self._file].path[:100]!r}"
        return f"{m.name}'s sums"

    # -- the machine --

    def _feed(self, view: memoryview) -> list[Event]:
        events: list[Event] = []
        pos, n = 0, len(view)
        self.bytes_in += n
        while pos < n:
            st = self._state
            if st is _State.BLOCK or st is _State.TRAILER:
                take = min(BLOCK - len(self._block), n - pos)
                self._block += view[pos:pos + take]
                pos += take
                if len(self._block) == BLOCK:
                    block, self._block = bytes(self._block), bytearray()
                    self._on_block(block, events)
            elif st is _State.DATA:
                e = self._entry
                assert e is not None
                take = min(e.left, n - pos)
                self._on_data(e, view[pos:pos + take], events)
                pos += take
                e.left -= take
                if e.left == 0:
                    self._entry_done(e, events)
                    self._pad = -e.size % BLOCK
                    self._state = _State.PAD if self._pad else _State.BLOCK
            elif st is _State.PAD:
                take = min(self._pad, n - pos)
                if any(view[pos:pos + take]):
                    raise BadBundle("an entry's padding is not zeros")
                pos += take
                self._pad -= take
                if self._pad == 0:
                    self._state = _State.BLOCK
            else:
                self._trailer += n - pos
                if self._trailer > TRAILER_MAX_BYTES:
                    raise BadBundle(f"more than {TRAILER_MAX_BYTES} bytes follow the end of the bundle")
                if view[pos:].tobytes().strip(b"\0"):
                    raise BadBundle("bytes follow the end of the bundle")
                pos = n
        return events

    def _on_block(self, block: bytes, events: list[Event]) -> None:
        if block == bytes(BLOCK):
            self._zeros += 1
            if not self._expecting_end():
                raise BadBundle(f"the archive ends before {self._where()}")
            self._state = _State.TRAILER
            if self._zeros >= 2:
                self._state = _State.DONE  # what follows is only checked to be zeros
                self._trailer = 0
            return
        if self._state is _State.TRAILER:
            raise BadBundle("an entry follows the end of the archive")
        name, size, typeflag = parse_block(block)
        pax, self._pax = self._pax, {}
        if "path" in pax:
            name = pax["path"]
        if "size" in pax:
            size = pax_int(pax["size"])
        if typeflag in (b"x", b"g"):
            if size > PAX_RECORD_MAX:
                raise BadBundle(f"a pax header of {size} bytes")
            self._start(_Entry(name, size, "pax" if typeflag == b"x" else "skip"), events)
            return
        if typeflag == b"5" and size == 0:  # a directory (a bundle repacked by tar): nothing to take
            return
        if typeflag not in (b"0", b"\0"):
            raise BadBundle(f"entry {name[:100]!r} is not a regular file (type {typeflag!r})")
        self._start(self._expected(name, size), events)

    def _expecting_end(self) -> bool:
        h = self.header
        return h is not None and self._model >= len(h.models) and not self._pax

    def _expected(self, name: str, size: int) -> _Entry:
        """The entry ``name`` must be the one the header says comes next."""
        h = self.header
        if h is None:
            if name != HEADER_NAME:
                raise BadBundle(f"a bundle starts with {HEADER_NAME}, not {name[:100]!r}")
            if size > HEADER_MAX_BYTES:
                raise BadBundle(f"the bundle's header is {size} bytes, over {HEADER_MAX_BYTES}")
            return _Entry(name, size, "header")
        if self._model >= len(h.models):
            raise BadBundle(f"entry {name[:100]!r} follows the last model's sums")
        m = h.models[self._model]
        files = m.manifest.files
        if self._file < len(files):
            f = files[self._file]
            want = file_entry_name(m.name, m.manifest.hash, f.path)
            if name != want or size != f.size:
                raise BadBundle(f"expected {want[:200]!r} of {f.size} bytes, found {name[:200]!r} of {size}")
            return _Entry(name, size, "file")
        want = sums_entry_name(m.name, m.manifest.hash)
        if name != want or size != sums_bytes(m.manifest):
            raise BadBundle(f"expected {want[:200]!r} of {sums_bytes(m.manifest)} bytes, found {name[:200]!r} "
                            f"of {size}")
        return _Entry(name, size, "sums")

    def _start(self, e: _Entry, events: list[Event]) -> None:
        e.left = e.size
        self._entry = e
        if e.kind == "file":
            self._next_chunk()
        if e.size == 0:
            self._entry_done(e, events)
            self._state = _State.BLOCK
        else:
            self._state = _State.DATA

    def _next_chunk(self) -> None:
        """Size the buffer for the next chunk of the current file (none for an empty file)."""
        assert self.header is not None
        m = self.header.models[self._model].manifest
        f = m.files[self._file]
        chunks = m.file_chunks(f.path)
        self._chunk_want = m.chunk(self._chunk).length if self._chunk in chunks else 0
        self._chunk_buf = bytearray()

    def _on_data(self, e: _Entry, piece: memoryview, events: list[Event]) -> None:
        if e.kind != "file":
            if e.kind != "skip":
                e.buf += piece
            return
        while piece:
            if not self._chunk_want:  # cannot be: a file's chunks cover its size exactly
                raise BadBundle(f"{e.name[:100]!r} runs past its last chunk")
            take = min(self._chunk_want - len(self._chunk_buf), len(piece))
            self._chunk_buf += piece[:take]
            piece = piece[take:]
            if len(self._chunk_buf) == self._chunk_want:
                events.append(Chunk(self._model, self._chunk, self._chunk_buf))
                self._chunk += 1
                self._next_chunk()

    def _entry_done(self, e: _Entry, events: list[Event]) -> None:
        self._entry = None
        if e.kind == "pax":
            self._pax = parse_pax(bytes(e.buf))
        elif e.kind == "header":
            self.header = BundleHeader.decode(bytes(e.buf))
            events.append(Header(self.header))
        elif e.kind == "file":
            self._file += 1
        elif e.kind == "sums":
            assert self.header is not None
            m = self.header.models[self._model]
            events.append(Sums(self._model, parse_sums(m.manifest, bytes(e.buf))))
            self._model += 1
            self._file = 0
            self._chunk = 0
