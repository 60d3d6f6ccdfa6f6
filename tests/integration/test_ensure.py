"""``meshnode ensure`` and its leases on real daemons on loopback (issue 29):
the copy is here, elsewhere, nowhere; a transfer that cannot finish in time
or cannot fit; an ensured copy survives eviction sweeps until its lease ends
(released, or run out); the command line as a pod's init container runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from .conftest import Handle, Mesh, all_alive, wait_for
from .test_bundles import MODEL, REGISTRATION, ingest, make_model, tree

MiB = 1024 * 1024


async def cli(h: Handle, tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[bytes]:
    exe = str(Path(sys.executable).parent / "meshnode")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "MESHNODE_TOKEN": ""}
    return await trio.run_process([exe, "--peer", h.url, *argv], capture_stdout=True, capture_stderr=True,
                                  check=False, env=env)


def one_line(r: subprocess.CompletedProcess[bytes]) -> str:
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1, r.stderr.decode()
    return lines[0]


async def test_ensure_when_the_copy_is_here_elsewhere_and_nowhere(mesh: Mesh, tmp_path: Path) -> None:
    src = make_model(tmp_path)
    n1 = await mesh.start("n1")
    n2 = await mesh.start("n2", join=[n1])
    await all_alive(mesh, [n1, n2])
    await ingest(mesh, n1, MODEL, src, registration=REGISTRATION)

    # Here: its path at once, and a lease for this host (the pod) on it.
    r = await cli(n1, tmp_path, "ensure", MODEL, "--on", "n1:disk", "--holder", "pod-a")
    assert r.returncode == 0, r.stderr.decode()
    here = n1.node.store.get(MODEL, "disk")
    assert here is not None and r.stdout.decode() == f"{here.path}\n"
    leases = (await mesh.client.get(n1.url + "/leases")).json()["leases"]
    assert [(x["model_name"], x["device"], x["holder"]) for x in leases] == [(MODEL, "n1:disk", "pod-a")]

    # Elsewhere: asked of n1 for n2 (the CLI finds n2), copied from the mesh, then its path on n2.
    await wait_for(lambda: n2.node.registry is not None and n2.node.registry.find(MODEL) is not None
                   and bool(n2.node.registry.find(MODEL).copies), what="n2 sees n1's copy")  # type: ignore[union-attr]
    r = await cli(n1, tmp_path, "ensure", MODEL, "--on", "n2:disk", "--wait", "--holder", "pod-b")
    assert r.returncode == 0, r.stderr.decode()
    there = n2.node.store.get(MODEL, "disk")
    assert there is not None and r.stdout.decode() == f"{there.path}\n" and tree(there.path) == tree(src)
    assert str(there.path).startswith(str(n2.node.cfg.data_dir))

    # Without --wait, a copy still to be made is one clear line and exit 1.
    r = await cli(n2, tmp_path, "ensure", MODEL, "--on", "n2:dram")
    assert r.returncode == 1 and "NOT_READY" in one_line(r) and "--wait" in one_line(r)

    # Nowhere: not registered, or registered with no copy and no source. One line, NO_SOURCE, exit 1.
    r = await cli(n2, tmp_path, "ensure", "acme/none", "--on", "n2:disk", "--wait")
    assert r.returncode == 1 and r.stdout == b""
    line = one_line(r)
    assert "NO_SOURCE" in line and "not registered" in line, line
    assert (await mesh.client.post(n1.url + "/models/acme/bare/register", json={})).status_code == 201
    await wait_for(lambda: n2.node.registry is not None and n2.node.registry.find("acme/bare") is not None,
                   what="the registration gossiped")
    r = await cli(n2, tmp_path, "ensure", "acme/bare", "--on", "n2:disk", "--wait")
    line = one_line(r)
    assert r.returncode == 1 and "NO_SOURCE" in line and "names no source" in line, line

    # A release gives the lease back; another is LEASE_NOT_FOUND.
    r = await cli(n1, tmp_path, "release", MODEL, "--on", "n1:disk", "--holder", "pod-a")
    assert r.returncode == 0 and "released" in r.stdout.decode(), r.stderr.decode()
    r = await cli(n1, tmp_path, "release", MODEL, "--on", "n1:disk", "--holder", "pod-a")
    assert r.returncode == 1 and "LEASE_NOT_FOUND" in one_line(r)


async def test_ensure_says_timeout_and_no_space(mesh: Mesh, tmp_path: Path,
                                                tmpfs: Callable[[int], Path]) -> None:
    # A source on loopback that accepts and never answers: the fetch goes on, the wait ends.
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    shm = tmpfs(4)
    n = await mesh.start("n", "--dram-dir", str(shm))
    r = await mesh.client.post(n.url + "/models/acme/slow/register",
                               json={"source_url": f"http://127.0.0.1:{port}/w.bin"})
    assert r.status_code == 201, r.text
    r = await cli(n, tmp_path, "ensure", "acme/slow", "--on", "n:disk", "--wait", "--wait-timeout", "1")
    line = one_line(r)
    assert r.returncode == 1 and "TIMEOUT" in line and "goes on" in line, line
    listener.close()

    # A copy that cannot fit the tier: the transfer fails NO_SPACE, and so does ensure.
    await ingest(mesh, n, "acme/big", make_model(tmp_path, "big", {"w.bin": 6 * MiB}))
    r = await cli(n, tmp_path, "ensure", "acme/big", "--on", "n:dram", "--wait")
    line = one_line(r)
    assert r.returncode == 1 and line.startswith("meshnode: error: NO_SPACE:"), line
    assert n.node.store.get("acme/big", "dram") is None


async def test_an_ensured_copy_survives_eviction_until_its_lease_ends(mesh: Mesh, tmp_path: Path,
                                                                      tmpfs: Callable[[int], Path]) -> None:
    shm = tmpfs(20)
    a = await mesh.start("a", "--dram-dir", str(shm), "--dram-watermarks", "60,55", "--scrub-interval", "0.2")
    for name in ("acme/m1", "acme/m2"):
        await ingest(mesh, a, name, make_model(tmp_path, name.replace("/", "-"), {"w.bin": 5 * MiB}), kind="dram")

    async def ensure(model: str, lease_s: float) -> None:
        r = await mesh.client.post(a.url + "/ensure", json={"model": model, "device": "a:dram", "holder": "pod-1",
                                                            "lease_s": lease_s})
        assert r.status_code == 200 and r.json()["lease"]["holder"] == "pod-1", r.text

    def held() -> set[str]:
        return {c.model for c in a.node.store.copies() if c.kind == "dram"}

    # m1 is ensured (and so the most recently used); m2 not. The tier fills past its watermark:
    # m2 goes, m1 stays while its lease holds, however full the tier is.
    await ensure("acme/m1", 600)
    (shm / "filler-1").write_bytes(os.urandom(3 * MiB))
    await wait_for(lambda: held() == {"acme/m1"}, what="m2 evicted")
    (shm / "filler-2").write_bytes(os.urandom(4 * MiB))  # over again: only m1 could go
    await trio.sleep(1.0)  # five sweeps
    assert held() == {"acme/m1"}
    reason = a.node.evictor.keep_reason("acme/m1", "dram")  # type: ignore[union-attr]
    assert reason is not None and "pod-1" in reason

    # Released: the next sweep evicts it.
    r = await mesh.client.delete(a.url + "/leases", params={"model": "acme/m1", "device": "a:dram"})
    assert r.status_code == 200 and r.json()["released"] == ["pod-1"], r.text
    await wait_for(lambda: held() == set(), what="m1 evicted once released")

    # A lease that is not renewed ends on its own: its copy may go then, not before.
    (shm / "filler-2").unlink()
    (shm / "filler-1").unlink()
    await ingest(mesh, a, "acme/m3", make_model(tmp_path, "m3", {"w.bin": 5 * MiB}), kind="dram")
    await ensure("acme/m3", 2)
    (shm / "filler-3").write_bytes(os.urandom(8 * MiB))
    await trio.sleep(1.0)
    assert held() == {"acme/m3"}
    await wait_for(lambda: held() == set(), timeout_s=10, what="m3 evicted once its lease ran out")
