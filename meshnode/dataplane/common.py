"""What the data plane's server and client share: the wire constants, the
errors, and one authenticated connection (``_Conn``).  See the package
docstring for the protocol."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import Protocol, TypeVar

import trio
import xxhash

from meshnode.ratelimit import TokenBucket

logger = logging.getLogger("meshnode.dataplane")

MAGIC = b"MNDP"
VERSION = 2  # 2: the client proves the secret first
NONCE_BYTES = 16
MAC_BYTES = 32
HASH_BYTES = 16
BUSY_BYTE = 0  # in place of the server's version: at capacity, retry elsewhere

REQ_GET_CHUNK = 1
REQ_HAVE = 2

_CLIENT_HELLO = struct.Struct("!4sB16s")  # magic, version, client nonce
_SERVER_HELLO = struct.Struct("!B16s")  # version, server nonce
_GET_CHUNK_BODY = struct.Struct("!16sI")  # manifest hash, chunk index
_REPLY = struct.Struct("!BQ")  # status, length

MAX_REASON_BYTES = 256
MAX_BITFIELD_BYTES = 1 << 20  # 8 Mi chunks
MAX_CHUNK_BYTES = 1 << 31
SEND_SLICE_BYTES = 1 << 20  # egress tokens and cancellation checkpoints per slice
RECV_SLICE_BYTES = 1 << 20  # TLS reads, and a checkpoint at least this often


class Status(IntEnum):
    OK = 0
    NOT_FOUND = 1
    BAD_REQUEST = 2
    BUSY = 3


class DataPlaneError(Exception):
    """A data plane failure: connection, timeout, or a peer breaking the protocol."""


class DataPlaneAuthError(DataPlaneError):
    """The handshake failed: wrong cluster secret, wrong magic or version."""


class NotFound(DataPlaneError):
    """The peer does not hold that chunk (or manifest) verified."""


class PeerBusy(DataPlaneError):
    """The peer is at capacity; try another peer or later."""


class ChunkMismatch(DataPlaneError):
    """The bytes the peer sent do not match the manifest (digest or length)."""


class ChunkResolver(Protocol):
    """What the store gives the server: where a verified chunk lives."""

    def locate(self, manifest_hash_hex: str, index: int) -> tuple[str, int, int] | None:
        """(absolute file path, offset within that file, length), or None."""
        ...

    def have(self, manifest_hash_hex: str) -> bytes | None:
        """Bitfield of the verified chunks (bit i, MSB first, = chunk i), or None."""
        ...


class _PeerClosed(Exception):
    """EOF from the peer where bytes were due."""


def _keys(secrets: tuple[str, ...]) -> tuple[bytes, ...]:
    keys = tuple(s.encode("utf-8") for s in secrets if s)
    return keys or (b"",)


def _mac(key: bytes, label: bytes, cn: bytes, sn: bytes) -> bytes:
    return hmac.new(key, label + cn + sn, hashlib.sha256).digest()


def _match_key(
    keys: tuple[bytes, ...], label: bytes, cn: bytes, sn: bytes, proof: bytes
) -> bytes | None:
    """The accepted key that produced ``proof``; every key is checked in constant time."""
    found: bytes | None = None
    for key in keys:
        if hmac.compare_digest(_mac(key, label, cn, sn), proof) and found is None:
            found = key
    return found


def _hash_bytes(manifest_hash: str) -> bytes:
    try:
        raw = bytes.fromhex(manifest_hash)
    except ValueError:
        raw = b""
    if len(raw) != HASH_BYTES:
        raise ValueError(f"manifest hash must be 32 hex characters, got {manifest_hash!r:.50}")
    return raw


def _split_peer(peer: str) -> tuple[str, int]:
    host, sep, port = peer.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"peer must be host:port, got {peer!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _LogLimiter:
    """One log line per key per interval; counts what it held back."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        if len(self._last) > 1024:  # bounded: forget the oldest keys
            for old in sorted(self._last, key=self._last.__getitem__)[:512]:
                del self._last[old]
                self._held.pop(old, None)
        if held:
            logger.warning(msg + " (%d similar held back)", *args, held, exc_info=exc_info)
        else:
            logger.warning(msg, *args, exc_info=exc_info)


