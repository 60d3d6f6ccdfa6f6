"""One streamed HTTP/1.1 exchange on a plain socket (h11), for the CLI's bulk
bytes: a bundle exported or imported moves at the socket's pace, in blocks of
``RECV_BYTES``, with none of a general client's per-block work (httpx reads
64 KiB at a time and wraps each; at a gigabyte a second that was a third of
an export's time).  JSON calls keep using ``ApiClient``.

A response that comes while the body is still being sent (a node that
refuses a bundle before reading all of it) is read and returned, not lost
in a broken pipe.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

__all__ = ["RECV_BYTES", "RawResponse", "exchange"]

RECV_BYTES = 1024 * 1024
HEAD_MAX_BYTES = 64 * 1024


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: Iterator[bytes]  # read it through (or close the socket with ``close``)
    sock: socket.socket

    def read(self, limit: int = 1 << 20) -> bytes:
        out = bytearray()
        for piece in self.body:
            out += piece
            if len(out) > limit:
                break
        return bytes(out)

    def close(self) -> None:
        self.sock.close()


def _connect(url: str, verify: ssl.SSLContext | bool, timeout_s: float) -> tuple[socket.socket, str]:
    u = urlsplit(url)
    host = u.hostname or "127.0.0.1"
    port = u.port or (443 if u.scheme == "https" else 80)
    sock = socket.create_connection((host, port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if u.scheme == "https":
        if isinstance(verify, ssl.SSLContext):
            ctx = verify
        else:
            ctx = ssl.create_default_context()
            if not verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        sock = ctx.wrap_socket(sock, server_hostname=host)
    netloc = u.netloc.rpartition("@")[2]
    return sock, netloc


def exchange(url: str, method: str, target: str, headers: dict[str, str], body: Iterable[bytes] | None, *,
             verify: ssl.SSLContext | bool = True, timeout_s: float = 60.0) -> RawResponse:
    """Send one request (``body`` streamed with chunked encoding) and return the
    response with its body still to read.  ``OSError`` / ``h11.ProtocolError``
    when the connection fails."""
    sock, netloc = _connect(url, verify, timeout_s)
    conn = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=HEAD_MAX_BYTES)
    head = [("host", netloc), ("connection", "close"), *headers.items()]
    if body is not None:
        head.append(("transfer-encoding", "chunked"))
    try:
        sock.sendall(conn.send(h11.Request(method=method, target=target, headers=head)))
        if body is not None:
            try:
                for block in body:
                    if block:
                        sock.sendall(conn.send(h11.Data(data=block)))
                sock.sendall(conn.send(h11.EndOfMessage()))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the node answered early and closed: its answer is read below
        event = _next(conn, sock)
        while not isinstance(event, h11.Response):
            if isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("the node closed the connection without an answer")
            event = _next(conn, sock)
    except BaseException:
        sock.close()
        raise
    got = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
    return RawResponse(event.status_code, got, _body(conn, sock), sock)


def _next(conn: h11.Connection, sock: socket.socket) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(sock.recv(RECV_BYTES))


def _body(conn: h11.Connection, sock: socket.socket) -> Iterator[bytes]:
    try:
        while True:
            event = _next(conn, sock)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return
    finally:
        sock.close()
