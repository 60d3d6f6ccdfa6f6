"""The bulk paths of bundles, piece by piece: the CLI's raw HTTP exchange
(request bodies framed by hand, response bodies of known length read
straight from the socket) against a plain socket server, and an export's
runs of chunks read at once, each chunk still checked."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from meshnode.bundles.exporting import _LocalSource, _runs
from meshnode.cli.rawhttp import UploadStalled, exchange
from meshnode.errors import MeshError
from protocol.manifest import Manifest, manifest_from_bytes


def _serve(answer: Callable[[bytes], list[bytes]]) -> tuple[str, threading.Thread, dict[str, Any]]:
    """A one-connection server on loopback: it reads the request with h11 (the body
    whole), then sends ``answer(body)``'s pieces one by one, a moment apart."""
    srv = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, Any] = {}

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            h = h11.Connection(h11.SERVER)
            body = bytearray()
            while True:
                ev = h.next_event()
                if ev is h11.NEED_DATA:
                    h.receive_data(conn.recv(65536))
                elif isinstance(ev, h11.Request):
                    seen["headers"] = dict(ev.headers)
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
            seen["body"] = bytes(body)
            for piece in answer(bytes(body)):
                conn.sendall(piece)
                time.sleep(0.05)  # each piece its own read, most likely

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}", t, seen


def test_a_chunked_request_body_arrives_whole_and_a_sized_answer_is_read_as_sent() -> None:
    blocks = [os.urandom(n) for n in (1, 70_000, 0, 3 * 1024 * 1024 + 5)]
    sent = b"".join(blocks)
    body = os.urandom(5 * 1024 * 1024 + 3)

    def answer(got: bytes) -> list[bytes]:
        head = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body)
        return [head + body[:10], body[10:70_000], body[70_000:]]  # the head and the body's start together

    url, t, seen = _serve(answer)
    r = exchange(url, "POST", "/x", {"x-a": "b"}, iter(blocks), timeout_s=10)
    got = b"".join(r.body)
    t.join(10)
    assert seen["body"] == sent and seen["headers"][b"transfer-encoding"] == b"chunked"
    assert r.status == 200 and got == body


def test_a_sized_answer_cut_short_reads_short_and_a_chunked_answer_still_reads() -> None:
    url, t, _ = _serve(lambda got: [b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 40])
    r = exchange(url, "GET", "/x", {}, None, timeout_s=10)
    assert r.status == 200 and b"".join(r.body) == b"x" * 40  # the reader compares with content-length
    t.join(10)
    url, t, _ = _serve(lambda got: [b"HTTP/1.1 422 No\r\ntransfer-encoding: chunked\r\n\r\n",
                                    b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"])
    r = exchange(url, "GET", "/x", {}, None, timeout_s=10)
    assert r.status == 422 and r.read() == b"abcde"
    t.join(10)


def test_a_connection_closed_before_an_answer_is_an_error() -> None:
    url, t, _ = _serve(lambda got: [b"HTTP/1.1 200"])
    with pytest.raises((ConnectionResetError, h11.ProtocolError)):
        exchange(url, "GET", "/x", {}, None, timeout_s=10)
    t.join(10)


def test_runs_cut_a_file_s_chunks_at_the_limit() -> None:
    mib = 1024 * 1024
    m = manifest_from_bytes({"a": b"\0" * (5 * mib + 1), "b": b"", "c": b"\1" * mib}, mib)
    a = m.file_chunks("a")
    assert _runs(m, a, 2 * mib) == [range(0, 2), range(2, 4), range(4, 6)]
    assert _runs(m, a, 0) == [range(i, i + 1) for i in a]  # one chunk at a time
    assert _runs(m, a, 100 * mib) == [a]
    assert _runs(m, m.file_chunks("b"), mib) == []
    assert _runs(m, m.file_chunks("c"), mib // 2) == [m.file_chunks("c")]  # a chunk over the limit: alone


class _Copy:
    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path, self.manifest, self.model, self.kind = path, manifest, "m", "disk"


def test_a_run_read_at_once_checks_every_chunk_in_it(tmp_path: Path) -> None:
    mib = 1024 * 1024
    data = os.urandom(3 * mib + 7)
    m = manifest_from_bytes({"f": data}, mib)
    (tmp_path / "f").write_bytes(data)
    src = _LocalSource(None, _Copy(tmp_path, m))  # type: ignore[arg-type]

    async def read(indices: range) -> tuple[bytes, str]:
        h = hashlib.sha256()
        return await src.chunks(indices, h), h.hexdigest()

    got, digest = trio.run(read, range(0, 4))
    assert got == data and digest == hashlib.sha256(data).hexdigest()
    damaged = bytearray(data)
    damaged[2 * mib + 5] ^= 1  # the third chunk of the run
    (tmp_path / "f").write_bytes(damaged)
    with pytest.raises(MeshError) as e:
        trio.run(read, range(1, 4))
    assert e.value.code == "SOURCE_CORRUPT" and "chunk 2 " in e.value.message


def _stalling_server(answer: bytes | None) -> tuple[str, threading.Event, threading.Thread]:
    """A server that reads the request head, sends ``answer`` (or nothing), then
    reads nothing more and keeps the connection open until told to stop."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    stop = threading.Event()

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(1)
            if answer is not None:
                conn.sendall(answer)
            stop.wait(30)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}", stop, t


def _endless() -> Any:
    block = b"\0" * (1024 * 1024)
    for _ in range(4096):  # 4 GiB: far more than any socket buffer holds
        yield block


@pytest.mark.parametrize("early", [False, True])
def test_an_upload_the_node_stops_reading_ends_at_the_send_timeout(early: bool) -> None:
    """A node that stops reading the body without closing: the exchange gives
    up after ``send_timeout_s`` of no progress (not the answer's hour), and
    returns the answer the node sent early, if it did."""
    answer = b"HTTP/1.1 422 Unprocessable\r\ncontent-length: 2\r\n\r\n{}" if early else None
    url, stop, t = _stalling_server(answer)
    t0 = time.monotonic()
    try:
        if early:
            r = exchange(url, "POST", "/bundles", {}, _endless(), timeout_s=3600.0, send_timeout_s=1.0)
            assert r.status == 422 and r.read() == b"{}"
            r.close()
        else:
            with pytest.raises(UploadStalled, match="read nothing of the upload for 1 s"):
                exchange(url, "POST", "/bundles", {}, _endless(), timeout_s=3600.0, send_timeout_s=1.0)
    finally:
        stop.set()
        t.join(5)
    assert time.monotonic() - t0 < 15
