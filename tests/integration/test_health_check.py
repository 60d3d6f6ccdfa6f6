"""A pipeline's health_check is no port scanner (issue 22), and reaches a
member by its node id, as every gswarm pipeline names it (issue 23).

Hermetic: names are answered by a resolver the test installs for its trio run
(no DNS query leaves the machine), and every server is on loopback.  The one
public address the rebinding test names is routed, by a fake network edge, to
a loopback server: no connection ever goes anywhere else.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio

from protocol.healthcheck import UNREACHABLE, unreachable_message

from .conftest import Mesh, all_alive, run_pipeline

PUBLIC = "93.184.216.34"  # a public address, only ever routed to a loopback server here


class Resolver(trio.abc.HostnameResolver):
    """Names answered from a table (each name: one answer per lookup, the last
    repeated); any other name does not exist.  Counts lookups per name."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: Counter[str] = Counter()

    async def getaddrinfo(self, host: bytes | None, port: bytes | str | int | None, family: int = 0,
                          type: int = 0, proto: int = 0, flags: int = 0) -> list[Any]:
        name = (host or b"").decode() if isinstance(host, bytes) else str(host)
        self.calls[name] += 1
        seq = self.answers.get(name)
        if not seq:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        ip = seq[min(self.calls[name], len(seq)) - 1]
        p = int(port or 0)
        if ":" in ip:
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, p, 0, 0))]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, p))]

    async def getnameinfo(self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int) -> tuple[str, str]:
        raise socket.gaierror(socket.EAI_NONAME, "not in this test")


@contextmanager
def resolver(answers: dict[str, list[str]]) -> Iterator[Resolver]:
    r = Resolver(answers)
    old = trio.socket.set_custom_hostname_resolver(r)
    try:
        yield r
    finally:
        trio.socket.set_custom_hostname_resolver(old)


@dataclass
class Server:
    port: int = 0
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0

    def host_headers(self) -> list[str]:
        out = []
        for raw in self.requests:
            for line in raw.split(b"\r\n")[1:]:
                if line.lower().startswith(b"host:"):
                    out.append(line.split(b":", 1)[1].strip().decode())
        return out


