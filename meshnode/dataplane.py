"""The data plane: a small binary protocol that moves verified chunks between peers.

Theory of operation
-------------------
Weights move on their own TCP port (advertised in the gossiped catalog), not
through HTTP: a plain socket with ``os.sendfile`` on the sender and
``recv_into`` a reused buffer on the receiver moves several GB/s on one core,
where an HTTP client reading a streamed body tops out well under 1 GB/s.

Every integer is big-endian.  One connection carries one handshake, then any
number of sequential requests.

Handshake (proves the cluster secret both ways without sending it)::

    client -> server  b"MNDP" | version u8 (=1) | client nonce (16)
    server -> client  version u8 (=1) | server nonce (16) | HMAC-SHA256(K_s, b"srv" | cn | sn)
    client -> server  HMAC-SHA256(K_c, b"cli" | cn | sn)
    server -> client  u8: 0 accepted (anything else: refused, then close)

``K_s`` is the server's first accepted secret.  The client checks the server's
proof against each secret it accepts, and answers with the one that matched
(so ``K_c`` is known to be shared); the server checks that answer against each
secret it accepts with ``hmac.compare_digest``.  No secrets configured (a
single-user loopback setup) means the empty key.  Rotation: add the new secret
to every node's list, then make it first everywhere, then drop the old one;
at every step any two nodes share the server's first secret.

A server answers a wrong magic by closing; a wrong version by sending its own
version byte and closing; a client at connection capacity by sending the
single byte 0 ("busy") and closing.  A wrong secret is logged (one line,
rate-limited, never the secret) and closed.

Requests and replies::

    GET_CHUNK  u8 1 | manifest hash (16 raw bytes of the 32-char hex) | chunk index u32
    HAVE       u8 2 | manifest hash (16)
    reply      status u8 | length u64 | body

Status 0 OK (body: the chunk, or a bitfield whose bit i, most significant bit
first, says chunk i is present and verified), 1 NOT_FOUND, 2 BAD_REQUEST,
3 BUSY.  A non-OK body is an optional short UTF-8 reason (at most 256 bytes).
A malformed request gets BAD_REQUEST and the connection is closed.

Limits: connections (``max_connections``), concurrent chunk sends
(``max_concurrent_sends``, beyond which GET_CHUNK answers BUSY), a handshake
timeout, an idle timeout between requests, a timeout to read a whole request,
and a stall timeout on every send and receive (no progress for that long
fails the request).  The client bounds connect plus handshake by
``connect_timeout_s`` and every wait for bytes by ``read_timeout_s``.

The chunk's xxh3-128 is computed as its bytes arrive; the caller writes a
chunk to disk only after ``fetch_chunk`` has returned, that is after the
digest matched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets as _random
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol, TypeVar

import trio
import xxhash

from meshnode.ratelimit import TokenBucket

__all__ = [
    "MAGIC",
    "VERSION",
    "ChunkMismatch",
    "ChunkResolver",
    "DataClient",
    "DataClientStatistics",
    "DataPlaneAuthError",
    "DataPlaneError",
    "DataServer",
    "DataServerStatistics",
    "NotFound",
    "PeerBusy",
    "Status",
]

logger = logging.getLogger("meshnode.dataplane")

MAGIC = b"MNDP"
VERSION = 1
NONCE_BYTES = 16
MAC_BYTES = 32
HASH_BYTES = 16
BUSY_BYTE = 0  # in place of the server's version: at capacity, retry elsewhere

REQ_GET_CHUNK = 1
REQ_HAVE = 2

_CLIENT_HELLO = struct.Struct("!4sB16s")  # magic, version, client nonce
_SERVER_HELLO = struct.Struct("!B16s32s")  # version, server nonce, proof
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


@dataclass(frozen=True, slots=True)
class DataServerStatistics:
    connections: int
    connections_total: int
    sends_in_flight: int
    requests: int
    bytes_sent: int
    auth_failures: int
    bad_requests: int
    busy_replies: int


class DataServer:
    """Serves verified chunks to authenticated peers.

    ``resolver`` has ``locate(hash_hex, index) -> (path, offset, length) | None``
    and ``have(hash_hex) -> bitfield | None``; see :class:`ChunkResolver`.
    """

    def __init__(
        self,
        resolver: ChunkResolver,
        secrets: tuple[str, ...],
        *,
        ssl_context: ssl.SSLContext | None = None,
        egress: TokenBucket | None = None,
        max_connections: int = 256,
        max_concurrent_sends: int = 64,
        handshake_timeout_s: float = 10.0,
        idle_timeout_s: float = 120.0,
        request_timeout_s: float = 10.0,
        stall_timeout_s: float = 30.0,
    ) -> None:
        if max_connections < 1 or max_concurrent_sends < 1:
            raise ValueError("max_connections and max_concurrent_sends must be >= 1")
        self._resolver = resolver
        self._keys = _keys(secrets)
        self._ssl_context = ssl_context
        self._egress = egress  # kept even when unlimited: set_rate() may limit it later
        self.max_connections = max_connections
        self.max_concurrent_sends = max_concurrent_sends
        self.handshake_timeout_s = handshake_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.request_timeout_s = request_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.port: int | None = None
        self._log = _LogLimiter()
        self._connections = 0
        self._connections_total = 0
        self._sends = 0
        self._requests = 0
        self._bytes_sent = 0
        self._auth_failures = 0
        self._bad_requests = 0
        self._busy = 0

    def statistics(self) -> DataServerStatistics:
        return DataServerStatistics(
            connections=self._connections,
            connections_total=self._connections_total,
            sends_in_flight=self._sends,
            requests=self._requests,
            bytes_sent=self._bytes_sent,
            auth_failures=self._auth_failures,
            bad_requests=self._bad_requests,
            busy_replies=self._busy,
        )

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind (port 0: any free port), report the bound port, serve until cancelled."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        if port == 0 and len(listeners) > 1:  # each would get its own port: keep one
            for extra in listeners[1:]:
                await trio.aclose_forcefully(extra)
            listeners = listeners[:1]
        try:
            self.port = listeners[0].socket.getsockname()[1]
            logger.info(
                "data plane listening on %s:%d (%s)",
                host,
                self.port,
                "tls" if self._ssl_context else "tcp",
            )
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self._connections += 1
        self._connections_total += 1
        try:
            peer = _peer_name(stream)
            if self._connections > self.max_connections:
                self._busy += 1
                self._log.warning(
                    "capacity",
                    "data plane at %d connections, turned away %s",
                    self.max_connections,
                    peer,
                )
                with trio.move_on_after(1):
                    await stream.send_all(bytes([BUSY_BYTE]))
                return
            conn = await self._open(stream, peer)
            if conn is None:
                return
            await self._requests_loop(conn, peer)
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            _PeerClosed,
            trio.TooSlowError,
            OSError,
        ) as exc:
            logger.debug("data plane connection from %s ended: %s", _peer_name(stream), exc)
        except Exception:  # our bug, not the peer's: log it, drop this connection, keep serving
            self._log.warning("internal", "data plane connection handler failed", exc_info=True)
        finally:
            self._connections -= 1
            await trio.aclose_forcefully(stream)

    async def _open(self, stream: trio.SocketStream, peer: str) -> _Conn | None:
        """TLS (if configured) and the secret handshake; None if refused."""
        with trio.move_on_after(self.handshake_timeout_s) as scope:
            conn: _Conn
            if self._ssl_context is not None:
                tls = trio.SSLStream(stream, self._ssl_context, server_side=True)
                try:
                    await tls.do_handshake()
                except trio.BrokenResourceError as exc:
                    self._log.warning(
                        "tls:" + peer.rsplit(":", 1)[0],
                        "data plane TLS handshake with %s failed: %s",
                        peer,
                        exc.__cause__ or exc,
                    )
                    return None
                conn = _Conn(tls)
            else:
                conn = _Conn(stream)
            try:
                ok = await self._handshake(conn, peer)
            except _PeerClosed as exc:  # before its hello: a probe or a port scan, not worth a line
                logger.debug("data plane peer %s left before the handshake: %s", peer, exc)
                return None
            return conn if ok else None
        assert scope.cancelled_caught
        self._auth_failures += 1
        self._log.warning(
            "slow:" + peer.rsplit(":", 1)[0], "data plane handshake with %s timed out", peer
        )
        return None

    async def _handshake(self, conn: _Conn, peer: str) -> bool:
        hello = await conn.recv_exact(_CLIENT_HELLO.size, self.handshake_timeout_s, "client hello")
        magic, version, cn = _CLIENT_HELLO.unpack(hello)
        if magic != MAGIC:
            self._auth_failures += 1
            self._log.warning(
                "magic:" + peer.rsplit(":", 1)[0],
                "data plane refused %s: not our protocol (bad magic)",
                peer,
            )
            return False
        if version != VERSION:
            self._auth_failures += 1
            self._log.warning(
                "version:" + peer.rsplit(":", 1)[0],
                "data plane refused %s: it speaks version %d, we speak %d",
                peer,
                version,
                VERSION,
            )
            await conn.send_all(bytes([VERSION]))
            return False
        sn = _random.token_bytes(NONCE_BYTES)
        await conn.send_all(_SERVER_HELLO.pack(VERSION, sn, _mac(self._keys[0], b"srv", cn, sn)))
        try:
            proof = await conn.recv_exact(MAC_BYTES, self.handshake_timeout_s, "client proof")
        except _PeerClosed:
            self._auth_failures += 1
            self._log.warning(
                "closed:" + peer.rsplit(":", 1)[0],
                "data plane peer %s hung up during the handshake, after our proof"
                " (it does not accept our cluster secret?)",
                peer,
            )
            return False
        if _match_key(self._keys, b"cli", cn, sn, proof) is None:
            self._auth_failures += 1
            self._log.warning(
                "secret:" + peer.rsplit(":", 1)[0],
                "data plane refused %s: its proof matches no accepted cluster secret",
                peer,
            )
            await conn.send_all(b"\x01")
            return False
        await conn.send_all(b"\x00")
        return True

    async def _reply(self, conn: _Conn, status: Status, reason: str = "") -> None:
        body = reason.encode("utf-8")[:MAX_REASON_BYTES]
        await conn.send_all(_REPLY.pack(status, len(body)) + body)

    async def _requests_loop(self, conn: _Conn, peer: str) -> None:
        buf: bytearray | None = None if conn.fd is not None else bytearray(SEND_SLICE_BYTES)
        while True:
            first: bytes | bytearray = b""
            with trio.move_on_after(self.idle_timeout_s):
                first = await conn.stream.receive_some(1)
            if not first:  # EOF, or idle for too long (the scope ended with nothing)
                return
            self._requests += 1
            kind = first[0]
            if kind == REQ_GET_CHUNK:
                body = await conn.recv_exact(
                    _GET_CHUNK_BODY.size, self.request_timeout_s, "GET_CHUNK request"
                )
                raw_hash, index = _GET_CHUNK_BODY.unpack(body)
                await self._get_chunk(conn, peer, raw_hash.hex(), index, buf)
            elif kind == REQ_HAVE:
                raw_hash = await conn.recv_exact(HASH_BYTES, self.request_timeout_s, "HAVE request")
                await self._have(conn, raw_hash.hex())
            else:
                self._bad_requests += 1
                self._log.warning(
                    "bad:" + peer.rsplit(":", 1)[0],
                    "data plane: bad request type %d from %s",
                    kind,
                    peer,
                )
                await self._reply(conn, Status.BAD_REQUEST, f"unknown request type {kind}")
                return

    async def _have(self, conn: _Conn, hash_hex: str) -> None:
        try:
            bits = self._resolver.have(hash_hex)
        except Exception:
            logger.exception("data plane resolver.have(%s) failed", hash_hex)
            bits = None
        if bits is None:
            await self._reply(conn, Status.NOT_FOUND, "no such manifest")
            return
        if len(bits) > MAX_BITFIELD_BYTES:
            logger.error(
                "data plane: bitfield for %s is %d bytes, over the limit", hash_hex, len(bits)
            )
            await self._reply(conn, Status.NOT_FOUND, "bitfield too large")
            return
        await conn.send_all(_REPLY.pack(Status.OK, len(bits)) + bytes(bits))

    async def _get_chunk(
        self, conn: _Conn, peer: str, hash_hex: str, index: int, buf: bytearray | None
    ) -> None:
        if self._sends >= self.max_concurrent_sends:
            self._busy += 1
            await self._reply(conn, Status.BUSY, "too many chunk sends in flight")
            return
        try:
            where = self._resolver.locate(hash_hex, index)
        except Exception:
            logger.exception("data plane resolver.locate(%s, %d) failed", hash_hex, index)
            where = None
        if where is None:
            await self._reply(conn, Status.NOT_FOUND, "no such chunk")
            return
        path, offset, length = where
        if offset < 0 or not 0 <= length <= MAX_CHUNK_BYTES:
            logger.error(
                "data plane: resolver gave a bad range for %s[%d]: %r", hash_hex, index, where
            )
            await self._reply(conn, Status.NOT_FOUND, "no such chunk")
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            logger.warning("data plane: cannot open %s for %s[%d]: %s", path, hash_hex, index, exc)
            await self._reply(conn, Status.NOT_FOUND, "chunk file missing")
            return
        self._sends += 1
        try:
            if os.fstat(fd).st_size < offset + length:
                logger.warning("data plane: %s is shorter than %s[%d] needs", path, hash_hex, index)
                await self._reply(conn, Status.NOT_FOUND, "chunk file truncated")
                return
            await conn.send_all(_REPLY.pack(Status.OK, length))
            sent = await conn.send_file(fd, offset, length, self.stall_timeout_s, self._egress, buf)
            self._bytes_sent += sent
        finally:
            self._sends -= 1
            os.close(fd)


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)


@dataclass(frozen=True, slots=True)
class DataClientStatistics:
    idle_connections: int
    connections_opened: int
    chunks: int
    bytes_received: int
    mismatches: int


@dataclass(slots=True)
class _Pooled:
    conn: _Conn
    idle_since: float


class DataClient:
    """Fetches chunks over a small pool of authenticated connections per peer."""

    def __init__(
        self,
        secrets: tuple[str, ...],
        *,
        ssl_context: ssl.SSLContext | None = None,
        ingress: TokenBucket | None = None,
        connect_timeout_s: float = 5,
        read_timeout_s: float = 30,
        idle_per_peer: int = 8,
        idle_timeout_s: float = 60.0,
    ) -> None:
        self._keys = _keys(secrets)
        self._ssl_context = ssl_context
        self._ingress = ingress
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.idle_per_peer = idle_per_peer
        self.idle_timeout_s = idle_timeout_s  # below the server's, so we rarely reuse a closed one
        self._idle: dict[str, list[_Pooled]] = {}
        self._closed = False
        self._opened = 0
        self._chunks = 0
        self._bytes = 0
        self._mismatches = 0

    def statistics(self) -> DataClientStatistics:
        return DataClientStatistics(
            idle_connections=sum(len(v) for v in self._idle.values()),
            connections_opened=self._opened,
            chunks=self._chunks,
            bytes_received=self._bytes,
            mismatches=self._mismatches,
        )

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for pooled in idle.values():
            for p in pooled:
                await p.conn.aclose()

    async def fetch_chunk(
        self,
        peer: str,
        manifest_hash: str,
        index: int,
        length: int,
        digest: bytes,
        buf: bytearray,
    ) -> memoryview:
        """Read chunk ``index`` of ``manifest_hash`` from ``peer`` into ``buf``.

        Returns ``memoryview(buf)[:length]`` once the bytes' xxh3-128 equals
        ``digest`` (16 raw bytes).  Raises ChunkMismatch, NotFound, PeerBusy,
        DataPlaneAuthError or DataPlaneError.
        """
        if not 0 <= index < 1 << 32:
            raise ValueError(f"chunk index out of range: {index}")
        if not 0 <= length <= min(len(buf), MAX_CHUNK_BYTES):
            raise ValueError(f"length {length} does not fit the buffer ({len(buf)} bytes)")
        if len(digest) != 16:
            raise ValueError("digest must be the 16 raw bytes of an xxh3-128")
        request = bytes([REQ_GET_CHUNK]) + _GET_CHUNK_BODY.pack(_hash_bytes(manifest_hash), index)
        view = memoryview(buf)[:length]

        async def body(conn: _Conn, size: int) -> memoryview:
            if size != length:
                self._mismatches += 1
                raise ChunkMismatch(
                    f"{peer} offered {size} bytes for {manifest_hash}[{index}], the manifest says {length}"
                )
            hasher = xxhash.xxh3_128()
            await conn.recv_into(view, hasher, self.read_timeout_s, self._ingress)
            self._chunks += 1
            self._bytes += length
            if hasher.digest() != digest:
                self._mismatches += 1
                raise ChunkMismatch(f"{peer} sent {manifest_hash}[{index}] with a wrong xxh3-128")
            return view

        return await self._request(peer, request, f"{manifest_hash}[{index}]", body)

    async def have(self, peer: str, manifest_hash: str) -> bytes:
        """The peer's bitfield of verified chunks for ``manifest_hash``."""
        request = bytes([REQ_HAVE]) + _hash_bytes(manifest_hash)

        async def body(conn: _Conn, size: int) -> bytes:
            if size > MAX_BITFIELD_BYTES:
                raise DataPlaneError(f"{peer} sent a {size}-byte bitfield, over the limit")
            return await conn.recv_exact(size, self.read_timeout_s, "bitfield")

        return await self._request(peer, request, manifest_hash, body)

    async def _request(
        self,
        peer: str,
        request: bytes,
        what: str,
        body: Callable[[_Conn, int], Awaitable[_T]],
    ) -> _T:
        if self._closed:
            raise DataPlaneError("client is closed")
        for attempt in range(2):
            conn, reused = await self._checkout(peer)
            got_header = False
            try:
                await conn.send_all(request)
                header = await conn.recv_exact(_REPLY.size, self.read_timeout_s, "reply header")
                got_header = True
                status, size = _REPLY.unpack(header)
                if status == Status.OK:
                    result = await body(conn, size)
                    self._checkin(peer, conn)
                    return result
                if size > MAX_REASON_BYTES:
                    raise DataPlaneError(f"{peer} sent a {size}-byte error reason, over the limit")
                reason = (await conn.recv_exact(size, self.read_timeout_s, "reason")).decode(
                    "utf-8", "replace"
                )
            except BaseException as exc:
                await conn.aclose()  # a connection that saw an error is never reused
                if isinstance(exc, DataPlaneError):
                    raise
                if not isinstance(
                    exc,
                    trio.BrokenResourceError
                    | trio.ClosedResourceError
                    | _PeerClosed
                    | trio.TooSlowError
                    | OSError,
                ):
                    raise
                if (
                    reused
                    and not got_header
                    and attempt == 0
                    and not isinstance(exc, trio.TooSlowError)
                ):
                    continue  # a pooled connection the server had closed: one fresh try
                raise DataPlaneError(f"{peer}: {what}: {exc or type(exc).__name__}") from exc
            if status == Status.NOT_FOUND:
                self._checkin(peer, conn)
                raise NotFound(f"{peer} does not hold {what}" + (f": {reason}" if reason else ""))
            if status == Status.BUSY:
                self._checkin(peer, conn)
                raise PeerBusy(f"{peer} is busy" + (f": {reason}" if reason else ""))
            await conn.aclose()
            if status == Status.BAD_REQUEST:
                raise DataPlaneError(f"{peer} refused our request for {what}: {reason}")
            raise DataPlaneError(f"{peer} answered with unknown status {status}")
        raise AssertionError("unreachable")

    async def _checkout(self, peer: str) -> tuple[_Conn, bool]:
        pool = self._idle.get(peer)
        now = trio.current_time()
        while pool:
            pooled = pool.pop()
            if now - pooled.idle_since < self.idle_timeout_s:
                return pooled.conn, True
            await pooled.conn.aclose()
        return await self._connect(peer), False

    def _checkin(self, peer: str, conn: _Conn) -> None:
        pool = self._idle.setdefault(peer, [])
        if self._closed or len(pool) >= self.idle_per_peer:
            _close_now(conn)
            return
        pool.append(_Pooled(conn, trio.current_time()))

    async def _connect(self, peer: str) -> _Conn:
        host, port = _split_peer(peer)
        stream: trio.SocketStream | None = None
        try:
            with trio.fail_after(self.connect_timeout_s):
                stream = await trio.open_tcp_stream(host, port)
                conn: _Conn
                if self._ssl_context is not None:
                    tls = trio.SSLStream(stream, self._ssl_context, server_hostname=host)
                    await tls.do_handshake()
                    conn = _Conn(tls)
                else:
                    conn = _Conn(stream)
                await self._handshake(conn, peer)
        except BaseException as exc:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            if isinstance(exc, trio.TooSlowError):
                raise DataPlaneError(
                    f"{peer}: connect and handshake took over {self.connect_timeout_s:g} s"
                ) from exc
            if isinstance(
                exc, OSError | trio.BrokenResourceError | trio.ClosedResourceError | _PeerClosed
            ):
                raise DataPlaneError(f"{peer}: cannot open a data plane connection: {exc}") from exc
            raise
        self._opened += 1
        return conn

    async def _handshake(self, conn: _Conn, peer: str) -> None:
        cn = _random.token_bytes(NONCE_BYTES)
        await conn.send_all(_CLIENT_HELLO.pack(MAGIC, VERSION, cn))
        first = await conn.recv_exact(1, self.read_timeout_s, "server hello")
        if first[0] == BUSY_BYTE:
            raise PeerBusy(f"{peer} is at its connection limit")
        if first[0] != VERSION:
            raise DataPlaneAuthError(
                f"{peer} speaks data plane version {first[0]}, we speak {VERSION}"
            )
        rest = await conn.recv_exact(_SERVER_HELLO.size - 1, self.read_timeout_s, "server hello")
        _, sn, proof = _SERVER_HELLO.unpack(first + rest)
        key = _match_key(self._keys, b"srv", cn, sn, proof)
        if key is None:
            raise DataPlaneAuthError(
                f"{peer} did not prove a cluster secret we accept (wrong or rotated secret?)"
            )
        await conn.send_all(_mac(key, b"cli", cn, sn))
        try:
            verdict = await conn.recv_exact(1, self.read_timeout_s, "handshake verdict")
        except _PeerClosed as exc:
            raise DataPlaneAuthError(f"{peer} closed the connection after our proof") from exc
        if verdict != b"\x00":
            raise DataPlaneAuthError(f"{peer} refused our cluster secret")


def _close_now(conn: _Conn) -> None:
    """Close a connection without awaiting (plain sockets close at once; TLS skips close_notify)."""
    stream = conn.stream
    sock_stream = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    sock_stream.socket.close()
