"""The tar a bundle is: ustar header blocks, with pax records for long or
non-ASCII names and for files of 8 GiB and more; written (``tar_header``,
``padding``) and read (``parse_block``, ``parse_pax``).  Pure.
"""

from __future__ import annotations

from ..errors import LocalProtocolError
from .header import BadBundle

__all__ = [
    "BLOCK",
    "END_OF_ARCHIVE",
    "PAX_RECORD_MAX",
    "padding",
    "parse_block",
    "parse_pax",
    "pax_int",
    "tar_header",
]

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
_USTAR_SIZE_MAX = 8**11 - 1  # what 11 octal digits hold; beyond, the size goes in a pax record
PAX_RECORD_MAX = 1 << 20


# -- writing -------------------------------------------------------------------------------


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


# -- reading -------------------------------------------------------------------------------


def parse_block(block: bytes) -> tuple[str, int, bytes]:
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


def pax_int(text: str) -> int:
    if not text.isdigit() or len(text) > 19:
        raise BadBundle(f"a pax size {text[:20]!r} is not a number")
    return int(text)


def parse_pax(data: bytes) -> dict[str, str]:
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
