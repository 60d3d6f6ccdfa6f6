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

__all__ = ["RECV_BYTES", "RawResponse", "UploadStalled", "exchange"]

RECV_BYTES = 4 * 1024 * 1024
HEAD_MAX_BYTES = 64 * 1024
STALLED_ANSWER_S = 5.0  # after a stalled upload, how long an answer already sent has to arrive
_HEAD_END = b"\r\n\r\n"


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


class UploadStalled(ConnectionError):
    """The node read nothing of the body for the send timeout, and said nothing."""


def exchange(url: str, method: str, target: str, headers: dict[str, str], body: Iterable[bytes] | None, *,
             verify: ssl.SSLContext | bool = True, timeout_s: float = 60.0,
             send_timeout_s: float | None = None) -> RawResponse:
    """Send one request (``body`` streamed with chunked encoding) and return the
    response with its body still to read.  ``timeout_s`` bounds each wait for
    the answer; ``send_timeout_s`` (default: the same) each wait while sending
    the body: a node that stops reading without answering ends the exchange
    with ``UploadStalled`` then, not at the answer's bound.  ``OSError`` /
    ``h11.ProtocolError`` when the connection fails."""
    sock, netloc = _connect(url, verify, timeout_s)
    conn = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=HEAD_MAX_BYTES)
    head = [("host", netloc), ("connection", "close"), *headers.items()]
    if body is not None:
        head.append(("transfer-encoding", "chunked"))
    send_s = timeout_s if send_timeout_s is None else send_timeout_s
    stalled = False
    try:
        sock.sendall(conn.send(h11.Request(method=method, target=target, headers=head)))
        if body is not None:
            stalled = _send_chunked(sock, body, send_s)
        # After a stall, an answer the node sent early is read, briefly.
        sock.settimeout(min(timeout_s, STALLED_ANSWER_S) if stalled else timeout_s)
        return _answer(sock, conn)
    except TimeoutError:
        sock.close()
        if stalled:
            raise UploadStalled(f"the node read nothing of the upload for {send_s:g} s and gave no answer") from None
        raise
    except BaseException:
        sock.close()
        raise


def _send_chunked(sock: socket.socket, body: Iterable[bytes], timeout_s: float) -> bool:
    """Send ``body`` with the chunked encoding, each send bounded by
    ``timeout_s``; True when the node stopped reading (the send timed out)."""
    sock.settimeout(timeout_s)
    try:
        for block in body:
            if block:  # one chunk of the chunked encoding (h11's would join a copy of it)
                sock.sendall(b"%x\r\n" % len(block))
                sock.sendall(block)
                sock.sendall(b"\r\n")
        sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the node answered early and closed: its answer is read next
    except TimeoutError:
        return True
    return False


def _answer(sock: socket.socket, conn: h11.Connection) -> RawResponse:
    """The response on ``sock``, its body still to read."""
    try:
        rest = b""
        event: object = h11.NEED_DATA
        while not isinstance(event, h11.Response):
            if isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("the node closed the connection without an answer")
            if event is h11.NEED_DATA:
                head_bytes, rest = _head(sock, rest)
                conn.receive_data(head_bytes)  # b"": the stream ended (h11 says ConnectionClosed, or an error)
            event = conn.next_event()
    except BaseException:
        sock.close()
        raise
    got = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
    length = got.get("content-length")
    if length is not None and length.isdigit() and "transfer-encoding" not in got:
        body_iter = _sized_body(sock, rest, int(length))
    else:
        if rest:
            conn.receive_data(rest)  # (b"" would tell h11 the stream ended)
        body_iter = _body(conn, sock)
    return RawResponse(event.status_code, got, body_iter, sock)


def _head(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    """The bytes up to and including the end of the next head (an interim 1xx
    response's or the response's), and those received after it; all that came
    when the connection closed first, and ``b""`` when nothing did."""
    data = bytearray(buf)
    while (end := data.find(_HEAD_END)) < 0:
        if len(data) > HEAD_MAX_BYTES:
            return bytes(data), b""  # h11 refuses a head this long
        got = sock.recv(HEAD_MAX_BYTES)
        if not got:
            return bytes(data), b""
        data += got
    end += len(_HEAD_END)
    return bytes(data[:end]), bytes(data[end:])


def _sized_body(sock: socket.socket, first: bytes, length: int) -> Iterator[bytes]:
    """A body of ``length`` bytes, read from the socket as it comes; shorter
    when the connection closes first (the reader compares with the length)."""
    try:
        left = length
        if first:
            piece = first[:left]
            left -= len(piece)
            yield piece
        while left > 0:
            got = sock.recv(min(left, RECV_BYTES))
            if not got:
                return
            left -= len(got)
            yield got
    finally:
        sock.close()


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