_T = TypeVar("_T")


async def _stall_bounded(
    timeout_s: float, what: str, op: Callable[..., Awaitable[_T]], *args: object
) -> _T:
    with trio.move_on_after(timeout_s) as scope:
        return await op(*args)
    assert scope.cancelled_caught
    raise trio.TooSlowError(f"{what}: no progress for {timeout_s:g} s")


class _Conn:
    """One connection, plain (raw fd fast path) or TLS (SSLStream)."""

    def __init__(self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.fd: int | None = (
            stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        )

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def recv_exact(self, n: int, timeout_s: float, what: str) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = await _stall_bounded(timeout_s, what, self.stream.receive_some, n - len(out))
            if not chunk:
                raise _PeerClosed(f"{what}: peer closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    async def recv_into(
        self,
        view: memoryview,
        hasher: xxhash.xxh3_128,
        timeout_s: float,
        ingress: TokenBucket | None,
    ) -> None:
        """Fill ``view`` exactly, hashing as bytes arrive."""
        length = len(view)
        pos = 0
        fd = self.fd
        if fd is None:  # TLS: SSLStream hands out bytes; one copy into the buffer
            while pos < length:
                data = await _stall_bounded(
                    timeout_s,
                    "reading chunk",
                    self.stream.receive_some,
                    min(RECV_SLICE_BYTES, length - pos),
                )
                if not data:
                    raise _PeerClosed(f"peer closed after {pos} of {length} chunk bytes")
                n = len(data)
                view[pos : pos + n] = data
                hasher.update(data)
                pos += n
                if ingress is not None:
                    await ingress.take(n)
            return
        since_checkpoint = 0
        # Limited: a slice per read, so tokens are taken in small steps.
        most = length if ingress is None or ingress.unlimited else RECV_SLICE_BYTES
        while pos < length:
            try:
                n = os.readv(fd, [view[pos : pos + most]])
            except BlockingIOError:
                since_checkpoint = 0
                await _stall_bounded(timeout_s, "reading chunk", trio.lowlevel.wait_readable, fd)
                continue
            if n == 0:
                raise _PeerClosed(f"peer closed after {pos} of {length} chunk bytes")
            hasher.update(view[pos : pos + n])
            pos += n
            if ingress is not None:
                await ingress.take(n)
            else:
                since_checkpoint += n
                if since_checkpoint >= RECV_SLICE_BYTES:
                    since_checkpoint = 0
                    await trio.lowlevel.checkpoint()

    async def send_file(
        self,
        fd: int,
        offset: int,
        length: int,
        timeout_s: float,
        egress: TokenBucket | None,
        buf: bytearray | None,
    ) -> int:
        """Send ``length`` bytes of ``fd`` from ``offset``; returns bytes sent."""
        end = offset + length
        sock_fd = self.fd
        while offset < end:
            slice_end = min(end, offset + SEND_SLICE_BYTES)
            if egress is not None:
                await egress.take(slice_end - offset)
            if sock_fd is None:  # TLS: read into a buffer, encrypt, send
                assert buf is not None
                view = memoryview(buf)[: slice_end - offset]
                n = os.preadv(fd, [view], offset)
                if n <= 0:
                    raise _PeerClosed("file ended before the chunk did (truncated on disk?)")
                await _stall_bounded(timeout_s, "sending chunk", self.stream.send_all, view[:n])
                offset += n
                continue
            while offset < slice_end:
                try:
                    n = os.sendfile(sock_fd, fd, offset, slice_end - offset)
                except BlockingIOError:
                    await _stall_bounded(
                        timeout_s, "sending chunk", trio.lowlevel.wait_writable, sock_fd
                    )
                    continue
                if n == 0:
                    raise _PeerClosed("file ended before the chunk did (truncated on disk?)")
                offset += n
            if egress is None:
                await trio.lowlevel.checkpoint()
        return length

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def _close_now(conn: _Conn) -> None:
    """Close a connection without awaiting (plain sockets close at once; TLS skips close_notify)."""
    stream = conn.stream
    sock_stream = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    sock_stream.socket.close()