@asynccontextmanager
async def server(host: str, answer: bytes | None = b"200 OK", hang: bool = False) -> AsyncIterator[Server]:
    """A loopback HTTP server: answers ``answer`` (a status line's end); None closes
    the connection once the request is in; ``hang`` never answers."""
    s = Server()
    listeners = await trio.open_tcp_listeners(0, host=host)
    s.port = listeners[0].socket.getsockname()[1]

    async def handle(stream: trio.SocketStream) -> None:
        s.connections += 1
        data = b""
        with trio.move_on_after(10):
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
        s.requests.append(data)
        if hang:
            await trio.sleep_forever()
        if answer is not None:
            await stream.send_all(b"HTTP/1.1 " + answer + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await stream.aclose()

    async with trio.open_nursery() as n:
        await n.start(trio.serve_listeners, handle, listeners)
        yield s
        n.cancel_scope.cancel()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def by_id(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["action_id"]: a for a in job["actions"]}


def check(aid: str, url: str, timeout_s: float) -> dict[str, Any]:
    return {"action_id": aid, "action_type": "health_check", "target_url": url, "timeout_s": timeout_s}


async def test_an_outside_target_on_a_private_address_is_refused_before_any_connection(mesh: Mesh) -> None:
    """Without --allow-private-sources: a name that resolves to loopback, and a
    loopback address that is no member's, fail at once (long before their
    timeout_s) with the one message, and their servers never see a connection.
    With the flag, the very same checks reach them (so the servers are there)."""
    a = await mesh.start("node1", confined=True)
    b = await mesh.start("node2")  # not joined: a mesh of its own, private sources allowed
    with resolver({"admin.internal.test": ["127.0.0.1"]}):
        async with server("127.0.0.1") as named, server("127.0.0.2") as literal:
            doc = {"name": "scan", "fail_fast": False, "actions": [
                check("by_name", f"http://admin.internal.test:{named.port}/health", 30),
                check("literal", f"http://127.0.0.2:{literal.port}/admin", 30)]}
            job = await run_pipeline(mesh, a, doc, timeout_s=20)
            acts = by_id(job)
            for aid, shown in (("by_name", f"http://admin.internal.test:{named.port}/health"),
                               ("literal", f"http://127.0.0.2:{literal.port}/admin")):
                act = acts[aid]
                assert act["status"] == "failed", job
                assert act["error"] == {"code": "UNHEALTHY", "message": unreachable_message(shown, "node1")}, act
                assert act["finished_ms"] - act["started_ms"] < 5000, act  # refused, not tried for 30 s
            assert (named.connections, literal.connections) == (0, 0)

            allowed = await run_pipeline(mesh, b, doc, timeout_s=20)
            assert allowed["status"] == "completed", allowed
            assert named.connections >= 1 and literal.connections >= 1
            assert f"admin.internal.test:{named.port}" in named.host_headers()  # the name kept for Host


async def test_every_unreachable_target_fails_with_one_message(mesh: Mesh) -> None:
    """Refused, no such name, a connection closed before the answer, no answer
    at all: one message, no exception class.  A target that answers still
    says its status (what a health check is for)."""
    a = await mesh.start("node1")
    closed = free_port()
    with resolver({}):
        async with server("127.0.0.1", answer=None) as dropper, server("127.0.0.1", hang=True) as sink, \
                server("127.0.0.1", answer=b"401 Unauthorized") as locked:
            urls = {"refused": f"http://127.0.0.1:{closed}/health", "no_name": "http://nowhere.test:8080/health",
                    "dropped": f"http://127.0.0.1:{dropper.port}/health",
                    "hangs": f"http://127.0.0.1:{sink.port}/health", "locked": f"http://127.0.0.1:{locked.port}/"}
            doc = {"name": "causes", "fail_fast": False,
                   "actions": [check(aid, url, 1.5) for aid, url in urls.items()]}
            job = await run_pipeline(mesh, a, doc, timeout_s=30)
    acts = by_id(job)
    for aid in ("refused", "no_name", "dropped", "hangs"):
        assert acts[aid]["error"] == {"code": "UNHEALTHY", "message": unreachable_message(urls[aid], "node1")}, \
            acts[aid]
        assert UNREACHABLE in acts[aid]["error"]["message"]
    assert dropper.connections >= 1 and sink.connections >= 1  # those were reached, and said nothing
    assert acts["locked"]["error"]["code"] == "UNHEALTHY", acts["locked"]
    assert "HTTP 401" in acts["locked"]["error"]["message"] and UNREACHABLE not in acts["locked"]["error"]["message"]


async def test_a_node_id_in_target_url_reaches_that_member(mesh: Mesh) -> None:
    """gswarm's http://<node id>:<port>/<path>: the member's advertised host,
    port and path kept, with no DNS name for it; the step says where it ran
    from and what it fetched.  A member's host is the mesh's own: both work on
    nodes that fetch only public sources."""
    a = await mesh.start("node1", confined=True)
    b = await mesh.start("node2", join=[a], confined=True)
    await all_alive(mesh, [a, b])
    port = httpx.URL(b.url).port
    with resolver({}):  # "node2" is no name anywhere
        doc = {"name": "gswarm", "actions": [
            check("by_id", f"http://node2:{port}/health", 20),
            check("by_host", f"http://127.0.0.1:{port}/health", 20)]}
        job = await run_pipeline(mesh, a, doc, timeout_s=40)
    assert job["status"] == "completed", job
    for aid in ("by_id", "by_host"):
        part = by_id(job)[aid]["parts"][0]
        assert part["node"] == "node1" and part["note"].startswith(
            f"healthy (HTTP 200) from node1: fetched http://127.0.0.1:{port}/health after "), part


async def test_a_name_is_looked_up_once_and_the_checked_address_is_fetched(
        mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the name answers a public address to the check and a
    loopback one after; the check fetches the public address it checked (with
    the name in Host), and the loopback server never hears of it."""
    a = await mesh.start("node1", confined=True)
    real_open = trio.open_tcp_stream
    routed: list[tuple[str, int]] = []  # where connections to the checked port went

    async with server("127.0.0.1") as public, server("127.0.0.1") as inside:
        async def fake_edge(host: str | bytes, port: int, **kw: Any) -> trio.SocketStream:
            """The only way out: loopback as it is; PUBLIC to the ``public`` server; nothing else."""
            h = host.decode() if isinstance(host, bytes) else str(host)
            try:
                addrs = [str(ipaddress.ip_address(h.strip("[]")))]
            except ValueError:
                addrs = [str(i[4][0]) for i in await trio.socket.getaddrinfo(h, port, type=socket.SOCK_STREAM)]
            for addr in addrs:
                routed.append((addr, port))
                if addr == PUBLIC:
                    return await real_open("127.0.0.1", public.port)
                if ipaddress.ip_address(addr).is_loopback:
                    return await real_open(addr, port, **kw)
            raise OSError(f"the test's network has no route to {h}")

        monkeypatch.setattr(trio, "open_tcp_stream", fake_edge)
        async with httpx.AsyncClient() as c:  # the edge is where httpx connects, or this test must not go on
            assert (await c.get(f"http://127.0.0.1:{inside.port}/")).status_code == 200 and routed
        inside.requests.clear()
        routed.clear()
        with resolver({"flip.test": [PUBLIC, "127.0.0.1"]}) as r:
            job = await run_pipeline(mesh, a, {"name": "rebind", "actions": [
                check("h", f"http://flip.test:{inside.port}/health", 10)]}, timeout_s=20)
    assert job["status"] == "completed", job
    to_port = [addr for addr, port in routed if port == inside.port]
    assert r.calls["flip.test"] == 1 and to_port == [PUBLIC], (r.calls, routed)
    assert public.host_headers() == [f"flip.test:{inside.port}"] and inside.requests == []
