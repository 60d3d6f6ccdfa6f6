"""The HTTP server's connection handling, against a real ``meshnode`` process."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .test_process import Proc, states, wait

TOKEN = "t" * 40


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    p = Proc("h", tmp_path_factory.mktemp("http"), None, ("--api-tokens", TOKEN, "--cluster-secret", "c" * 40)).start()
    yield p
    p.kill()


def _head(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize(
    ("method", "path", "token", "status"),
    [
        ("POST", "/models/m/register", None, b"401"),
        ("POST", "/no/such/route", TOKEN, b"404"),
        ("POST", "/health", TOKEN, b"405"),
        ("POST", "/models/m/locations/h:disk", TOKEN, b"404"),
        ("POST", "/mesh/v1/actions", None, b"401"),
    ],
)
def test_a_response_before_the_body_does_not_hang_the_connection(
    node: Proc, method: str, path: str, token: str | None, status: bytes
) -> None:
    """A route that answered before the body arrived left a keep-alive
    connection hanging 30 s (40 of 40 tries): Quart cancelled the response's
    task while hypercorn was still closing the connection in it.  Now the
    response says ``Connection: close`` and the server closes at once."""
    s = socket.create_connection(("127.0.0.1", node.port))
    s.settimeout(10)  # the hang was 30 s
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n{auth}\r\n".encode())
    time.sleep(0.03)  # the body comes a little after the headers, as the report had it
    s.sendall(b"x" * 100)
    head = _head(s)
    assert head.split(b" ")[1] == status and b"connection: close" in head.lower()
    if status == b"405":  # and says what the route takes
        assert b"\r\nallow: get, head, options\r\n" in head.lower(), head
    rest = b""
    try:  # a hang ends in the socket's 10 s timeout, and fails the test
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        while chunk := s.recv(4096):
            rest += chunk
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert b'"ok"' not in rest  # closed, not served
    s.close()
    assert httpx.get(node.url + "/health", timeout=5).status_code == 200


def test_keep_alive_still_works_for_requests_that_were_read(node: Proc) -> None:
    with httpx.Client(headers={"authorization": f"Bearer {TOKEN}"}) as c:
        for i in range(5):
            r = c.post(node.url + f"/models/k{i}/register", json={})
            assert r.status_code == 201 and "connection" not in r.headers
        r = c.get(node.url + "/models")
        assert r.status_code == 200 and "connection" not in r.headers


def _connect_from(src_ip: str, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((src_ip, 0))  # any 127.x.y.z is this host: many client addresses on loopback
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def _sort(socks: list[socket.socket]) -> tuple[list[socket.socket], list[socket.socket]]:
    """(admitted, refused): a refused connection gets a 503 and is closed at
    once; an admitted one stays silent, waiting for our request.  Decided
    within the 5 s a request head may take, so the admitted are all still open."""
    refused: list[socket.socket] = []
    pending = list(socks)
    while pending:
        readable, _, _ = select.select(pending, [], [], 0.3)
        if not readable:
            break  # a quiet 0.3 s after the last refusal: the rest were admitted
        for s in readable:
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                data = b""
            assert data == b"" or (data.startswith(b"HTTP/1.1 503") and b"TOO_MANY_CONNECTIONS" in data), data
            refused.append(s)
            pending.remove(s)
    return pending, refused


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[tuple[Proc, Proc]]:
    extra = ("--max-connections", "64", "--max-client-connections", "8")
    a = Proc("ca", tmp_path, None, extra).start()
    b = Proc("cb", tmp_path, a.address).start()
    yield a, b
    for p in (a, b):
        p.kill()


def test_connection_bounds_keep_health_and_peers_answering(capped: tuple[Proc, Proc]) -> None:
    """About 1,000 idle connections stopped /health at ulimit -n 1024, and
    thousands more made peers mark the node dead.  Now one client gets at
    most --max-client-connections, all clients together all but a reserve,
    and the reserve serves peers and local clients."""
    a, b = capped
    held: list[socket.socket] = []
    try:
        # One client address: 8 admitted, the 9th turned away with a 503.
        admitted, refused = _sort([_connect_from("127.0.0.2", a.port) for _ in range(9)])
        held += admitted + refused
        assert (len(admitted), len(refused)) == (8, 1)
        # Many client addresses: the total stops short of the reserve (64 - 8).
        admitted, refused = _sort([_connect_from(f"127.0.0.{i}", a.port) for i in range(3, 20) for _ in range(8)])
        held += admitted + refused
        # (The node's own peer connections, from b on 127.0.0.1, count towards the total too.)
        assert 40 <= len(admitted) <= 64 - 8 - 8 and len(refused) == 17 * 8 - len(admitted)
        # The reserve: local clients and peers still get through.
        assert httpx.get(a.url + "/health", timeout=5).status_code == 200
        assert httpx.post(b.url + "/models/during-flood/register", json={}, timeout=5).status_code == 201
        wait(lambda: httpx.get(a.url + "/models/during-flood", timeout=2).status_code == 200, 4, "gossip during the flood")
        assert states(b.url)["ca"] == "alive"
        metrics = httpx.get(a.url + "/metrics", timeout=5).text
        assert "meshnode_http_connections_refused_total" in metrics
    finally:
        for s in held:
            s.close()


def test_a_slow_request_head_is_cut_off(capped: tuple[Proc, Proc]) -> None:
    """A client that sends its request head a byte at a time (slowloris) is
    disconnected once the head timeout (5 s) has passed."""
    a, _ = capped
    s = _connect_from("127.0.0.50", a.port)
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    t0 = time.monotonic()
    closed_after = None
    for byte in head:
        try:
            s.send(bytes([byte]))
            s.settimeout(0.5)
            if s.recv(1) == b"":
                closed_after = time.monotonic() - t0
                break
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            closed_after = time.monotonic() - t0
            break
    s.close()
    # Cut off (before the head's last byte, 50 s away), and not before the head timeout.
    assert closed_after is not None and closed_after >= 4, closed_after
