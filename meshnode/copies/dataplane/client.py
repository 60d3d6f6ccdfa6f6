"""The data plane's client: pooled authenticated connections, a chunk fetched
into a reused buffer and verified as it arrives."""

from __future__ import annotations

import hmac
import math
import secrets as _random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
import xxhash

from meshnode.ratelimit import TokenBucket

from .common import (
    _CLIENT_HELLO,
    _GET_CHUNK_BODY,
    _HAVE_WAIT_BODY,
    _REPLY,
    _SERVER_HELLO,
    _T,
    _VERSION,
    BUSY_BYTE,
    MAC_BYTES,
    MAGIC,
    MAX_BITFIELD_BYTES,
    MAX_CHUNK_BYTES,
    MAX_REASON_BYTES,
    NONCE_BYTES,
    REQ_GET_CHUNK,
    REQ_HAVE,
    REQ_HAVE_WAIT,
    VERSION,
    ChunkMismatch,
    DataPlaneAuthError,
    DataPlaneError,
    NotFound,
    PeerBusy,
    RequestRefused,
    Status,
    _close_now,
    _Conn,
    _hash_bytes,
    _keys,
    _mac,
    _PeerClosed,
    _PlainConn,
    _split_peer,
    _TlsConn,
)


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
        self._swept_at = -math.inf
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
        progress: Callable[[int], None] | None = None,
    ) -> memoryview:
        """Read chunk ``index`` of ``manifest_hash`` from ``peer`` into ``buf``.

        Returns ``memoryview(buf)[:length]`` once the bytes' xxh3-128 equals
        ``digest`` (16 raw bytes).  Raises ChunkMismatch, NotFound, PeerBusy,
        DataPlaneAuthError or DataPlaneError.  ``progress(n)``: n bytes are in
        ``buf`` (over plain TCP; not called over TLS).
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
            await conn.recv_into(view, hasher, self.read_timeout_s, self._ingress, progress)
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

    @property
    def tls(self) -> bool:
        return self._ssl_context is not None

    async def have_wait(self, peer: str, manifest_hash: str, known: int, wait_s: float) -> tuple[int, bytes]:
        """(version, bitfield) of the peer's chunks of ``manifest_hash`` once
        its version differs from ``known``, or after ``wait_s`` (the same
        version).  A peer that does not know the request answers
        BAD_REQUEST: DataPlaneError, and the caller asks ``have`` instead."""
        wait_ms = max(0, min(int(wait_s * 1000), 2**32 - 1))
        request = bytes([REQ_HAVE_WAIT]) + _HAVE_WAIT_BODY.pack(_hash_bytes(manifest_hash), known & 0xFFFFFFFF, wait_ms)

        async def body(conn: _Conn, size: int) -> tuple[int, bytes]:
            if not _VERSION.size <= size <= _VERSION.size + MAX_BITFIELD_BYTES:
                raise DataPlaneError(f"{peer} sent a {size}-byte HAVE_WAIT answer")
            data = await conn.recv_exact(size, self.read_timeout_s, "bitfield")
            return _VERSION.unpack(data[: _VERSION.size])[0], data[_VERSION.size :]

        return await self._request(peer, request, manifest_hash, body, header_timeout_s=wait_s + self.read_timeout_s)

    async def _request(
        self,
        peer: str,
        request: bytes,
        what: str,
        body: Callable[[_Conn, int], Awaitable[_T]],
        *,
        header_timeout_s: float | None = None,
    ) -> _T:
        if self._closed:
            raise DataPlaneError("client is closed")
        for attempt in range(2):
            conn, reused = await self._checkout(peer)
            got_header = False
            try:
                await conn.send_all(request)
                header = await conn.recv_exact(_REPLY.size, header_timeout_s or self.read_timeout_s, "reply header")
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
                raise RequestRefused(f"{peer} refused our request for {what}: {reason}")
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
        now = trio.current_time()
        if now - self._swept_at >= self.idle_timeout_s:
            self._sweep(now)
        pool = self._idle.setdefault(peer, [])
        if self._closed or len(pool) >= self.idle_per_peer:
            _close_now(conn)
            return
        pool.append(_Pooled(conn, now))

    def _sweep(self, now: float) -> None:
        """Close connections idle too long, for every peer: one that left or
        moved is never checked out again.  At most once per idle timeout."""
        self._swept_at = now
        for peer, pool in list(self._idle.items()):
            keep = []
            for pooled in pool:
                if now - pooled.idle_since < self.idle_timeout_s:
                    keep.append(pooled)
                else:
                    _close_now(pooled.conn)
            if keep:
                self._idle[peer] = keep
            else:
                del self._idle[peer]

    async def _connect(self, peer: str) -> _Conn:
        host, port = _split_peer(peer)
        stream: trio.SocketStream | None = None
        conn: _Conn | None = None
        try:
            with trio.fail_after(self.connect_timeout_s):
                stream = await trio.open_tcp_stream(host, port)
                if self._ssl_context is not None:
                    conn = await _TlsConn.wrap(stream, self._ssl_context, server_side=False, server_hostname=host)
                else:
                    conn = _PlainConn(stream)
                await self._handshake(conn, peer)
        except BaseException as exc:
            if conn is not None:
                await conn.aclose()
            elif stream is not None:
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
        _, sn = _SERVER_HELLO.unpack(first + rest)
        key = self._keys[0]  # we prove first, with the secret we send
        await conn.send_all(_mac(key, b"cli", cn, sn))
        try:
            verdict = await conn.recv_exact(1, self.read_timeout_s, "handshake verdict")
        except _PeerClosed as exc:
            raise DataPlaneAuthError(f"{peer} closed the connection after our proof") from exc
        if verdict != b"\x00":
            raise DataPlaneAuthError(f"{peer} refused our cluster secret")
        proof = await conn.recv_exact(MAC_BYTES, self.read_timeout_s, "server proof")
        if not hmac.compare_digest(_mac(key, b"srv", cn, sn), proof):
            raise DataPlaneAuthError(
                f"{peer} did not prove the cluster secret (an impostor, or a wrong secret?)"
            )
