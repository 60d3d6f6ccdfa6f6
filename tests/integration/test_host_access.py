"""What an API token can make a node read: only the ingest roots, only public
HTTP servers; and what the node writes, only its owner (and group) can read."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import httpx
import pytest
import trio

from meshnode.copies.sources import SourceError
from meshnode.copies.sources.guard import PublicOnlyTransport, is_public_address

from .conftest import Mesh, wait_transfer


async def _download(mesh: Mesh, url: str, model: str, source_url: str, to: str = "a:disk") -> httpx.Response:
    return await mesh.client.post(url + f"/models/{model}/download", json={"source_url": source_url, "target_device": to})


async def test_local_ingest_is_confined_to_the_import_directory(mesh: Mesh) -> None:
    """``--from /etc/shadow`` copied the file to two nodes; ``metadata.files``
    listed any directory; 202 against 404 told which paths exist."""
    a = await mesh.start("a", confined=True)
    imports = mesh.root / "a" / "import"
    assert imports.is_dir() and stat.S_IMODE(imports.stat().st_mode) & 0o027 == 0
    outside = mesh.root / "elsewhere"
    outside.mkdir()
    (outside / "secret.txt").write_text("do not read")
    answers = []
    for path in ("/etc/shadow", "/etc", "/no/such/file", str(outside / "secret.txt"), str(imports / ".." / "state.msgpack")):
        r = await _download(mesh, a.url, "x", "file://" + path)
        answers.append((r.status_code, r.json()["error"]["code"]))
    assert set(answers) == {(403, "PATH_NOT_ALLOWED")}  # the same answer whether or not the path exists
    # A symlink inside the root that points out of it is judged by where it leads.
    (imports / "link").symlink_to("/etc/hostname")
    (imports / "dirlink").symlink_to(outside)
    for name in ("link", "dirlink", "dirlink/secret.txt"):
        r = await _download(mesh, a.url, "x", f"file://{imports}/{name}")
        assert (r.status_code, r.json()["error"]["code"]) == (403, "PATH_NOT_ALLOWED")
    # Inside: taken, and a symlink among the files is not followed.
    model = imports / "tiny"
    model.mkdir()
    (model / "weights.bin").write_bytes(os.urandom(10_000))
    (model / "passwd").symlink_to("/etc/passwd")
    r = await _download(mesh, a.url, "tiny", f"file://{model}")
    assert r.status_code == 202, r.text
    t = await wait_transfer(mesh, a.url, r.json()["transfer_id"])
    assert t["status"] == "done", t
    info = (await mesh.client.get(a.url + "/models/tiny")).json()
    assert info["metadata"]["files"] == ["weights.bin"]
    r = await _download(mesh, a.url, "y", f"file://{imports}/missing")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "SOURCE_NOT_FOUND")


async def test_operator_roots(mesh: Mesh) -> None:
    shared = mesh.root / "models"
    shared.mkdir()
    (shared / "m.bin").write_bytes(b"m" * 5000)
    a = await mesh.start("a", "--ingest-roots", f"{shared},{mesh.root / 'other'}", confined=True)
    r = await _download(mesh, a.url, "m", f"file://{shared}/m.bin")
    assert r.status_code == 202, r.text
    assert (await wait_transfer(mesh, a.url, r.json()["transfer_id"]))["status"] == "done"
    r = await _download(mesh, a.url, "n", f"file://{mesh.root / 'a' / 'import'}")  # not a root once roots are given
    assert r.status_code == 403


async def test_private_http_sources_are_refused_unless_allowed(mesh: Mesh) -> None:
    """``--url http://127.0.0.1:port/...`` made a node fetch from servers only
    reachable from inside."""
    a = await mesh.start("a", confined=True)
    for url in ("http://127.0.0.1:9/w.bin", "http://localhost:9/w.bin", "http://[::1]:9/w.bin",
                "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/w.bin", "http://[::ffff:127.0.0.1]:9/w.bin"):
        r = await _download(mesh, a.url, "w", url)
        assert (r.status_code, r.json()["error"]["code"]) == (403, "PRIVATE_SOURCE"), (url, r.text)
        assert "--allow-private-sources" in r.json()["error"]["message"]
    assert (await mesh.client.get(a.url + "/transfers")).json()["total_count"] == 0


@pytest.mark.parametrize(
    ("addr", "public"),
    [("93.184.216.34", True), ("2606:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False),
     ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
     ("0.0.0.0", False), ("224.0.0.1", False), ("::1", False), ("fe80::1", False), ("fd00::1", False),
     ("::ffff:127.0.0.1", False), ("::ffff:93.184.216.34", True), ("192.0.2.1", False)],
)
def test_public_addresses(addr: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(addr)) is public


async def test_every_hop_is_checked_and_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """A public name's request goes to the address that was checked (a DNS
    answer that changes afterwards cannot redirect it), with the name kept for
    Host and TLS; a redirect to a private address is refused; so is a name that
    resolves to a public and a private address."""
    answers = {"public.example": ["93.184.216.34"], "split.example": ["93.184.216.34", "10.0.0.7"]}

    async def fake_getaddrinfo(host: str, port: int, *args: object, **kw: object) -> list[tuple[object, ...]]:
        return [(2, 1, 6, "", (ip, port)) for ip in answers[host]]

    monkeypatch.setattr(trio.socket, "getaddrinfo", fake_getaddrinfo)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/redirect":
            return httpx.Response(302, headers={"location": "http://127.0.0.1:8080/admin"})
        return httpx.Response(200, content=b"ok")

    transport = PublicOnlyTransport(httpx.MockTransport(handler))
    async with httpx.AsyncClient(transport=transport, follow_redirects=True) as c:
        r = await c.get("https://public.example/w.bin")
        assert r.content == b"ok"
        assert seen[-1].url.host == "93.184.216.34" and seen[-1].headers["host"] == "public.example"
        assert seen[-1].extensions["sni_hostname"] == "public.example"
        n = len(seen)
        with pytest.raises(SourceError) as e:
            await c.get("http://public.example/redirect")
        assert e.value.code == "PRIVATE_SOURCE" and len(seen) == n + 1  # the private hop never went out
        with pytest.raises(SourceError) as e:
            await c.get("http://split.example/w.bin")
        assert e.value.code == "PRIVATE_SOURCE" and "10.0.0.7" in e.value.message


def _loose(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o027:
                out.append(f"{p} {oct(stat.S_IMODE(st.st_mode))}")
    return out


async def test_the_store_is_owner_only(mesh: Mesh) -> None:
    """Copies were written 0644 in 0755 directories.  Whatever the umask, now
    files are 0640 or tighter and directories 0750, on every tier, for local
    ingest, copies between tiers and nodes, and the node's own state; and a
    store written loosely by an older version is tightened at start."""
    old = os.umask(0o000)  # the worst umask: only the node's own modes protect it
    try:
        a = await mesh.start("a")
        b = await mesh.start("b", join=[a])
        src = mesh.root / "src"
        (src / "sub").mkdir(parents=True)
        (src / "w.bin").write_bytes(os.urandom(300_000))
        (src / "sub" / "x.json").write_text("{}")
        r = await _download(mesh, a.url, "acme/m", f"file://{src}")
        assert (await wait_transfer(mesh, a.url, r.json()["transfer_id"]))["status"] == "done"
        for to in ("a:dram", "b:disk", "b:dram"):
            r = await mesh.client.post(a.url + "/models/acme/m/copy", json={"to_device": to})
            node_url = a.url if to.startswith("a") else b.url
            assert (await wait_transfer(mesh, node_url, r.json()["transfer_id"]))["status"] == "done"
        roots = [mesh.root / "a", mesh.root / "a-shm", mesh.root / "b", mesh.root / "b-shm"]
        assert [p for root in roots for p in _loose(root)] == []
        assert stat.S_IMODE((mesh.root / "a" / "state.msgpack").stat().st_mode) == 0o600
        # A copy left loose (by an older version) is tightened when a node starts.
        copy_dir = next((mesh.root / "b" / "copies" / "acme" / "m").glob("@*[!t]"))
        os.chmod(copy_dir, 0o755)
        os.chmod(copy_dir / "w.bin", 0o644)
        await b.stop()
        await mesh.start("b", join=[a])
        assert _loose(mesh.root / "b") == []
    finally:
        os.umask(old)


def test_the_connection_guard_checks_its_host_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """``public_only_connections(host)``: a connection to ``host`` goes only to
    a public address, checked at the connect (here the name answers loopback);
    the thread's other connections (the node's own, such as its credential
    refresh from an instance's metadata service) are left alone, and so is
    every connection outside the guard."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import urllib3

    from meshnode.copies.sources.guard import guard_error, public_only_connections

    class Ok(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **kw: real(
        "127.0.0.1" if host == "rebind.example" else host, *a, **kw))
    try:
        with urllib3.PoolManager(retries=False) as pool:
            with public_only_connections("rebind.example"):
                assert pool.request("GET", f"http://127.0.0.1:{port}/").data == b"ok"  # another host: not ours
                with pytest.raises(urllib3.exceptions.HTTPError) as e:
                    pool.request("GET", f"http://rebind.example:{port}/")
                refused = guard_error(e.value)
                assert refused is not None and refused.code == "PRIVATE_SOURCE", e.value
                assert "rebind.example is 127.0.0.1" in refused.message
            assert pool.request("GET", f"http://rebind.example:{port}/").data == b"ok"  # outside the guard
    finally:
        server.shutdown()
        server.server_close()
