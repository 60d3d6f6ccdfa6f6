"""Bundles: model copies as one tar stream, for clusters the internet does not reach.

Theory of operation
-------------------
A bundle is a POSIX tar stream (ustar, with pax records for long or
non-ASCII names and for files of 8 GiB and more), so ``tar tf`` lists it
and ``tar xf`` unpacks it.  Its entries come in one fixed order::

    meshnode-bundle.json                          the header: every model, first
    models/<model>/@<manifest hash>/<path>        every file of the first model, in manifest order
    models/<model>/@<manifest hash>.sha256        its files' sha256, as sha256sum prints them
    ...                                           the next model's files, then its sums
    (two zero blocks)                             the end of the archive

The header (JSON) names each model, its manifest (the canonical msgpack
encoding, base64: every file's path and size and the xxh3-128 of every
chunk), the manifest's hash, and the registration it had (model type,
source URL, metadata).  Because the manifest comes first, a reader verifies
every chunk as it arrives, before it is written; a file's sha256 cannot be
known before its bytes are read, so the sums follow the files (in
``sha256sum`` format: ``cd models/<model>/@<hash> && sha256sum -c
../@<hash>.sha256`` checks an unpacked bundle with no meshnode at all).
The paths mirror the store's layout (``<model>/@<hash>/...``): ``@`` is
in no model name, so no model's files can land inside another's.

``BundleParser`` is the reader, a sans-IO state machine (h11's shape): the
I/O layer feeds it the bytes as they arrive, in pieces of any size, and
gets events back: the ``Header``, each ``Chunk`` of each model once its
bytes are all there (the caller verifies and writes it), each model's
``Sums``, and ``End``.  It checks every structural rule as it goes (the
entry names and sizes the header implies, each tar header's checksum, the
sums' exact size and form, nothing but zeros after the end) and bounds
everything it holds: one chunk, the header (``HEADER_MAX_BYTES``), one
sums entry (its exact size, known from the manifest).  A problem is a
``BadBundle`` (a ``RemoteProtocolError``: the bytes came from outside);
input that stops before the end is ``BundleTruncated`` from ``close()``.

The writer is a handful of pure functions that return the bytes of each
entry's tar header and padding; ``bundle_bytes`` says how long the whole
stream will be before a byte is read, so a sender can announce it.
Nothing here reads a file or a clock: the caller passes ``mtime_s``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidName, LocalProtocolError, RemoteProtocolError
from .manifest import MANIFEST_MAX_BYTES, Manifest
from .names import validate_model_name
from .registry import InvalidInput, parse_registration

__all__ = [
    "BLOCK",
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "END_OF_ARCHIVE",
    "HEADER_MAX_BYTES",
    "HEADER_NAME",
    "MODELS_MAX",
    "BadBundle",
    "BundleHeader",
    "BundleModel",
    "BundleParser",
    "BundleTruncated",
    "Chunk",
    "End",
    "Event",
    "Header",
    "Sums",
    "bundle_bytes",
    "export_sources",
    "file_entry_name",
    "file_header",
    "header_entry",
    "padding",
    "parse_sums",
    "sums_bytes",
    "sums_entry",
    "sums_entry_name",
    "sums_text",
    "tar_header",
]

BUNDLE_FORMAT = "meshnode-bundle"
BUNDLE_VERSION = 1
HEADER_NAME = "meshnode-bundle.json"
MODELS_PREFIX = "models/"
MODELS_MAX = 64  # models in one bundle
# The header holds each model's manifest (at most MANIFEST_MAX_BYTES, base64: 4/3 of it).
HEADER_MAX_BYTES = 64 * 1024 * 1024
TRAILER_MAX_BYTES = 1024 * 1024  # zero bytes after the end that a reader still takes (tar pads to records)
BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
REGISTRATION_KEYS = frozenset({"model_type", "source_url", "metadata"})
_USTAR_SIZE_MAX = 8**11 - 1  # what 11 octal digits hold; beyond, the size goes in a pax record
_PAX_RECORD_MAX = 1 << 20
_SUM_LINE = re.compile(rb"([0-9a-f]{64})  (.+)\n")


class BadBundle(RemoteProtocolError):
    """The bytes are not a bundle this reader takes, or not the bundle they say they are."""


class BundleTruncated(BadBundle):
    """The stream stopped before the bundle's end."""


