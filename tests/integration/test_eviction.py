"""Eviction and hygiene on a real node: a RAM tier of 20 MiB (a tmpfs) with
watermarks of 60% and 55% fills up, evicts its least recently used copy,
never a pinned one, fails NO_SPACE saying why, evicts in the background when
something else fills the tier; a copy removed by hand leaves the catalog;
files of transfers that no longer exist go."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from meshnode.copies.catalog import CopyCatalog
from meshnode.copies.evictor import Evictor
from meshnode.copies.store import Store, StoreError
from protocol.eviction import Watermarks

from .conftest import Handle, Mesh, wait_for, wait_transfer

MiB = 1024 * 1024


def _model(root: Path, name: str, size: int) -> Path:
    d = root / f"src-{name}"
    d.mkdir()
    (d / "w.bin").write_bytes(os.urandom(size))
    return d


async def _ingest(mesh: Mesh, h: Handle, name: str, src: Path, kind: str = "dram") -> dict[str, Any]:
    r = await mesh.client.post(h.url + f"/models/{name}/download",
                               json={"source_url": src.as_uri(), "target_device": f"a:{kind}"})
    assert r.status_code == 202, r.text
    return await wait_transfer(mesh, h.url, r.json()["transfer_id"])


def _held(h: Handle, kind: str = "dram") -> set[str]:
    return {c.model for c in h.node.store.copies() if c.kind == kind}


async def test_a_full_tier_evicts_least_recently_used_never_pinned_and_says_why(
        mesh: Mesh, tmp_path: Path, tmpfs: Callable[[int], Path]) -> None:
    shm = tmpfs(20)
    a = await mesh.start("a", "--dram-dir", str(shm), "--dram-watermarks", "60,55", "--scrub-interval", "0.2")
    for name in ("m1", "m2"):
        assert (await _ingest(mesh, a, name, _model(tmp_path, name, 5 * MiB)))["status"] == "done"
    # m1 is read (copied to disk): m2 is now the least recently used.
    r = await mesh.client.post(a.url + "/models/m1/copy", json={"from_device": "a:dram", "to_device": "a:disk"})
    assert (await wait_transfer(mesh, a.url, r.json()["transfer_id"]))["status"] == "done"

    # 10 MiB held, 5 more would be 75% > 60%: m2 goes (down to 55%), m3 comes in.
    assert (await _ingest(mesh, a, "m3", _model(tmp_path, "m3", 5 * MiB)))["status"] == "done"
    assert _held(a) == {"m1", "m3"}
    info = (await mesh.client.get(a.url + "/models/m2")).json()
    assert "a:dram" not in info["locations"], info

    # Pinned copies stay: the next one cannot fit, and the error says which and why.
    for name in ("m1", "m3"):
        r = await mesh.client.post(a.url + f"/models/{name}/pin", json={"min": 1, "tier": "dram"})
        assert r.status_code == 200, r.text
    t = await _ingest(mesh, a, "m4", _model(tmp_path, "m4", 5 * MiB))
    assert t["status"] == "failed" and t["error"]["code"] == "NO_SPACE", t
    msg = t["error"]["message"]
    assert "high watermark of 60%" in msg and "m1: pinned" in msg and "m3: pinned" in msg, msg
    assert _held(a) == {"m1", "m3"} and not any((shm / ".partial").iterdir())

    # Something else fills the tier: while every copy is pinned nothing goes; unpinned, the
    # least recently used goes in the background, down to the low watermark.
    (shm / "not-a-copy.bin").write_bytes(os.urandom(3 * MiB))
    await trio.sleep(1.0)  # five sweeps
    assert _held(a) == {"m1", "m3"}
    r = await mesh.client.delete(a.url + "/models/m3/pin")
    assert r.status_code == 200
    await wait_for(lambda: _held(a) == {"m1"}, what="m3 evicted by the sweep")
    metrics = (await mesh.client.get(a.url + "/metrics")).text
    assert "meshnode_evicted_copies_total 2.0" in metrics, metrics  # m2, then m3


async def test_a_copy_removed_by_hand_leaves_the_catalog_and_stale_partials_go(
        mesh: Mesh, tmp_path: Path) -> None:
    a = await mesh.start("a", "--scrub-interval", "0.2", "--partial-keep", "1")
    assert (await _ingest(mesh, a, "m", _model(tmp_path, "m", MiB), kind="disk"))["status"] == "done"
    c = a.node.store.get("m", "disk")
    assert c is not None
    (c.path / "w.bin").unlink()  # an operator's rm

    async def withdrawn() -> bool:
        info = (await mesh.client.get(a.url + "/models/m")).json()
        return "a:disk" not in info["locations"] and info["copies"] == []

    await wait_for(withdrawn, timeout_s=5, what="the broken copy withdrawn")
    assert not c.path.exists()
    assert "meshnode_scrubbed_copies_total 1.0" in (await mesh.client.get(a.url + "/metrics")).text

    stale = a.node.store.staging_dir("disk", "ab" * 16)
    stale.mkdir(parents=True)
    (stale / "half.bin").write_bytes(b"x" * 100)
    os.utime(stale / "half.bin", (1e9, 1e9))
    os.utime(stale, (1e9, 1e9))
    await wait_for(lambda: not stale.exists(), timeout_s=5, what="a stale partial removed")


async def test_transfers_side_by_side_reserve_their_bytes_until_they_end(
        tmp_path: Path, tmpfs: Callable[[int], Path]) -> None:
    """Two transfers that each fit alone cannot together pass the high
    watermark: what make_room let in stays promised while its transfer runs;
    what a transfer has on the tier is measured (the blocks under its partial
    entries), so nothing counts twice, a resume asks only for what is missing,
    and a later transfer of the same model does not inherit the promise."""
    shm = tmpfs(20)
    store = Store("a", tmp_path / "data", shm)
    running: dict[str, str] = {}  # model -> the id of the transfer writing it
    ev = Evictor(store, cast(CopyCatalog, None), {"dram": Watermarks(0.60, 0.55)},
                 keep_reason=lambda m, k: None, active_partials=set,
                 written=lambda m, k: (running[m], [store.staging_dir(k, f"ingest-{running[m]}")])
                 if m in running else None,
                 interval_s=1.0, partial_keep_s=60.0)

    def write(model: str, mib: int) -> None:
        d = store.staging_dir("dram", f"ingest-{running[model]}")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{len(list(d.iterdir()))}.bin").write_bytes(os.urandom(mib * MiB))

    running["x"] = "t1"
    await ev.make_room("dram", "x", 8 * MiB)  # 8 of the 12 MiB under 60%
    running["y"] = "t2"
    with pytest.raises(StoreError) as err:
        await ev.make_room("dram", "y", 8 * MiB)  # alone it fits; beside x it would not
    assert err.value.code == "NO_SPACE"
    assert f"{8 * MiB} more promised to transfers in flight" in err.value.message, err.value.message

    # x has written 5 MiB: they are in the tier's used bytes, and only its 3 left are promised.
    write("x", 5)
    running["z"] = "t3"
    await ev.make_room("dram", "z", 3 * MiB)  # 5 + 3 + 3 fit under 12 (counted twice: 5 + 8 + 3 would not)
    assert await ev.reserved("dram") == 3 * MiB + 3 * MiB
    with pytest.raises(StoreError):
        await ev.make_room("dram", "y", 8 * MiB)

    # x stops and a new transfer of x starts: the old promise is not the new one's.
    running["x"] = "t4"
    assert await ev.reserved("dram") == 3 * MiB  # z's alone; x's 5 MiB on disk are just used bytes
    # z resumes (a restart): it asks only for what it does not have yet.
    write("z", 2)
    await ev.make_room("dram", "z", 3 * MiB)
    assert await ev.reserved("dram") == 1 * MiB

    # Everything ends and its files go: nothing is promised, y fits.
    running.clear()
    shutil.rmtree(shm / ".partial")
    running["y"] = "t5"
    await ev.make_room("dram", "y", 8 * MiB)
    assert await ev.reserved("dram") == 8 * MiB and await ev.reserved("dram", but="y") == 0
    running.clear()
    assert await ev.reserved("dram") == 0


async def test_a_url_fetch_makes_room_before_it_writes(
        mesh: Mesh, tmp_path: Path, tmpfs: Callable[[int], Path]) -> None:
    """A download from a URL learns its length from the response and makes room
    then, as a mesh copy does: the least recently used copy goes first (no
    sweep runs here to tidy up after), and a file that cannot fit beside the
    pinned copies fails NO_SPACE with nothing kept."""
    from tests.integration.fakehub import run_fakehub

    shm = tmpfs(20)
    a = await mesh.start("a", "--dram-dir", str(shm), "--dram-watermarks", "60,55", "--scrub-interval", "3600")
    for name in ("m1", "m2"):
        assert (await _ingest(mesh, a, name, _model(tmp_path, name, 5 * MiB)))["status"] == "done"
    async with run_fakehub() as hub:
        hub.plain["w3.bin"] = os.urandom(5 * MiB)
        hub.plain["w4.bin"] = os.urandom(8 * MiB)
        r = await mesh.client.post(a.url + "/models/m3/download",
                                   json={"source_url": hub.url("files/w3.bin"), "target_device": "a:dram"})
        assert (await wait_transfer(mesh, a.url, r.json()["transfer_id"]))["status"] == "done"
        assert _held(a) == {"m2", "m3"}  # 15 MiB would pass 60%: m1, the least recently used, went first
        for name in ("m2", "m3"):
            r = await mesh.client.post(a.url + f"/models/{name}/pin", json={"min": 1, "tier": "dram"})
            assert r.status_code == 200, r.text
        r = await mesh.client.post(a.url + "/models/m4/download",
                                   json={"source_url": hub.url("files/w4.bin"), "target_device": "a:dram"})
        t = await wait_transfer(mesh, a.url, r.json()["transfer_id"])
        assert t["status"] == "failed" and t["error"]["code"] == "NO_SPACE", t
        assert "m2: pinned" in t["error"]["message"], t
    assert _held(a) == {"m2", "m3"} and not any(p.is_file() for p in (shm / ".partial").rglob("*"))
