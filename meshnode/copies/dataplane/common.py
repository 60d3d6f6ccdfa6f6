"""What the data plane's server and client share: the wire constants, the
errors, and one authenticated connection (``_Conn``).  See the package
docstring for the protocol."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import Protocol, TypeVar

import trio
import xxhash

from meshnode.ratelimit import TokenBucket

logger = logging.getLogger("meshnode.copies.dataplane")

MAGIC = b"MNDP"
VERSION = 2  # 2: the client proves the secret first
NONCE_BYTES = 16
MAC_BYTES = 32
HASH_BYTES = 16
BUSY_BYTE = 0  # in place of the server's version: at capacity, retry elsewhere

REQ_GET_CHUNK = 1
REQ_HAVE = 2
REQ_HAVE_WAIT = 3  # HAVE, answered once the holder's chunks differ from the version the asker knows

_CLIENT_HELLO = struct.Struct("!4sB16s")  # magic, version, client nonce
_SERVER_HELLO = struct.Struct("!B16s")  # version, server nonce
_GET_CHUNK_BODY = struct.Struct("!16sI")  # manifest hash, chunk index
_HAVE_WAIT_BODY = struct.Struct("!16sII")  # manifest hash, the version the asker knows, how long to wait (ms)
_VERSION = struct.Struct("!I")  # first in a HAVE_WAIT answer's body, before the bitfield
_REPLY = struct.Struct("!BQ")  # status, length

MAX_REASON_BYTES = 256
MAX_BITFIELD_BYTES = 1 << 20  # 8 Mi chunks
MAX_CHUNK_BYTES = 1 << 31
MAX_HAVE_WAIT_S = 30.0  # the longest a HAVE_WAIT is held open
HOLD_BYTES = 64 * 1024  # a chunk passed on as it arrives: its last bytes go out once it is verified
SEND_SLICE_BYTES = 1 << 20  # egress tokens and cancellation checkpoints per slice
RECV_SLICE_BYTES = 1 << 20  # TLS reads, and a checkpoint at least this often
RECV_LOWAT_BYTES = 256 * 1024  # a chunk's reader is woken once this much is in (or the rest of the chunk)


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


class RequestRefused(DataPlaneError):
    """The peer refused the request as malformed or unknown (BAD_REQUEST):
    for a request it does not know, an older node."""


class ChunkMismatch(DataPlaneError):
    """The bytes the peer sent do not match the manifest (digest or length)."""


class Arriving:
    """A chunk still arriving at this node, passed on as it arrives (cut-through).

    The receiving side (the puller) reads the chunk into ``view`` and calls
    ``progress`` as bytes land, then ``done(ok)`` once the digest matched
    (or not).  A server sending it to another receiver waits with
    ``wait_beyond`` and sends what has arrived, except the last
    ``HOLD_BYTES``, which go out only once the chunk is verified: a chunk
    that fails its hash is never passed on whole (the sender closes the
    connection instead, and the other receiver asks someone else, with no
    strike against anyone).  ``readers`` counts the sends under way, so the
    buffer is not reused before they end."""

    __slots__ = ("_event", "length", "ok", "readers", "received", "view")

    def __init__(self, buf: bytearray, length: int) -> None:
        self.view = memoryview(buf)[:length]
        self.length = length
        self.received = 0
        self.ok: bool | None = None
        self.readers = 0
        self._event = trio.Event()

    def progress(self, received: int) -> None:
        self.received = received
        if self.readers:
            self._wake()

    def done(self, ok: bool) -> None:
        self.ok = ok
        self._wake()

    def _wake(self) -> None:
        event, self._event = self._event, trio.Event()
        event.set()

    async def wait_beyond(self, sent: int) -> int:
        """How far the chunk may be sent once more than ``sent`` bytes may
        be; -1 when it failed (nothing more will come)."""
        while True:
            if self.ok is False:
                return -1
            limit = self.length if self.ok else max(0, self.received - HOLD_BYTES)
            if limit > sent:
                return limit
            await self._event.wait()


class ChunkResolver(Protocol):
    """What the store gives the server: where a verified chunk lives."""

    def locate(self, manifest_hash_hex: str, index: int) -> tuple[str, int, int] | None:
        """(absolute file path, offset within that file, length), or None."""
        ...

    def have(self, manifest_hash_hex: str) -> bytes | None:
        """Bitfield of the verified chunks (bit i, MSB first, = chunk i), or None."""
        ...


class SwarmResolver(ChunkResolver, Protocol):
    """A resolver that also tells its neighbours of new chunks at once
    (``HAVE_WAIT``) and passes on chunks still arriving (``Arriving``)."""

    async def wait_have(self, manifest_hash_hex: str, known: int, timeout_s: float) -> tuple[int, bytes] | None:
        """(version, bitfield) once the version differs from ``known``, or
        when ``timeout_s`` passed (the same version); None: no such manifest.
        The bitfield lists chunks arriving (see ``arriving``) beside the verified ones."""
        ...

    def arriving(self, manifest_hash_hex: str, index: int) -> Arriving | None:
        """The chunk, if it is arriving now and may be passed on as it does."""
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
    """One authenticated connection: the interface both kinds implement."""

    tls = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    async def receive_some(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" at EOF.  Waits as long as it takes (the caller bounds it)."""
        raise NotImplementedError

    async def recv_exact(self, n: int, timeout_s: float, what: str) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = await _stall_bounded(timeout_s, what, self.receive_some, n - len(out))
            if not chunk:
                raise _PeerClosed(f"{what}: peer closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    async def recv_into(
        self, view: memoryview, hasher: xxhash.xxh3_128, timeout_s: float, ingress: TokenBucket | None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Fill ``view`` exactly, hashing as bytes arrive; ``progress(n)``: n
        bytes are in (plain connections only)."""
        raise NotImplementedError

    async def send_file(
        self, fd: int, offset: int, length: int, timeout_s: float, egress: TokenBucket | None, buf: bytearray | None
    ) -> int:
        """Send ``length`` bytes of ``fd`` from ``offset``; returns bytes sent."""
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    def close_now(self) -> None:
        """Close without awaiting (no TLS close_notify)."""
        raise NotImplementedError


class _PlainConn(_Conn):
    """A plain TCP connection on its raw fd: ``readv`` into the caller's
    buffer, ``os.sendfile`` from the page cache."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.fd = stream.socket.fileno()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def receive_some(self, n: int) -> bytes:
        return bytes(await self.stream.receive_some(n))

    async def recv_into(
        self, view: memoryview, hasher: xxhash.xxh3_128, timeout_s: float, ingress: TokenBucket | None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        length = len(view)
        pos = 0
        fd = self.fd
        since_checkpoint = 0
        # Limited: a slice per read, so tokens are taken in small steps.
        most = length if ingress is None or ingress.unlimited else RECV_SLICE_BYTES
        lowat = 1
        try:
            while pos < length:
                try:
                    n = os.readv(fd, [view[pos : pos + most]])
                except BlockingIOError:
                    since_checkpoint = 0
                    # Woken once a good part of the rest is here, not for every segment: on a
                    # shaped link that is a few wake-ups per chunk instead of hundreds.
                    want = min(length - pos, RECV_LOWAT_BYTES)
                    if want != lowat:
                        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
                        lowat = want
                    await _stall_bounded(timeout_s, "reading chunk", trio.lowlevel.wait_readable, fd)
                    continue
                if n == 0:
                    raise _PeerClosed(f"peer closed after {pos} of {length} chunk bytes")
                hasher.update(view[pos : pos + n])
                pos += n
                if progress is not None:
                    progress(pos)
                if ingress is not None:
                    await ingress.take(n)
                else:
                    since_checkpoint += n
                    if since_checkpoint >= RECV_SLICE_BYTES:
                        since_checkpoint = 0
                        await trio.lowlevel.checkpoint()
        finally:
            if lowat != 1:
                with contextlib.suppress(OSError):
                    self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    async def send_file(
        self, fd: int, offset: int, length: int, timeout_s: float, egress: TokenBucket | None, buf: bytearray | None
    ) -> int:
        end = offset + length
        sock_fd = self.fd
        while offset < end:
            slice_end = min(end, offset + SEND_SLICE_BYTES)
            if egress is not None:
                await egress.take(slice_end - offset)
            while offset < slice_end:
                try:
                    n = os.sendfile(sock_fd, fd, offset, slice_end - offset)
                except BlockingIOError:
                    await _stall_bounded(timeout_s, "sending chunk", trio.lowlevel.wait_writable, sock_fd)
                    continue
                if n == 0:
                    raise _PeerClosed("file ended before the chunk did (truncated on disk?)")
                offset += n
            if egress is None:
                await trio.lowlevel.checkpoint()
        return length

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    def close_now(self) -> None:
        self.stream.socket.close()


# Threads encrypting or decrypting chunks at once, for all TLS connections of
# the process: about one per core (more only fight over the cores).
_TLS_THREADS = trio.CapacityLimiter(max(2, os.cpu_count() or 2))


class _ThreadCancelled(Exception):
    """The trio side gave up on a chunk a worker thread was moving."""


class _TlsConn(_Conn):
    """A TLS connection on a non-blocking ``ssl.SSLSocket``: OpenSSL reads
    and writes the socket itself, a whole record per call, with no memory BIO
    and no Python-level copy in between (trio's ``SSLStream`` moves every
    byte through a memory BIO and Python bytes objects: 2x slower here).

    A whole chunk is encrypted or decrypted in a worker thread (OpenSSL
    releases the GIL), so the crypto of several connections runs beside the
    event loop.  The thread waits for the socket with ``poll`` and for the
    trio side with a wake-up pipe: when the request is cancelled (a stall, an
    endgame twin that won), the thread is woken, gives up, and is waited for,
    so it never touches the buffer or the socket after the call returned.
    Short messages (hello, requests, replies) stay on the event loop."""

    tls = True

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @classmethod
    async def wrap(
        cls, stream: trio.SocketStream, ctx: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> _TlsConn:
        """Take over ``stream``'s socket and do the TLS handshake (the caller bounds the time)."""
        raw = socket.socket(fileno=stream.socket.detach())
        raw.setblocking(False)
        try:
            sock = ctx.wrap_socket(
                raw, server_side=server_side, server_hostname=server_hostname, do_handshake_on_connect=False
            )
        except BaseException:
            raw.close()
            raise
        conn = cls(sock)
        try:
            await conn._io(sock.do_handshake)
        except BaseException:
            conn.close_now()
            raise
        return conn

    async def _io(self, op: Callable[..., _T], *args: object) -> _T:
        """``op(*args)`` on the non-blocking socket, waiting for it as OpenSSL asks."""
        while True:
            try:
                return op(*args)
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.sock)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.sock)
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as e:
                raise _PeerClosed(f"TLS connection closed: {e}") from None
            except ssl.SSLError as e:
                raise trio.BrokenResourceError(f"TLS error: {e}") from None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[await self._io(self.sock.send, view) :]

    async def receive_some(self, n: int) -> bytes:
        try:
            return await self._io(self.sock.recv, n)
        except _PeerClosed:
            return b""

    # -- chunks, in a worker thread ------------------------------------------------

    async def _in_thread(self, fn: Callable[..., None], *args: object) -> None:
        done = threading.Event()

        def work() -> None:
            try:
                fn(*args)
            finally:
                done.set()

        try:
            while True:  # a wake-up byte left by a cancel that lost the race
                os.read(self._wake_r, 64)
        except BlockingIOError:
            pass
        try:
            await trio.to_thread.run_sync(work, abandon_on_cancel=True, limiter=_TLS_THREADS)
        except trio.Cancelled:
            os.write(self._wake_w, b"\0")
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(done.wait, 10.0)
            raise
        except _ThreadCancelled:  # pragma: no cover - only after a cancel, which raised above
            raise trio.BrokenResourceError("cancelled") from None

    def _wait(self, events: int, timeout_s: float, what: str) -> None:
        """Block until the socket is ready for ``events``, the trio side gives
        up (``_ThreadCancelled``), or ``timeout_s`` passes with neither."""
        p = select.poll()
        p.register(self.sock, events)
        p.register(self._wake_r, select.POLLIN)
        ready = p.poll(timeout_s * 1000)
        if not ready:
            raise trio.TooSlowError(f"{what}: no progress for {timeout_s:g} s")
        if any(fd == self._wake_r for fd, _ in ready):
            raise _ThreadCancelled(what)

    def _recv_into_blocking(self, view: memoryview, hasher: xxhash.xxh3_128, timeout_s: float) -> None:
        length = len(view)
        pos = 0
        sock = self.sock
        while pos < length:
            try:
                n = sock.recv_into(view[pos:])  # one TLS record, decrypted into place
            except ssl.SSLWantReadError:
                self._wait(select.POLLIN, timeout_s, "reading chunk")
                continue
            except ssl.SSLWantWriteError:
                self._wait(select.POLLOUT, timeout_s, "reading chunk")
                continue
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                n = 0
            except ssl.SSLError as e:
                raise trio.BrokenResourceError(f"TLS error: {e}") from None
            if n == 0:
                raise _PeerClosed(f"peer closed after {pos} of {length} chunk bytes")
            pos += n
        hasher.update(view)

    async def recv_into(
        self, view: memoryview, hasher: xxhash.xxh3_128, timeout_s: float, ingress: TokenBucket | None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if ingress is None or ingress.unlimited:
            await self._in_thread(self._recv_into_blocking, view, hasher, timeout_s)
            return
        length = len(view)  # rate-limited: on the event loop, tokens taken as records arrive
        pos = 0
        while pos < length:
            data = await _stall_bounded(timeout_s, "reading chunk", self.receive_some, min(RECV_SLICE_BYTES, length - pos))
            if not data:
                raise _PeerClosed(f"peer closed after {pos} of {length} chunk bytes")
            n = len(data)
            view[pos : pos + n] = data
            hasher.update(data)
            pos += n
            await ingress.take(n)

    def _send_file_blocking(self, fd: int, offset: int, length: int, timeout_s: float, buf: bytearray) -> None:
        end = offset + length
        sock = self.sock
        while offset < end:
            view = memoryview(buf)[: min(end - offset, len(buf))]
            n = os.preadv(fd, [view], offset)
            if n <= 0:
                raise _PeerClosed("file ended before the chunk did (truncated on disk?)")
            view = view[:n]
            while view:
                try:
                    view = view[sock.send(view) :]
                except ssl.SSLWantWriteError:
                    self._wait(select.POLLOUT, timeout_s, "sending chunk")
                except ssl.SSLWantReadError:
                    self._wait(select.POLLIN, timeout_s, "sending chunk")
                except ssl.SSLError as e:
                    raise trio.BrokenResourceError(f"TLS error: {e}") from None
            offset += n

    async def send_file(
        self, fd: int, offset: int, length: int, timeout_s: float, egress: TokenBucket | None, buf: bytearray | None
    ) -> int:
        assert buf is not None
        if egress is None:
            await self._in_thread(self._send_file_blocking, fd, offset, length, timeout_s, buf)
            return length
        end = offset + length  # rate-limited: on the event loop, a slice at a time
        while offset < end:
            slice_end = min(end, offset + SEND_SLICE_BYTES)
            await egress.take(slice_end - offset)
            view = memoryview(buf)[: slice_end - offset]
            n = os.preadv(fd, [view], offset)
            if n <= 0:
                raise _PeerClosed("file ended before the chunk did (truncated on disk?)")
            await _stall_bounded(timeout_s, "sending chunk", self.send_all, view[:n])
            offset += n
        return length

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()

    def close_now(self) -> None:
        self.sock.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1


def _close_now(conn: _Conn) -> None:
    """Close a connection without awaiting (plain sockets close at once; TLS skips close_notify)."""
    conn.close_now()
