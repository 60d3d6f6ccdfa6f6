"""Copies between nodes and tiers: verified chunks, atomic publish, faults."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .conftest import Handle, Mesh, wait_for, wait_transfer

MiB = 1024 * 1024


def make_model(root: Path, size: int = 9 * MiB + 7) -> Path:
    src = root / "src-model"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(os.urandom(size))
    (src / "sub" / "config.json").write_text('{"model_type": "llama"}')
    (src / "empty.txt").write_bytes(b"")
    return src


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def copy_dir(h: Handle, kind: str, model: str) -> Path:
    c = h.node.store.get(model, kind)
    assert c is not None, f"{h.node.cfg.node_id}:{kind} has no copy of {model}"
    return c.path


async def start(mesh: Mesh, node_id: str, *extra: str, join: list[Handle] | None = None) -> Handle:
    return await mesh.start(node_id, *extra, join=join)


async def ingest(mesh: Mesh, h: Handle, model: str, src: Path, kind: str = "disk") -> dict[str, Any]:
    r = await mesh.client.post(h.url + f"/models/{model}/download", json={"source_url": src.as_uri(), "target_device": f"{h.node.cfg.node_id}:{kind}"})
    assert r.status_code == 202, r.text
    t = await wait_transfer(mesh, h.url, r.json()["transfer_id"])
    assert t["status"] == "done", t
    return t


async def until_copies(mesh: Mesh, url: str, model: str, n: int) -> None:
    async def ok() -> bool:
        r = await mesh.client.get(url + f"/models/{model}")
        return r.status_code == 200 and len(r.json()["copies"]) == n

    await wait_for(ok, what=f"{n} copies of {model}")


async def test_ingest_copy_move_and_delete(mesh: Mesh, tmp_path: Path) -> None:
    src = make_model(tmp_path)
    a = await start(mesh, "a")
    b = await start(mesh, "b", join=[a])
    c = await start(mesh, "c", join=[a])
    t = await ingest(mesh, a, "org/model", src)
    assert t["bytes_total"] == 9 * MiB + 7 + len('{"model_type": "llama"}')
    await until_copies(mesh, c.url, "org/model", 1)
    info = (await mesh.client.get(c.url + "/models/org/model")).json()
    assert info["size"] == t["bytes_total"] and info["source_url"] == src.as_uri()
    assert tree_digest(copy_dir(a, "disk", "org/model")) == tree_digest(src)

    # Asking again for the same content is a no-op that says so.
    t2 = await ingest(mesh, a, "org/model", src)
    assert t2["manifest_hash"] == t["manifest_hash"]

    # Across nodes, requested on a third node, into RAM.
    r = await mesh.client.post(c.url + "/models/org/model/copy", json={"from_device": "a:disk", "to_device": "b:dram"})
    assert r.status_code == 202, r.text
    assert r.json()["node_id"] == "b"
    t = await wait_transfer(mesh, b.url, r.json()["transfer_id"])
    assert t["status"] == "done" and t["chunks_fetched"] == t["chunks_total"] > 1, t
    assert tree_digest(copy_dir(b, "dram", "org/model")) == tree_digest(src)
    assert copy_dir(b, "dram", "org/model").is_relative_to(mesh.root / "b-shm")

    # Between tiers of one node.
    await until_copies(mesh, a.url, "org/model", 2)
    r = await mesh.client.post(a.url + "/models/org/model/copy", json={"from_device": "b:dram", "to_device": "b:disk"})
    t = await wait_transfer(mesh, b.url, r.json()["transfer_id"])
    assert t["status"] == "done" and t["sources"] == ["b:dram"], t
    assert tree_digest(copy_dir(b, "disk", "org/model")) == tree_digest(src)

    # Move: the target gets it, the source loses it.
    await until_copies(mesh, b.url, "org/model", 3)
    r = await mesh.client.post(b.url + "/models/org/model/move", json={"from_device": "b:dram", "to_device": "c:disk"})
    t = await wait_transfer(mesh, c.url, r.json()["transfer_id"])
    assert t["status"] == "done", t
    assert tree_digest(copy_dir(c, "disk", "org/model")) == tree_digest(src)
    await wait_for(lambda: b.node.store.get("org/model", "dram") is None, what="source removed")
    assert not any((mesh.root / "b-shm").rglob("model.safetensors"))
    async def moved() -> bool:
        locs = (await mesh.client.get(a.url + "/models/org/model/locations")).json()["locations"]
        return bool(locs == ["a:disk", "b:disk", "c:disk"])

    await wait_for(moved, what="locations after the move")

    # Deleting a copy removes it from disk and catalog.
    r = await mesh.client.delete(a.url + "/models/org/model/locations/c:disk")
    assert r.status_code == 200 and r.json()["deleted_copy"] is True
    await until_copies(mesh, b.url, "org/model", 2)
    assert not (mesh.root / "c" / "copies" / "org" / "model").exists() or not any((mesh.root / "c" / "copies").rglob("*.safetensors"))
    storage = (await mesh.client.get(a.url + "/storage")).json()
    assert {"disk", "dram"} <= set(storage["devices"]) and storage["copies"][0]["model_name"] == "org/model"


async def test_copy_requests_are_validated(mesh: Mesh, tmp_path: Path) -> None:
    src = make_model(tmp_path, 1 * MiB)
    a = await start(mesh, "a")
    b = await start(mesh, "b", join=[a])
    await ingest(mesh, a, "m", src)
    await until_copies(mesh, b.url, "m", 1)
    c = mesh.client

    async def err(path: str, body: Any) -> tuple[int, str]:
        r = await c.post(b.url + path, json=body)
        return r.status_code, r.json()["error"]["code"]

    assert await err("/models/m/copy", {"from_device": "a:disk", "to_device": "b:tape"}) == (400, "INVALID_DEVICE")
    assert await err("/models/m/copy", {"from_device": "a:disk", "to_device": "b:gpu0"}) == (400, "INVALID_DEVICE")
    assert await err("/models/m/copy", {"from_device": "a:disk", "to_device": "ghost:disk"}) == (404, "NODE_NOT_FOUND")
    assert await err("/models/m/copy", {"from_device": "a:disk"}) == (400, "INVALID_REQUEST")
    assert await err("/models/m/move", {"from_device": "a:disk", "to_device": "a:disk"}) == (400, "SAME_DEVICE")
    assert await err("/models/m/copy", {"from_device": "b:dram", "to_device": "a:dram"}) == (404, "COPY_NOT_FOUND")
    assert await err("/models/nope/copy", {"from_device": "a:disk", "to_device": "b:disk"}) == (404, "MODEL_NOT_FOUND")
    assert await err("/models/m/copy", {"from_device": "a:disk", "to_device": "b:disk", "keep_source": "yes"}) == (400, "INVALID_REQUEST")
    assert await err("/models/m/download", {"source_url": f"file://{mesh.root}/no/such/dir", "target_device": "b:disk"}) == (404, "SOURCE_NOT_FOUND")
    assert await err("/models/m/download", {"source_url": "file:///no/such/dir", "target_device": "b:disk"}) == (403, "PATH_NOT_ALLOWED")
    assert await err("/models/m/download", {"source_url": "gopher://x", "target_device": "b:disk"}) == (400, "INVALID_REQUEST")
    # Peer routes need the credential (none here: loopback home setup), and check their input.
    r = await c.post(b.url + "/mesh/v1/actions", json={"op": "transfer", "model": "../x", "kind": "disk"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_MODEL_NAME"
    r = await c.post(b.url + "/mesh/v1/actions", json={"op": "rm -rf", "model": "m", "kind": "disk"})
    assert r.status_code == 400
    r = await c.post(b.url + "/mesh/v1/actions", json={"op": "transfer", "model": "m", "kind": "disk", "keep_source": "false"})
    assert r.status_code == 400 and "keep_source must be true or false" in r.json()["error"]["message"]
    assert (await c.get(b.url + "/mesh/v1/manifests/" + "0" * 32)).status_code == 404
    # A dead node as target.
    d = await start(mesh, "d", join=[a])
    await wait_for(lambda: _state(mesh, b.url, "d", "alive"), what="d alive")
    d.kill()
    await wait_for(lambda: _state(mesh, b.url, "d", "dead"), what="d dead")
    assert await err("/models/m/copy", {"from_device": "a:disk", "to_device": "d:disk"}) == (409, "NODE_UNAVAILABLE")


async def _state(mesh: Mesh, url: str, node: str, state: str) -> bool:
    nodes = (await mesh.client.get(url + "/nodes")).json()["nodes"]
    return any(n["node_id"] == node and n["state"] == state for n in nodes)


async def test_peer_serving_flipped_bits_is_caught_and_banned(mesh: Mesh, tmp_path: Path) -> None:
    src = make_model(tmp_path, 40 * MiB)  # 40 chunks: the bad peer is asked more than once
    a = await start(mesh, "a")
    bad = await start(mesh, "bad", join=[a])
    c = await start(mesh, "c", join=[a])
    await ingest(mesh, a, "m", src)
    r = await mesh.client.post(a.url + "/models/m/copy", json={"from_device": "a:disk", "to_device": "bad:disk"})
    assert (await wait_transfer(mesh, bad.url, r.json()["transfer_id"]))["status"] == "done"
    # Flip bits in every chunk of bad's copy, behind its back.
    f = copy_dir(bad, "disk", "m") / "model.safetensors"
    data = bytearray(f.read_bytes())
    chunk_bytes = bad.node.store.get("m", "disk").manifest.chunk_bytes  # type: ignore[union-attr]
    for off in range(0, len(data), chunk_bytes):
        data[off] ^= 0xFF
    f.write_bytes(bytes(data))
    await until_copies(mesh, c.url, "m", 2)
    r = await mesh.client.post(c.url + "/models/m/copy", json={"to_device": "c:disk"})
    t = await wait_transfer(mesh, c.url, r.json()["transfer_id"])
    assert t["status"] == "done", t
    assert tree_digest(copy_dir(c, "disk", "m")) == tree_digest(src)
    assert t["bad_chunks"] >= 1 and "bad" in t["banned"], t
    # Any node answers for the transfer, from the gossiped catalog.
    tid = t["transfer_id"]

    async def seen_from_a() -> bool:
        r = await mesh.client.get(a.url + f"/transfers/{tid}")
        return r.status_code == 200 and r.json()["status"] == "done" and r.json()["node_id"] == "c"

    await wait_for(seen_from_a, what="c's transfer in a's view")
    assert (await mesh.client.get(a.url + "/transfers/0123456789abcdef")).status_code == 404


async def test_only_holder_dies_fails_clearly(mesh: Mesh, tmp_path: Path) -> None:
    src = make_model(tmp_path, 16 * MiB)
    a = await start(mesh, "a", "--max-egress", "2M")
    b = await start(mesh, "b", "--source-wait", "4", join=[a])
    await ingest(mesh, a, "m", src)
    await until_copies(mesh, b.url, "m", 1)
    r = await mesh.client.post(b.url + "/models/m/copy", json={"from_device": "a:disk", "to_device": "b:disk"})
    tid = r.json()["transfer_id"]
    await wait_for(lambda: _progress(mesh, b.url, tid), what="transfer under way")
    a.kill()
    # It waits for the holder first, and says so ...
    async def waiting() -> bool:
        return "waiting for a holder" in (await mesh.client.get(b.url + f"/transfers/{tid}")).json()["note"]

    await wait_for(waiting, what="the transfer waits for its holder")
    t = await wait_transfer(mesh, b.url, tid, timeout_s=40)
    assert t["status"] == "failed" and t["error"]["code"] == "NO_SOURCE", t
    assert "a" in t["error"]["message"]
    assert b.node.store.get("m", "disk") is None
    assert not any((mesh.root / "b" / "copies").rglob("model.safetensors"))  # partial removed
    assert (await mesh.client.get(b.url + "/health")).status_code == 200


async def _progress(mesh: Mesh, url: str, tid: str) -> bool:
    t = (await mesh.client.get(url + f"/transfers/{tid}")).json()
    return bool(t.get("bytes_done", 0) > 0 and t["status"] == "running")


async def test_full_disk_fails_clearly_and_publishes_nothing(mesh: Mesh, tmp_path: Path, tmpfs: Callable[[int], Path]) -> None:
    small_tmpfs = tmpfs(4)
    src = make_model(tmp_path, 3 * MiB)  # fits the 4 MiB free check...
    a = await mesh.start("a", "--max-egress", "1M")  # slow enough to fill the disk mid-way
    b = await mesh.start("b", "--dram-dir", str(small_tmpfs), join=[a])
    await ingest(mesh, a, "m", src)
    await until_copies(mesh, b.url, "m", 1)
    r = await mesh.client.post(b.url + "/models/m/copy", json={"from_device": "a:disk", "to_device": "b:dram"})
    assert r.status_code == 202, r.text
    tid = r.json()["transfer_id"]
    await wait_for(lambda: _progress(mesh, b.url, tid), what="the first chunks")
    filler = small_tmpfs / "filler"  # ...until something else takes the space mid-way
    filler.write_bytes(b"x" * (2 * MiB))
    t = await wait_transfer(mesh, b.url, tid)
    assert t["status"] == "failed" and t["error"]["code"] == "NO_SPACE", t
    assert 0 < t["bytes_done"] < t["bytes_total"], t  # it failed writing, not up front
    assert b.node.store.get("m", "dram") is None
    assert [p.name for p in small_tmpfs.rglob("*") if p.is_file()] == ["filler"]
    filler.unlink()
    r = await mesh.client.post(b.url + "/models/m/copy", json={"from_device": "a:disk", "to_device": "b:dram"})
    t = await wait_transfer(mesh, b.url, r.json()["transfer_id"])
    assert t["status"] == "done", t
    assert tree_digest(copy_dir(b, "dram", "m")) == tree_digest(src)


async def two_holders_and_a_third(mesh: Mesh, src: Path) -> tuple[Handle, Handle, Handle]:
    """a and b hold the model ``m`` made from ``src``; c, which has none, knows both copies."""
    a = await start(mesh, "a")
    b = await start(mesh, "b", join=[a])
    c = await start(mesh, "c", join=[a])
    await ingest(mesh, a, "m", src)
    r = await mesh.client.post(a.url + "/models/m/copy", json={"from_device": "a:disk", "to_device": "b:disk"})
    assert (await wait_transfer(mesh, b.url, r.json()["transfer_id"]))["status"] == "done"
    await until_copies(mesh, c.url, "m", 2)
    return a, b, c


async def test_two_holders_share_the_work(mesh: Mesh, tmp_path: Path) -> None:
    src = make_model(tmp_path, 24 * MiB)
    a, b, c = await two_holders_and_a_third(mesh, src)
    served_before = {h.node.cfg.node_id: h.node.data_server_stats()["bytes_sent"] for h in (a, b)}
    r = await mesh.client.post(c.url + "/models/m/copy", json={"to_device": "c:disk"})
    t = await wait_transfer(mesh, c.url, r.json()["transfer_id"])
    assert t["status"] == "done" and set(t["sources"]) == {"a", "b"}, t
    served = {h.node.cfg.node_id: h.node.data_server_stats()["bytes_sent"] - served_before[h.node.cfg.node_id] for h in (a, b)}
    assert served["a"] > 0 and served["b"] > 0, served
    assert tree_digest(copy_dir(c, "disk", "m")) == tree_digest(src)


async def test_a_named_source_is_the_only_source(mesh: Mesh, tmp_path: Path) -> None:
    """A copy asked `from_device: b:disk` once reported "from a:disk": the
    named source is used, alone, even where other holders would be faster."""
    src = make_model(tmp_path, 8 * MiB)
    a, b, c = await two_holders_and_a_third(mesh, src)
    sent_by_a = a.node.data_server_stats()["bytes_sent"]
    r = await mesh.client.post(c.url + "/models/m/copy", json={"from_device": "b:disk", "to_device": "c:disk"})
    t = await wait_transfer(mesh, c.url, r.json()["transfer_id"])
    assert t["status"] == "done" and t["sources"] == ["b"], t
    assert a.node.data_server_stats()["bytes_sent"] == sent_by_a  # a was not asked for a byte
    # A named source that cannot serve says so; it does not quietly use another holder.
    b.kill()
    await wait_for(lambda: _state(mesh, c.url, "b", "dead"), what="b dead")
    r = await mesh.client.post(c.url + "/models/m/copy", json={"from_device": "b:disk", "to_device": "c:dram"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "NODE_UNAVAILABLE", r.text


async def test_a_move_that_keeps_its_source_is_a_copy_and_says_so(mesh: Mesh, tmp_path: Path) -> None:
    src = make_model(tmp_path, 3 * MiB)
    a = await start(mesh, "a")
    b = await start(mesh, "b", join=[a])
    await ingest(mesh, a, "m", src)
    await until_copies(mesh, b.url, "m", 1)
    r = await mesh.client.post(b.url + "/models/m/move", json={"from_device": "a:disk", "to_device": "b:disk",
                                                               "keep_source": True})
    assert r.status_code == 202, r.text
    assert r.json()["keep_source"] is True and "copy" in r.json()["note"]
    t = await wait_transfer(mesh, b.url, r.json()["transfer_id"])
    assert t["status"] == "done" and t["keep_source"] is True, t
    await until_copies(mesh, b.url, "m", 2)  # the source is still there
    assert tree_digest(copy_dir(a, "disk", "m")) == tree_digest(src)


async def test_download_from_a_node_device(mesh: Mesh, tmp_path: Path) -> None:
    src = make_model(tmp_path, 5 * MiB)
    a = await start(mesh, "a")
    b = await start(mesh, "b", join=[a])
    await ingest(mesh, a, "m", src)
    await until_copies(mesh, b.url, "m", 1)
    r = await mesh.client.post(b.url + "/models/m/download", json={"source": "a:disk", "target_device": "b:dram"})
    assert r.status_code == 202, r.text
    t = await wait_transfer(mesh, b.url, r.json()["transfer_id"])
    assert t["status"] == "done" and t["sources"] == ["a"], t
    assert tree_digest(copy_dir(b, "dram", "m")) == tree_digest(src)
    # Another node shows the same chunk counts (it showed "0 fetched of -").
    async def same_on_a() -> bool:
        seen = (await mesh.client.get(a.url + f"/transfers/{t['transfer_id']}")).json()
        return bool(seen.get("status") == "done" and seen["chunks_total"] == t["chunks_total"] > 0
                    and seen["chunks_fetched"] == t["chunks_fetched"])

    await wait_for(same_on_a, what="a shows b's transfer with its chunks")


async def test_a_bad_local_source_fails_a_tier_copy_and_publishes_nothing(mesh: Mesh, tmp_path: Path) -> None:
    src = make_model(tmp_path, 3 * MiB)
    a = await mesh.start("a")
    await ingest(mesh, a, "m", src)
    f = copy_dir(a, "disk", "m") / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[MiB + 7] ^= 0xFF  # chunk 1, behind the node's back
    f.write_bytes(bytes(data))
    r = await mesh.client.post(a.url + "/models/m/copy", json={"from_device": "a:disk", "to_device": "a:dram"})
    t = await wait_transfer(mesh, a.url, r.json()["transfer_id"])
    assert t["status"] == "failed" and t["error"]["code"] == "SOURCE_CORRUPT", t
    assert "chunk 1" in t["error"]["message"], t
    assert a.node.store.get("m", "dram") is None
    assert not any(p.is_file() for p in a.node.store.tier_root("dram").rglob("*"))


async def test_purge_deletes_every_copy_even_on_a_node_that_was_down(mesh: Mesh, tmp_path: Path) -> None:
    """`unregister --purge` once said it purged every copy while the files
    stayed, `/storage` listed them and registering again brought them back."""
    src = make_model(tmp_path, 2 * MiB)
    a = await start(mesh, "a")
    b = await start(mesh, "b", join=[a])
    c = await start(mesh, "c", join=[a])
    await ingest(mesh, a, "m", src)
    for to, node in (("b:disk", b), ("c:dram", c)):
        r = await mesh.client.post(a.url + "/models/m/copy", json={"from_device": "a:disk", "to_device": to})
        assert (await wait_transfer(mesh, node.url, r.json()["transfer_id"]))["status"] == "done"
    await until_copies(mesh, a.url, "m", 3)
    c.kill()
    await wait_for(lambda: _state(mesh, a.url, "c", "dead"), what="c dead")
    r = await mesh.client.delete(a.url + "/models/m", params={"purge": "true"})
    assert r.status_code == 200, r.text
    assert r.json()["deleted_copies"] == ["a:disk", "b:disk"]
    assert [p["device"] for p in r.json()["pending_copies"]] == ["c:dram"]
    assert a.node.store.get("m", "disk") is None and b.node.store.get("m", "disk") is None
    for h in (a, b):
        assert (await mesh.client.get(h.url + "/storage")).json()["copies"] == []
    # c, back, deletes its copy when the purge reaches it.
    c = await start(mesh, "c", join=[a])
    await wait_for(lambda: c.node.store.get("m", "dram") is None, what="c deletes its purged copy")
    def no_files_left() -> bool:
        try:
            return not any((mesh.root / "c-shm").rglob("model.safetensors"))
        except FileNotFoundError:  # a directory pruned while we walked it: look again
            return False

    await wait_for(no_files_left, what="c's purged files gone")
    # Registering the name again brings nothing back.
    assert (await mesh.client.post(a.url + "/models/m/register", json={})).status_code == 201
    await wait_for(lambda: c.node.registry.find("m") is not None, what="c sees the new registration")
    assert (await mesh.client.get(c.url + "/models/m")).json()["copies"] == []


async def test_delete_with_a_device_frees_one_copy_and_keeps_the_model(mesh: Mesh, tmp_path: Path) -> None:
    """gswarm's "remove from one device": `DELETE /models/{name}?device=` once
    unregistered the model everywhere, orphaning its copies."""
    src = make_model(tmp_path, 2 * MiB)
    a = await start(mesh, "a")
    b = await start(mesh, "b", join=[a])
    await ingest(mesh, a, "m", src)
    r = await mesh.client.post(a.url + "/models/m/copy", json={"from_device": "a:disk", "to_device": "b:disk"})
    assert (await wait_transfer(mesh, b.url, r.json()["transfer_id"]))["status"] == "done"
    await until_copies(mesh, a.url, "m", 2)
    r = await mesh.client.delete(a.url + "/models/m", params={"device": "b:disk"})
    assert r.status_code == 200 and r.json()["deleted_copy"] is True, r.text
    assert b.node.store.get("m", "disk") is None
    await until_copies(mesh, a.url, "m", 1)
    info = (await mesh.client.get(a.url + "/models/m")).json()
    assert info["model_name"] == "m" and [c["device"] for c in info["copies"]] == ["a:disk"]


async def test_one_model_has_one_content(mesh: Mesh, tmp_path: Path) -> None:
    """An ingest into a node that held a different copy of the model once
    replaced it silently, leaving the model with two manifests."""
    first = make_model(tmp_path / "first", 2 * MiB)
    second = make_model(tmp_path / "second", 3 * MiB)
    a = await start(mesh, "a")
    b = await start(mesh, "b", join=[a])
    t = await ingest(mesh, a, "m", first)
    await until_copies(mesh, b.url, "m", 1)
    for h, kind in ((a, "disk"), (b, "disk"), (a, "dram")):  # the same node's copy, or another node's
        r = await mesh.client.post(h.url + "/models/m/download",
                                   json={"source_url": second.as_uri(), "target_device": f"{h.node.cfg.node_id}:{kind}"})
        failed = await wait_transfer(mesh, h.url, r.json()["transfer_id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "CONTENT_CONFLICT", failed
        assert "a:disk" in failed["error"]["message"]
    info = (await mesh.client.get(b.url + "/models/m")).json()
    assert {c["manifest_hash"] for c in info["copies"]} == {t["manifest_hash"]}
    assert tree_digest(copy_dir(a, "disk", "m")) == tree_digest(first)
    # The same bytes again are welcome anywhere.
    r = await mesh.client.post(b.url + "/models/m/download", json={"source_url": first.as_uri(), "target_device": "b:disk"})
    assert (await wait_transfer(mesh, b.url, r.json()["transfer_id"]))["status"] == "done"
