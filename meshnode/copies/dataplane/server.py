"""The data plane's server: serves verified chunks to authenticated peers."""

from __future__ import annotations

import os
import secrets as _random
import ssl
from dataclasses import dataclass

import trio

from meshnode.ratelimit import TokenBucket
from protocol.transfer.swarm import UPLOAD_SLOTS

from .common import (
    _CLIENT_HELLO,
    _GET_CHUNK_BODY,
    _HAVE_WAIT_BODY,
    _REPLY,
    _SERVER_HELLO,
    _VERSION,
    BUSY_BYTE,
    HASH_BYTES,
    MAC_BYTES,
    MAGIC,
    MAX_BITFIELD_BYTES,
    MAX_CHUNK_BYTES,
    MAX_HAVE_WAIT_S,
    MAX_REASON_BYTES,
    NONCE_BYTES,
    REQ_GET_CHUNK,
    REQ_HAVE,
    REQ_HAVE_WAIT,
    SEND_SLICE_BYTES,
    VERSION,
    Arriving,
    ChunkResolver,
    Status,
    _Conn,
    _keys,
    _LogLimiter,
    _mac,
    _match_key,
    _PeerClosed,
    _PlainConn,
    _stall_bounded,
    _TlsConn,
    logger,
)


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
    sending: int = 0  # chunk sends holding an upload slot now (at most upload_slots)
    passed_on: int = 0  # chunks sent while they were still arriving here (cut-through)
    have_waits: int = 0  # HAVE_WAIT requests answered
    have_bytes_sent: int = 0  # HAVE and HAVE_WAIT answers, bytes (what neighbours tell each other)


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
        max_per_client: int = 32,
        max_concurrent_sends: int = 64,
        upload_slots: int = UPLOAD_SLOTS,
        handshake_timeout_s: float = 10.0,
        idle_timeout_s: float = 120.0,
        request_timeout_s: float = 10.0,
        stall_timeout_s: float = 30.0,
    ) -> None:
        if max_connections < 1 or max_concurrent_sends < 1 or upload_slots < 1:
            raise ValueError("max_connections, max_concurrent_sends and upload_slots must be >= 1")
        self._resolver = resolver
        self._keys = _keys(secrets)
        self._ssl_context = ssl_context
        self._egress = egress  # kept even when unlimited: set_rate() may limit it later
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self._by_client: dict[str, int] = {}
        self.max_concurrent_sends = max_concurrent_sends  # sends waiting and going: more are told BUSY
        # Chunk sends going at once: more wait their turn, first come first served (the sender's
        # upload slots: each send gets a fair share of the uplink, and a new chunk leaves soon).
        self._slots = trio.Semaphore(upload_slots)
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
        self._passed_on = 0
        self._have_waits = 0
        self._sending = 0
        self._have_bytes = 0

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
            sending=self._sending,
            passed_on=self._passed_on,
            have_waits=self._have_waits,
            have_bytes_sent=self._have_bytes,
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
        peer = _peer_name(stream)
        client = peer.rsplit(":", 1)[0]
        self._by_client[client] = self._by_client.get(client, 0) + 1
        try:
            over_total = self._connections > self.max_connections
            if over_total or self._by_client[client] > self.max_per_client:
                self._busy += 1
                self._log.warning(
                    "capacity",
                    "data plane turned away %s: %s",
                    peer,
                    f"at {self.max_connections} connections" if over_total
                    else f"{self.max_per_client} connections from one client",
                )
                with trio.move_on_after(1):
                    await stream.send_all(bytes([BUSY_BYTE]))
                return
            conn = await self._open(stream, peer)
            if conn is None:
                return
            try:
                await self._requests_loop(conn, peer)
            finally:
                await conn.aclose()
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
            self._by_client[client] -= 1
            if not self._by_client[client]:
                del self._by_client[client]
            await trio.aclose_forcefully(stream)

    async def _open(self, stream: trio.SocketStream, peer: str) -> _Conn | None:
        """TLS (if configured) and the secret handshake; None if refused."""
        with trio.move_on_after(self.handshake_timeout_s) as scope:
            conn: _Conn
            if self._ssl_context is not None:
                try:
                    conn = await _TlsConn.wrap(stream, self._ssl_context, server_side=True)
                except (trio.BrokenResourceError, _PeerClosed, OSError) as exc:
                    self._log.warning(
                        "tls:" + peer.rsplit(":", 1)[0],
                        "data plane TLS handshake with %s failed: %s",
                        peer,
                        exc,
                    )
                    return None
            else:
                conn = _PlainConn(stream)
            try:
                ok = await self._handshake(conn, peer)
            except _PeerClosed as exc:  # before its hello: a probe or a port scan, not worth a line
                logger.debug("data plane peer %s left before the handshake: %s", peer, exc)
                ok = False
            if not ok:
                await conn.aclose()
                return None
            return conn
        assert scope.cancelled_caught
        self._refuse("slow", peer, "data plane handshake with %s timed out", peer)
        return None

    def _refuse(self, kind: str, peer: str, msg: str, *args: object) -> None:
        """Count a refused handshake and say so: one line per kind and host
        per interval, whatever a peer keeps sending."""
        self._auth_failures += 1
        self._log.warning(kind + ":" + peer.rsplit(":", 1)[0], msg, *args)

    async def _handshake(self, conn: _Conn, peer: str) -> bool:
        hello = await conn.recv_exact(_CLIENT_HELLO.size, self.handshake_timeout_s, "client hello")
        magic, version, cn = _CLIENT_HELLO.unpack(hello)
        if magic != MAGIC:
            self._refuse(
                "magic",
                peer,
                "data plane refused %s: not our protocol (bad magic)",
                peer,
            )
            return False
        if version != VERSION:
            self._refuse(
                "version",
                peer,
                "data plane refused %s: it speaks version %d, we speak %d",
                peer,
                version,
                VERSION,
            )
            await conn.send_all(bytes([VERSION]))
            return False
        sn = _random.token_bytes(NONCE_BYTES)
        # The client proves it holds a secret first: a stranger gets nothing
        # it could test guesses against offline.
        await conn.send_all(_SERVER_HELLO.pack(VERSION, sn))
        try:
            proof = await conn.recv_exact(MAC_BYTES, self.handshake_timeout_s, "client proof")
        except _PeerClosed:
            self._refuse("closed", peer, "data plane peer %s hung up during the handshake", peer)
            return False
        key = _match_key(self._keys, b"cli", cn, sn, proof)
        if key is None:
            self._refuse(
                "secret",
                peer,
                "data plane refused %s: its proof matches no accepted cluster secret",
                peer,
            )
            await conn.send_all(b"\x01")
            return False
        await conn.send_all(b"\x00" + _mac(key, b"srv", cn, sn))
        return True

    async def _reply(self, conn: _Conn, status: Status, reason: str = "") -> None:
        body = reason.encode("utf-8")[:MAX_REASON_BYTES]
        await conn.send_all(_REPLY.pack(status, len(body)) + body)

    async def _requests_loop(self, conn: _Conn, peer: str) -> None:
        buf: bytearray | None = None  # TLS only: the slice being encrypted, made at the first chunk
        while True:
            first: bytes | bytearray = b""
            with trio.move_on_after(self.idle_timeout_s):
                first = await conn.receive_some(1)
            if not first:  # EOF, or idle for too long (the scope ended with nothing)
                return
            self._requests += 1
            kind = first[0]
            if kind == REQ_GET_CHUNK:
                body = await conn.recv_exact(
                    _GET_CHUNK_BODY.size, self.request_timeout_s, "GET_CHUNK request"
                )
                raw_hash, index = _GET_CHUNK_BODY.unpack(body)
                if buf is None and conn.tls:
                    buf = bytearray(SEND_SLICE_BYTES)
                await self._get_chunk(conn, peer, raw_hash.hex(), index, buf)
            elif kind == REQ_HAVE:
                raw_hash = await conn.recv_exact(HASH_BYTES, self.request_timeout_s, "HAVE request")
                await self._have(conn, raw_hash.hex())
            elif kind == REQ_HAVE_WAIT and hasattr(self._resolver, "wait_have"):
                body = await conn.recv_exact(_HAVE_WAIT_BODY.size, self.request_timeout_s, "HAVE_WAIT request")
                raw_hash, known, wait_ms = _HAVE_WAIT_BODY.unpack(body)
                await self._have_wait(conn, raw_hash.hex(), known, wait_ms / 1000)
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
        reply = _REPLY.pack(Status.OK, len(bits)) + bytes(bits)
        self._have_bytes += len(reply)
        await conn.send_all(reply)

    async def _have_wait(self, conn: _Conn, hash_hex: str, known: int, wait_s: float) -> None:
        """A neighbour's HAVE that waits for news: answered as soon as this
        node's chunks of the manifest differ from the version it knows."""
        self._have_waits += 1
        wait_s = min(wait_s, MAX_HAVE_WAIT_S, self.idle_timeout_s / 2)
        try:
            got = await self._resolver.wait_have(hash_hex, known, wait_s)  # type: ignore[attr-defined]
        except Exception:
            logger.exception("data plane resolver.wait_have(%s) failed", hash_hex)
            got = None
        if got is None:
            await self._reply(conn, Status.NOT_FOUND, "no such manifest")
            return
        version, bits = got
        if len(bits) > MAX_BITFIELD_BYTES:
            await self._reply(conn, Status.NOT_FOUND, "bitfield too large")
            return
        reply = _REPLY.pack(Status.OK, _VERSION.size + len(bits)) + _VERSION.pack(version) + bytes(bits)
        self._have_bytes += len(reply)
        await conn.send_all(reply)

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
            arriving = self._arriving(hash_hex, index)
            if arriving is not None:
                await self._pass_on(conn, arriving)
                return
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
            async with self._slots:
                self._sending += 1
                try:
                    await conn.send_all(_REPLY.pack(Status.OK, length))
                    sent = await conn.send_file(fd, offset, length, self.stall_timeout_s, self._egress, buf)
                finally:
                    self._sending -= 1
            self._bytes_sent += sent
        finally:
            self._sends -= 1
            os.close(fd)

    def _arriving(self, hash_hex: str, index: int) -> Arriving | None:
        get = getattr(self._resolver, "arriving", None)
        if get is None:
            return None
        try:
            found = get(hash_hex, index)
        except Exception:
            logger.exception("data plane resolver.arriving(%s, %d) failed", hash_hex, index)
            return None
        return found if isinstance(found, Arriving) else None

    async def _pass_on(self, conn: _Conn, arriving: Arriving) -> None:
        """Send a chunk as it arrives here (its last bytes once it is
        verified); if it fails its hash here, the connection is closed
        before the chunk is whole, and the receiver asks someone else."""
        self._sends += 1
        arriving.readers += 1
        try:
            async with self._slots:
                self._sending += 1
                try:
                    sent = await self._send_arriving(conn, arriving)
                finally:
                    self._sending -= 1
            self._bytes_sent += sent
            self._passed_on += 1
        finally:
            arriving.readers -= 1
            self._sends -= 1


    async def _send_arriving(self, conn: _Conn, arriving: Arriving) -> int:
        await conn.send_all(_REPLY.pack(Status.OK, arriving.length))
        sent = 0
        while sent < arriving.length:
            with trio.move_on_after(self.stall_timeout_s) as scope:
                limit = await arriving.wait_beyond(sent)
            if scope.cancelled_caught:
                raise trio.TooSlowError(f"passing on a chunk: nothing arrived for {self.stall_timeout_s:g} s")
            if limit < 0:
                raise _PeerClosed("the chunk failed here: not passed on")
            while sent < limit:
                end = min(limit, sent + SEND_SLICE_BYTES)
                if self._egress is not None:
                    await self._egress.take(end - sent)
                await _stall_bounded(self.stall_timeout_s, "passing on a chunk", conn.send_all, arriving.view[sent:end])
                sent = end
        return sent


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