# -- the header --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BundleModel:
    """One model of a bundle: its name, its manifest, and the registration it had
    (``model_type``, ``source_url``, ``metadata``; None when it had none)."""

    name: str
    manifest: Manifest
    registration: Mapping[str, Any] | None = None

    @property
    def manifest_hash(self) -> str:
        return self.manifest.hash

    def to_value(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "manifest_hash": self.manifest.hash,
            "manifest": base64.b64encode(self.manifest.encode()).decode("ascii"),
            "total_bytes": self.manifest.total_bytes,
            "files": len(self.manifest.files),
            "registration": None if self.registration is None else dict(self.registration),
        }


@dataclass(frozen=True, slots=True)
class BundleHeader:
    """What a bundle holds, in the order its entries come."""

    models: tuple[BundleModel, ...]
    created_by: str = ""
    created_ms: int = 0

    def __post_init__(self) -> None:
        if not 1 <= len(self.models) <= MODELS_MAX:
            raise LocalProtocolError(f"a bundle holds 1 to {MODELS_MAX} models, not {len(self.models)}")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise LocalProtocolError("a bundle names each model once")

    @property
    def total_bytes(self) -> int:
        return sum(m.manifest.total_bytes for m in self.models)

    def encode(self) -> bytes:
        return json.dumps({"format": BUNDLE_FORMAT, "v": BUNDLE_VERSION, "created_by": self.created_by,
                           "created_ms": self.created_ms, "models": [m.to_value() for m in self.models]},
                          separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> BundleHeader:
        """The header a bundle's first entry holds; ``BadBundle`` for anything else."""
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError):
            raise BadBundle(f"{HEADER_NAME} is not JSON") from None
        if not isinstance(raw, dict) or raw.get("format") != BUNDLE_FORMAT:
            raise BadBundle(f"{HEADER_NAME} does not describe a {BUNDLE_FORMAT}")
        if raw.get("v") != BUNDLE_VERSION:
            raise BadBundle(f"bundle version {str(raw.get('v'))[:20]} is not one this node reads ({BUNDLE_VERSION})")
        models_raw = raw.get("models")
        if not isinstance(models_raw, list) or not 1 <= len(models_raw) <= MODELS_MAX:
            raise BadBundle(f"a bundle lists 1 to {MODELS_MAX} models")
        created_by, created_ms = raw.get("created_by", ""), raw.get("created_ms", 0)
        if not isinstance(created_by, str) or len(created_by) > 200:
            raise BadBundle("created_by is a short string")
        if type(created_ms) is not int or not 0 <= created_ms < 2**63:
            raise BadBundle("created_ms is a time in milliseconds")
        models = tuple(_model_of(m) for m in models_raw)
        try:
            return cls(models, created_by, created_ms)
        except LocalProtocolError as e:
            raise BadBundle(str(e)) from None


def _model_of(raw: Any) -> BundleModel:
    if not isinstance(raw, dict):
        raise BadBundle("each model of a bundle is an object")
    try:
        name = validate_model_name(raw.get("name"))
    except InvalidName as e:
        raise BadBundle(f"a model of the bundle: {e}") from None
    mhash, text = raw.get("manifest_hash"), raw.get("manifest")
    if not isinstance(mhash, str) or not isinstance(text, str) or len(text) > 2 * MANIFEST_MAX_BYTES:
        raise BadBundle(f"{name}: manifest_hash and manifest (base64) are strings")
    try:
        encoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadBundle(f"{name}: its manifest is not base64") from None
    try:
        manifest = Manifest.decode(encoded, expected_hash=mhash)
    except RemoteProtocolError as e:
        raise BadBundle(f"{name}: {e}") from None
    reg = raw.get("registration")
    if reg is not None:
        if not isinstance(reg, dict) or set(reg) - REGISTRATION_KEYS:
            raise BadBundle(f"{name}: a registration holds only {', '.join(sorted(REGISTRATION_KEYS))}")
        try:
            parse_registration(reg)
        except InvalidInput as e:
            raise BadBundle(f"{name}: its registration: {e.message}") from None
    return BundleModel(name, manifest, reg)


