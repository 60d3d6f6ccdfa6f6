"""A lean HTTP/1.1 client for inference hops: h11 over trio streams, with
kept-alive connections per address.

The proxy (``meshnode/proxy.py``) sends one request and streams the answer
back; a general client (httpx) spends more per request on what this needs
none of (redirects, cookies, auth flows, decoding, a pool of pools).  This
one does only that, and bounds everything: a connect timeout, a timeout
between two reads, at most ``IDLE_MAX`` idle connections per address, and
one retry on a fresh connection when a kept-alive one turns out closed
before any byte of the answer came.

Errors: ``Unreachable`` (no connection: refused, timed out, DNS), then the
caller may try another service; ``BadAnswer`` (not HTTP, or cut before its
head); ``TimeoutError`` (no byte within the read timeout).  An answer cut
mid-body ends its body iterator with ``BadAnswer``.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

import h11
import trio

__all__ = ["Answer", "BadAnswer", "EngineClient", "Unreachable"]

IDLE_MAX = 32  # kept-alive connections per address
IDLE_S = 3.0  # a kept-alive connection idle longer is closed, before the other side drops it (hypercorn: 5 s)
READ_BYTES = 65536


class Unreachable(Exception):
    """No connection could be made (the request was not sent)."""


class BadAnswer(Exception):
    """What came back is not an HTTP answer, or it broke off."""


@dataclass
class _Conn:
    stream: trio.abc.Stream
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0

    async def close(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await self.stream.aclose()


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: AsyncGenerator[bytes, None]

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


class EngineClient:
    def __init__(self, *, connect_timeout_s: float = 5.0, read_timeout_s: float = 600.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self.opened = 0  # connections made, for tests and metrics

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                await c.close()
        self._idle.clear()

    async def _connect(self, scheme: str, host: str, port: int) -> _Conn:
        try:
            with trio.fail_after(self.connect_timeout_s):
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
                if scheme == "https":
                    ctx = self.ssl_context or ssl.create_default_context()
                    tls = trio.SSLStream(stream, ctx, server_hostname=host)
                    await tls.do_handshake()
                    stream = tls
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as e:
            raise Unreachable(f"{host}:{port}: {type(e).__name__}") from None
        self.opened += 1
        return _Conn(stream)

    async def request(self, scheme: str, host: str, port: int, method: str, target: str,
                      headers: Sequence[tuple[str, str]], body: bytes) -> Answer:
        """Send one request; its answer, its body to be read (and the
        connection kept for the next request once the body ends)."""
        key = (scheme, host, port)
        idle = self._idle.get(key) or []
        now = trio.current_time()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since > IDLE_S:
                await conn.close()
                continue
            try:
                return await self._exchange(key, conn, method, target, headers, body)
            except _Stale:  # the other side had closed it: once more, on a new one
                await conn.close()
                break
        conn = await self._connect(scheme, host, port)
        try:
            return await self._exchange(key, conn, method, target, headers, body)
        except _Stale:
            await conn.close()
            raise BadAnswer(f"{host}:{port} closed the connection without an answer") from None

    async def _exchange(self, key: tuple[str, str, int], conn: _Conn, method: str, target: str,
                        headers: Sequence[tuple[str, str]], body: bytes) -> Answer:
        host = f"{key[1]}:{key[2]}"
        hdrs = [("host", host), ("content-length", str(len(body))), *headers]
        got_bytes = False
        try:
            data = conn.h11.send(h11.Request(method=method, target=target, headers=hdrs))
            data = (data or b"") + (conn.h11.send(h11.Data(data=body)) or b"") + (
                conn.h11.send(h11.EndOfMessage()) or b"")
            await conn.stream.send_all(data)
            while True:
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    with trio.fail_after(self.read_timeout_s):
                        more = await conn.stream.receive_some(READ_BYTES)
                    if not more and not got_bytes:
                        raise _Stale
                    got_bytes = got_bytes or bool(more)
                    conn.h11.receive_data(bytes(more))
                    continue
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    return Answer(event.status_code, list(event.headers), self._body(key, conn))
                raise BadAnswer(f"{host} answered {type(event).__name__} before its head")
        except (_Stale, trio.TooSlowError):
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            if not got_bytes:
                raise _Stale from None
            await conn.close()
            raise BadAnswer(f"{host} broke off its answer: {type(e).__name__}") from None
        except h11.ProtocolError as e:
            await conn.close()
            raise BadAnswer(f"{host} answered something that is not HTTP: {e}") from None
        except BaseException:
            await conn.close()
            raise

    async def _body(self, key: tuple[str, str, int], conn: _Conn) -> AsyncGenerator[bytes, None]:
        done = False
        try:
            while True:
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    with trio.fail_after(self.read_timeout_s):
                        more = await conn.stream.receive_some(READ_BYTES)
                    conn.h11.receive_data(bytes(more))  # b"": the other side closed (h11 tells whether that ends it)
                    continue
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                    continue
                if isinstance(event, h11.EndOfMessage):
                    done = True
                    return
                raise BadAnswer(f"{key[1]}:{key[2]}: the answer broke off ({type(event).__name__})")
        except h11.RemoteProtocolError as e:
            raise BadAnswer(f"{key[1]}:{key[2]}: the answer broke off: {e}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise BadAnswer(f"{key[1]}:{key[2]}: the answer broke off: {type(e).__name__}") from None
        finally:
            await self._release(key, conn, done)

    async def _release(self, key: tuple[str, str, int], conn: _Conn, done: bool) -> None:
        h = conn.h11
        if done and h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
            idle = self._idle.setdefault(key, [])
            if len(idle) < IDLE_MAX:
                conn.idle_since = trio.current_time()
                idle.append(conn)
                return
        await conn.close()


class _Stale(Exception):
    """A kept-alive connection closed by the other side before the answer began."""
