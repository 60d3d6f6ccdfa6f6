"""The HTTP server's connection handling, against a real ``meshnode`` process."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from .test_process import Proc

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
    t0 = time.monotonic()
    rest = b""
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        while chunk := s.recv(4096):
            rest += chunk
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert time.monotonic() - t0 < 5 and b'"ok"' not in rest  # closed at once, not after a timeout
    s.close()
    assert httpx.get(node.url + "/health", timeout=5).status_code == 200


def test_keep_alive_still_works_for_requests_that_were_read(node: Proc) -> None:
    with httpx.Client(headers={"authorization": f"Bearer {TOKEN}"}) as c:
        for i in range(5):
            r = c.post(node.url + f"/models/k{i}/register", json={})
            assert r.status_code == 201 and "connection" not in r.headers
        r = c.get(node.url + "/models")
        assert r.status_code == 200 and "connection" not in r.headers
