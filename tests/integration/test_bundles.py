"""Bundles on real daemons on loopback (issue 29): a model exported from a
node that holds no copy (read through the mesh) and imported into a second
mesh, byte-identical, registered, spread; a damaged bundle refused with
nothing kept; an import cut short, then resumed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path
from typing import Any

import trio

from protocol.bundle import HEADER_NAME, BundleParser, Chunk

from .conftest import Handle, Mesh, all_alive, wait_for, wait_transfer

MiB = 1024 * 1024
MODEL = "acme/tiny"
REGISTRATION = {"model_type": "llm", "metadata": {"description": "a tiny test model", "tags": ["test"]}}


def make_model(root: Path, name: str = "src", sizes: dict[str, int] | None = None) -> Path:
    d = root / name
    for rel, size in (sizes or {"config.json": 300, "model.safetensors": 3 * MiB + 12345,
                                "tok/tokenizer.json": 70_000, "empty.txt": 0}).items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(size))
    return d


def tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


async def ingest(mesh: Mesh, h: Handle, name: str, src: Path, kind: str = "disk",
                 registration: dict[str, Any] | None = None) -> dict[str, Any]:
    if registration is not None:
        r = await mesh.client.post(h.url + f"/models/{name}/register", json=registration)
        assert r.status_code == 201, r.text
    r = await mesh.client.post(h.url + f"/models/{name}/download",
                               json={"source_url": src.as_uri(), "target_device": f"{h.node.cfg.node_id}:{kind}"})
    assert r.status_code == 202, r.text
    t = await wait_transfer(mesh, h.url, r.json()["transfer_id"])
    assert t["status"] == "done", t
    return t


async def export(mesh: Mesh, h: Handle, *names: str) -> bytes:
    async with mesh.client.stream("GET", h.url + "/bundles", params=[("model", n) for n in names]) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"] == "application/x-tar"
        data = await r.aread()
        assert len(data) == int(r.headers["content-length"])
        return data


async def import_(mesh: Mesh, h: Handle, body: bytes, to: str) -> Any:
    return await mesh.client.post(h.url + "/bundles", params={"to": to}, content=body,
                                  headers={"content-type": "application/x-tar"})


def partials(h: Handle, kind: str = "disk") -> list[Path]:
    root = h.node.store.tier_root(kind) / ".partial"
    return sorted(root.iterdir()) if root.exists() else []


async def test_export_from_a_node_without_a_copy_then_import_into_a_second_mesh(mesh: Mesh, tmp_path: Path) -> None:
    src = make_model(tmp_path)
    a1 = await mesh.start("a1")
    a2 = await mesh.start("a2", join=[a1])
    await all_alive(mesh, [a1, a2])
    await ingest(mesh, a1, MODEL, src, registration=REGISTRATION)
    await wait_for(lambda: a2.node.registry is not None and a2.node.registry.find(MODEL) is not None
                   and bool(a2.node.registry.find(MODEL).copies), what="a2 sees the copy")  # type: ignore[union-attr]

    bundle = await export(mesh, a2, MODEL)
    assert a2.node.store.copies() == []  # read through the mesh: nothing kept on the way
    # A tar that tar reads: the header first, every file, then the sums (sha256sum's form).
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tf:
        names = tf.getnames()
        header = json.loads(tf.extractfile(HEADER_NAME).read())  # type: ignore[union-attr]
        sums = tf.extractfile(names[-1]).read().decode()  # type: ignore[union-attr]
    mhash = header["models"][0]["manifest_hash"]
    assert names[0] == HEADER_NAME and names[-1] == f"models/{MODEL}/@{mhash}.sha256"
    assert sorted(names[1:-1]) == sorted(f"models/{MODEL}/@{mhash}/{p}" for p in tree(src))
    assert header["models"][0]["registration"]["metadata"]["description"] == "a tiny test model"
    for rel, data in tree(src).items():
        assert f"{hashlib.sha256(data).hexdigest()}  {rel}\n" in sums

    b1 = await mesh.start("b1")  # a second mesh, which never hears of the first
    b2 = await mesh.start("b2", join=[b1])
    await all_alive(mesh, [b1, b2])
    r = await import_(mesh, b2, bundle, "b1:disk")
    assert r.status_code == 421 and r.json()["error"]["code"] == "WRONG_NODE"  # b2 sends the asker to b1
    assert f"--peer {b1.address}" in r.json()["error"]["message"]
    r = await import_(mesh, b1, bundle, "b1:disk")
    assert r.status_code == 201, r.text
    (m,) = r.json()["models"]
    assert (m["model_name"], m["status"], m["manifest_hash"], m["chunks_resumed"]) == (MODEL, "imported", mhash, 0)
    c = b1.node.store.get(MODEL, "disk")
    assert c is not None and tree(c.path) == tree(src)  # byte-identical
    assert partials(b1) == []

    # Registered, as it was in the first mesh, and gossiped: b2 sees it and copies it from b1.
    async def seen_on_b2() -> bool:
        info = (await mesh.client.get(b2.url + f"/models/{MODEL}")).json()
        return info.get("locations") == ["b1:disk"]

    await wait_for(seen_on_b2, what="the imported copy gossiped to b2")
    info = (await mesh.client.get(b2.url + f"/models/{MODEL}")).json()
    assert info["model_type"] == "llm" and info["metadata"]["description"] == "a tiny test model", info
    r = await mesh.client.post(b2.url + f"/models/{MODEL}/copy", json={"to_device": "b2:disk"})
    t = await wait_transfer(mesh, b2.url, r.json()["transfer_id"])
    assert t["status"] == "done" and t["sources"] == ["b1"], t
    c2 = b2.node.store.get(MODEL, "disk")
    assert c2 is not None and tree(c2.path) == tree(src)

    # The same bundle again: nothing to write; other bytes under the same name: CONTENT_CONFLICT.
    r = await import_(mesh, b1, bundle, "b1:disk")
    assert r.status_code == 200 and r.json()["models"][0]["status"] == "already present", r.text
    other = make_model(tmp_path, "other")
    a3 = await mesh.start("a3")
    await ingest(mesh, a3, MODEL, other)
    r = await import_(mesh, b2, await export(mesh, a3, MODEL), "b2:dram")
    assert r.status_code == 409 and r.json()["error"]["code"] == "CONTENT_CONFLICT", r.text
    assert b2.node.store.get(MODEL, "dram") is None and partials(b2, "dram") == []


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def other_hex(data: bytes, at: int) -> bytes:
    """Another hex digit at ``at`` (a sha256 that is still one, but not the file's)."""
    return data[:at] + (b"0" if data[at:at + 1] != b"0" else b"1") + data[at + 1:]


async def test_a_damaged_bundle_is_refused_and_nothing_is_kept(mesh: Mesh, tmp_path: Path) -> None:
    src = make_model(tmp_path)
    a = await mesh.start("a")
    await ingest(mesh, a, MODEL, src, registration=REGISTRATION)
    bundle = await export(mesh, a, MODEL)
    weights = (src / "model.safetensors").read_bytes()
    b = await mesh.start("b")

    body_at = bundle.index(weights[:4096])
    sums_at = bundle.index(hashlib.sha256(weights).hexdigest().encode())
    for damaged, says in ((flip(bundle, body_at + 2 * MiB + 7), "does not match its manifest"),  # a chunk
                          (other_hex(bundle, sums_at + 3), "does not match the sha256"),  # a file's sha256
                          (flip(bundle, 100), "checksum"),  # a tar header
                          (b"not a bundle at all" * 100, "not a bundle")):
        r = await import_(mesh, b, damaged, "b:disk")
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "BAD_CONTENT" and says in err["message"] and "nothing was kept" in err["message"], err
        assert b.node.store.copies() == [] and partials(b) == []
        assert (await mesh.client.get(b.url + f"/models/{MODEL}")).status_code == 404  # not registered either
    r = await import_(mesh, b, bundle, "b:disk")  # the good one goes in
    assert r.status_code == 201, r.text


async def test_bad_requests_get_a_clear_4xx_and_the_node_goes_on(mesh: Mesh, tmp_path: Path) -> None:
    a = await mesh.start("a")
    c = mesh.client
    for method, path, params, body, status, code in (
        ("GET", "/bundles", {}, None, 400, "INVALID_REQUEST"),
        ("GET", "/bundles", {"model": "../x"}, None, 400, "INVALID_MODEL_NAME"),
        ("GET", "/bundles", {"model": "acme/none"}, None, 404, "MODEL_NOT_FOUND"),
        ("POST", "/bundles", {}, b"x", 400, "INVALID_REQUEST"),
        ("POST", "/bundles", {"to": "web"}, b"x", 400, "INVALID_DEVICE"),
        ("POST", "/bundles", {"to": "a:gpu0"}, b"x", 400, "INVALID_DEVICE"),
        ("POST", "/bundles", {"to": "zz:disk"}, b"x", 404, "NODE_NOT_FOUND"),
        ("POST", "/bundles", {"to": "a:disk"}, b"", 422, "BAD_CONTENT"),
        ("POST", "/bundles", {"to": "a:disk", "check": "true"}, b"\0" * 512, 422, "BAD_CONTENT"),
        ("POST", "/ensure", {}, b"[]", 400, "INVALID_REQUEST"),
        ("POST", "/ensure", {}, b'{"model": "m", "device": "a:disk", "lease_s": 0}', 400, "INVALID_REQUEST"),
        ("POST", "/ensure", {}, b'{"model": "m", "device": "a:disk", "holder": "a b"}', 400, "INVALID_REQUEST"),
        ("DELETE", "/leases", {}, None, 400, "INVALID_REQUEST"),
        ("DELETE", "/leases", {"model": "m", "device": "a:disk"}, None, 404, "LEASE_NOT_FOUND"),
    ):
        ctype = "application/json" if path == "/ensure" else "application/x-tar"
        r = await c.request(method, a.url + path, params=params, content=body,
                            headers={"content-type": ctype} if body is not None else {})
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (method, path, params, r.text)
    r = await c.post(a.url + "/bundles", params={"to": "a:disk"}, content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415  # a form cannot post a bundle
    assert (await c.get(a.url + "/health")).status_code == 200 and partials(a) == []


async def test_an_import_cut_short_is_resumed_skipping_what_it_verified(mesh: Mesh, tmp_path: Path) -> None:
    src = make_model(tmp_path, sizes={"model.safetensors": 6 * MiB, "config.json": 100})
    a = await mesh.start("a")
    await ingest(mesh, a, MODEL, src)
    bundle = await export(mesh, a, MODEL)
    b = await mesh.start("b")

    cut = len(bundle) * 2 // 3
    r = await import_(mesh, b, bundle[:cut], "b:disk")
    assert r.status_code == 422 and r.json()["error"]["code"] == "INCOMPLETE", r.text
    assert b.node.store.copies() == [] and len(partials(b)) == 1  # its verified chunks are kept
    whole = sum(isinstance(e, Chunk) for e in BundleParser().feed(bundle[:cut]))
    assert whole >= 3

    r = await import_(mesh, b, bundle, "b:disk")
    assert r.status_code == 201, r.text
    (m,) = r.json()["models"]
    assert m["chunks_resumed"] == whole and m["chunks_written"] == m["chunks"] - whole, m
    c = b.node.store.get(MODEL, "disk")
    assert c is not None and tree(c.path) == tree(src) and partials(b) == []


async def test_the_cli_hears_a_refusal_that_comes_before_the_upload_ends(mesh: Mesh, tmp_path: Path) -> None:
    """A bundle damaged near its start is refused as soon as the node reads the
    bad chunk; the CLI, still sending the rest, must stop and say why, not block
    in a send that nobody reads (stop 31 saw it hang there)."""
    src = make_model(tmp_path, "big", {"model.safetensors": 48 * MiB, "config.json": 50})
    a = await mesh.start("a")
    await ingest(mesh, a, MODEL, src, registration=REGISTRATION)
    bundle = await export(mesh, a, MODEL)
    weights = (src / "model.safetensors").read_bytes()
    damaged = tmp_path / "damaged.bundle"
    damaged.write_bytes(flip(bundle, bundle.index(weights[:4096]) + MiB + 7))
    b = await mesh.start("b")
    exe = str(Path(sys.executable).parent / "meshnode")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    t0 = trio.current_time()
    with trio.fail_after(60):
        r = await trio.run_process([exe, "import", str(damaged), "--to", "b:disk", "--peer", b.url], env=env,
                                   capture_stdout=True, capture_stderr=True, check=False)
    took = trio.current_time() - t0
    err = r.stderr.decode()
    assert r.returncode != 0 and "BAD_CONTENT" in err, (r.returncode, err[-2000:])
    assert took < 30, took
    assert b.node.store.copies() == [] and partials(b) == []