# -- writing -----------------------------------------------------------------------------


def file_entry_name(model: str, manifest_hash: str, path: str) -> str:
    return f"{MODELS_PREFIX}{model}/@{manifest_hash}/{path}"


def sums_entry_name(model: str, manifest_hash: str) -> str:
    return f"{MODELS_PREFIX}{model}/@{manifest_hash}.sha256"


def padding(size: int) -> bytes:
    """The zeros that bring an entry of ``size`` bytes to a block's end."""
    return b"\0" * (-size % BLOCK)


def _octal(value: int, width: int) -> bytes:
    """``width`` bytes: octal digits, NUL-terminated."""
    return f"{value:0{width - 1}o}".encode("ascii") + b"\0"


def _checksum(block: bytes | bytearray) -> int:
    return sum(block[:148]) + 8 * 32 + sum(block[156:BLOCK])


def _ustar(name: bytes, prefix: bytes, size: int, mtime_s: int, typeflag: bytes) -> bytes:
    h = bytearray(BLOCK)
    h[0:len(name)] = name
    h[100:108] = _octal(0o644, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(max(0, min(mtime_s, 8**11 - 1)), 12)
    h[156:157] = typeflag
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[345:345 + len(prefix)] = prefix
    h[148:156] = f"{_checksum(h):06o}".encode("ascii") + b"\0 "
    return bytes(h)


def _split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """``(name, prefix)`` when ``name`` fits ustar's two fields, else None."""
    if len(name) <= 100:
        return name, b""
    for i in range(len(name) - 1, 0, -1):
        if name[i:i + 1] == b"/" and i <= 155 and len(name) - i - 1 <= 100 and i < len(name) - 1:
            return name[i + 1:], name[:i]
    return None


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def tar_header(name: str, size: int, mtime_s: int) -> bytes:
    """The header block(s) of a regular file entry: ustar, with a pax record
    first when the name is not ASCII or too long, or the size too large."""
    if not 0 <= size <= 2**63 - 1:
        raise LocalProtocolError(f"an entry's size is 0 to 2**63-1, not {size}")
    raw = name.encode("utf-8")
    split = _split_ustar(raw) if name.isascii() else None
    records = b""
    if split is None:
        records += _pax_record("path", name)
    if size > _USTAR_SIZE_MAX:
        records += _pax_record("size", str(size))
    if not records:
        assert split is not None
        return _ustar(split[0], split[1], size, mtime_s, b"0")
    short = raw[-90:].decode("utf-8", "ignore").encode("ascii", "replace")
    pax = _ustar(b"PaxHeader/" + short, b"", len(records), mtime_s, b"x") + records + padding(len(records))
    short_name, short_prefix = split if split is not None else (raw[-100:].decode("utf-8", "ignore").encode(
        "ascii", "replace"), b"")
    return pax + _ustar(short_name, short_prefix, min(size, _USTAR_SIZE_MAX), mtime_s, b"0")


def header_entry(header: BundleHeader, mtime_s: int) -> bytes:
    """The bundle's first entry, whole: its tar header, the JSON, the padding."""
    data = header.encode()
    if len(data) > HEADER_MAX_BYTES:
        raise LocalProtocolError(f"the bundle's header would be {len(data)} bytes, over {HEADER_MAX_BYTES}")
    return tar_header(HEADER_NAME, len(data), mtime_s) + data + padding(len(data))


def file_header(model: str, manifest_hash: str, path: str, size: int, mtime_s: int) -> bytes:
    return tar_header(file_entry_name(model, manifest_hash, path), size, mtime_s)


def sums_text(manifest: Manifest, sums: Mapping[str, str]) -> bytes:
    """The sums entry's content: ``<sha256>  <path>`` a line, in manifest order."""
    return b"".join(f"{sums[f.path]}  {f.path}\n".encode() for f in manifest.files)


def sums_bytes(manifest: Manifest) -> int:
    """The exact size of a model's sums entry (known before any sha256 is)."""
    return sum(64 + 2 + len(f.path.encode("utf-8")) + 1 for f in manifest.files)


def sums_entry(model: str, manifest: Manifest, sums: Mapping[str, str], mtime_s: int) -> bytes:
    data = sums_text(manifest, sums)
    return tar_header(sums_entry_name(model, manifest.hash), len(data), mtime_s) + data + padding(len(data))


def bundle_bytes(header: BundleHeader, mtime_s: int) -> int:
    """The length of the whole stream, as the writer's functions make it."""
    total = len(header_entry(header, mtime_s)) + len(END_OF_ARCHIVE)
    for m in header.models:
        for f in m.manifest.files:
            total += len(file_header(m.name, m.manifest.hash, f.path, f.size, mtime_s)) + f.size + len(padding(f.size))
        n = sums_bytes(m.manifest)
        total += len(tar_header(sums_entry_name(m.name, m.manifest.hash), n, mtime_s)) + n + len(padding(n))
    return total


def parse_sums(manifest: Manifest, data: bytes) -> dict[str, str]:
    """A sums entry's lines, checked against the manifest: one a file, in its order."""
    out: dict[str, str] = {}
    pos = 0
    for f in manifest.files:
        end = data.find(b"\n", pos)
        m = _SUM_LINE.fullmatch(data, pos, end + 1) if end >= 0 else None
        if m is None or m.group(2) != f.path.encode("utf-8"):
            raise BadBundle(f"the sums do not list {f.path[:100]!r} where its manifest puts it")
        out[f.path] = m.group(1).decode("ascii")
        pos = end + 1
    if pos != len(data):
        raise BadBundle("the sums list more files than the manifest")
    return out


# -- reading -----------------------------------------------------------------------------


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
        name, size, typeflag = _parse_block(block)
        pax, self._pax = self._pax, {}
        if "path" in pax:
            name = pax["path"]
        if "size" in pax:
            size = _pax_int(pax["size"])
        if typeflag in (b"x", b"g"):
            if size > _PAX_RECORD_MAX:
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
            self._pax = _parse_pax(bytes(e.buf))
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


def _parse_block(block: bytes) -> tuple[str, int, bytes]:
    """A header block's name, size and type; ``BadBundle`` when its checksum is wrong."""
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        raise BadBundle("a tar header's checksum is not a number") from None
    unsigned = _checksum(block)
    signed = unsigned - 2 * sum(b for b in block[:148] + block[156:] if b >= 128)
    if stored not in (unsigned, signed):
        raise BadBundle("a tar header's checksum does not match (the bundle is damaged)")
    name = block[0:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    size_field = block[124:136]
    if size_field[0] & 0x80:  # base-256 (GNU)
        size = int.from_bytes(size_field[1:], "big")
    else:
        try:
            size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise BadBundle("a tar header's size is not a number") from None
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        raise BadBundle("an entry's name is not UTF-8") from None
    return text, size, block[156:157]


def _pax_int(text: str) -> int:
    if not text.isdigit() or len(text) > 19:
        raise BadBundle(f"a pax size {text[:20]!r} is not a number")
    return int(text)


def _parse_pax(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0 or not data[pos:sp].isdigit():
            raise BadBundle("a pax record has no length")
        n = int(data[pos:sp])
        rec = data[sp + 1:pos + n]
        if n <= sp - pos or pos + n > len(data) or not rec.endswith(b"\n") or b"=" not in rec:
            raise BadBundle("a pax record is malformed")
        key, _, value = rec[:-1].partition(b"=")
        try:
            out[key.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadBundle("a pax record is not UTF-8") from None
        pos += n
    return out


def export_sources(found: Mapping[str, bool], labels: Mapping[str, Mapping[str, str]],
                   mine: Mapping[str, str]) -> list[str]:
    """The holders an export reads from, nearest first: ``found`` maps each
    reachable holder to whether its copy is complete; a complete copy comes
    first, then the holder that shares the most labels with this node (its
    rack, its zone), then by id, so that every export picks alike."""

    def near(nid: str) -> tuple[int, int, str]:
        theirs = labels.get(nid, {})
        shared = sum(1 for k, v in mine.items() if theirs.get(k) == v)
        return (0 if found[nid] else 1, -shared, nid)

    return sorted(found, key=near)
