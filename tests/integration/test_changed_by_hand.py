"""A copy changed by hand, or rotten where it lies (issue 24, point 2).

The scrub compares each file's stat (size, mtime, inode, ctime) with the one
recorded at publish: a file overwritten in place with its size and mtime put
back is caught by its ctime, hashed again and its copy withdrawn; a file only
touched is hashed again and kept.  The periodic re-verify reads every chunk;
a peer that bans a holder for a bad chunk makes it read its copy again at
once.  On the store alone, then on real daemons."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest

from meshnode.config import ConfigError, add_start_arguments, config_from_args
from meshnode.copies import store as store_mod
from meshnode.copies import verifier as verifier_mod
from meshnode.copies.store import Copy, Store
from meshnode.errors import MeshError

from .conftest import Handle, Mesh, wait_for, wait_transfer

MiB = 1024 * 1024
CB = 64 * 1024


def _source(root: Path, files: dict[str, int]) -> Path:
    d = root / "src"
    d.mkdir()
    for name, size in files.items():
        (d / name).write_bytes(os.urandom(size))
    return d


def _overwrite_sneakily(path: Path, at: int = 0, length: int | None = None) -> None:
    """Other bytes in place, the same size, the mtime put back: only the ctime tells."""
    before = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(os.urandom(length if length is not None else before.st_size - at))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)


def _recorded(c: Copy) -> dict[str, list[int]]:
    sidecar = c.path.with_name(c.path.name + ".stat")
    if not sidecar.exists():
        return {}
    files: dict[str, list[int]] = json.loads(sidecar.read_bytes())["files"]
    return files


# -- the store alone ----------------------------------------------------------------------------


def test_an_overwrite_in_place_with_its_mtime_put_back_is_withdrawn_by_the_next_scrub(tmp_path: Path) -> None:
    s = Store("n", tmp_path / "data", tmp_path / "shm")
    s.scan()
    c = s.ingest_path("disk", "m", _source(tmp_path, {"a.bin": 3 * CB, "b.bin": 100}), chunk_bytes=CB)
    assert set(_recorded(c)) == {"a.bin", "b.bin"}  # recorded at publish
    assert s.scrub() == []
    _overwrite_sneakily(c.path / "a.bin", at=2 * CB, length=10)
    assert s.scrub() == [c]
    assert s.get("m", "disk") is None and not c.path.exists()
    assert not c.path.with_name(c.path.name + ".stat").exists()


def test_a_touched_file_is_hashed_again_and_kept_with_its_new_stat(tmp_path: Path) -> None:
    s = Store("n", tmp_path / "data", tmp_path / "shm")
    s.scan()
    c = s.ingest_path("disk", "m", _source(tmp_path, {"a.bin": 3 * CB}), chunk_bytes=CB)
    os.utime(c.path / "a.bin", (1e9, 1e9))  # touch: the same bytes, another mtime and ctime
    st = os.stat(c.path / "a.bin")
    assert s.scrub() == []
    assert s.get("m", "disk") is c and s.suspect("m", "disk") == []
    assert _recorded(c)["a.bin"] == [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    # ... and after a restart it is still known good: nothing to hash again.
    s2 = Store("n", tmp_path / "data", tmp_path / "shm")
    assert len(s2.scan()) == 1
    assert s2.scrub() == [] and s2.suspect("m", "disk") == []


def test_a_change_made_while_the_node_was_down_is_found_after_the_restart(tmp_path: Path) -> None:
    s = Store("n", tmp_path / "data", tmp_path / "shm")
    s.scan()
    c = s.ingest_path("disk", "m", _source(tmp_path, {"a.bin": 2 * CB}), chunk_bytes=CB)
    _overwrite_sneakily(c.path / "a.bin", length=1)
    s2 = Store("n", tmp_path / "data", tmp_path / "shm")
    [c2] = s2.scan()
    assert s2.scrub() == [c2] and s2.get("m", "disk") is None


@pytest.mark.parametrize("sidecar", [
    b"\xff\x00 not json", b"[]", b'{"v": 1, "manifest": "x", "files": {}}',
    b'{"v": 1, "manifest": "%(h)s", "files": {"a.bin": ["1", 2, 3, 4], "../x": [1, 2, 3, 4]}}',
    b'{"v": 1, "manifest": "%(h)s", "files": {"a.bin": [1, 2, 3, 4]}}',  # the wrong size
    b'{"v": 1, "manifest": "%(h)s", "files": {"a.bin": [131072, -1, true, 1e400]}}',
    b"x" * 100, b"[" * 100_000,
], ids=["binary", "list", "other-manifest", "bad-entries", "wrong-size", "bad-numbers", "junk", "deep"])
def test_an_unreadable_stat_record_is_taken_as_found(tmp_path: Path, sidecar: bytes) -> None:
    """A ``.stat`` that is not ours (cut, hand-edited, hostile) never stops the
    node or withdraws a good copy: the files' stat is recorded as found."""
    s = Store("n", tmp_path / "data", tmp_path / "shm")
    s.scan()
    c = s.ingest_path("disk", "m", _source(tmp_path, {"a.bin": 2 * CB}), chunk_bytes=CB)
    c.path.with_name(c.path.name + ".stat").write_bytes(sidecar.replace(b"%(h)s", c.manifest_hash.encode()))
    s2 = Store("n", tmp_path / "data", tmp_path / "shm")
    [c2] = s2.scan()
    assert s2.scrub() == [] and s2.get("m", "disk") is c2
    st = os.stat(c.path / "a.bin")
    assert _recorded(c2) == {"a.bin": [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]}


def test_a_changed_file_is_not_served_while_it_is_hashed_again_a_slice_a_scrub(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "SCRUB_REHASH_BYTES_MAX", 1)  # one chunk a scrub
    s = Store("n", tmp_path / "data", tmp_path / "shm")
    s.scan()
    c = s.ingest_path("disk", "m", _source(tmp_path, {"a.bin": 3 * CB, "b.bin": CB}), chunk_bytes=CB)
    a_chunks, b_chunks = c.manifest.file_chunks("a.bin"), c.manifest.file_chunks("b.bin")
    _overwrite_sneakily(c.path / "a.bin", at=2 * CB + 5, length=1)  # its last chunk
    assert s.scrub() == []  # chunk 0 of a.bin hashed: good so far
    assert s.suspect("m", "disk") == ["a.bin"]
    assert s.locate(c.manifest_hash, a_chunks[0]) is None  # not served meanwhile
    assert s.locate(c.manifest_hash, b_chunks[0]) is not None  # the other file is
    assert s.scrub() == []
    assert s.scrub() == [c]  # its last chunk does not match
    assert s.locate(c.manifest_hash, b_chunks[0]) is None


def test_verify_chunks_names_the_chunks_that_do_not_match(tmp_path: Path) -> None:
    s = Store("n", tmp_path / "data", tmp_path / "shm")
    s.scan()
    c = s.ingest_path("disk", "m", _source(tmp_path, {"a.bin": 3 * CB, "b.bin": 2 * CB}), chunk_bytes=CB)
    assert s.verify_chunks(c, 0, c.manifest.n_chunks) == []
    _overwrite_sneakily(c.path / "b.bin", at=CB, length=3)
    assert s.verify_chunks(c, 0, c.manifest.n_chunks) == [c.manifest.file_chunks("b.bin")[1]]
    assert s.withdraw(c) and not s.withdraw(c) and s.get("m", "disk") is None
    assert s.verify_chunks(c, 0, c.manifest.n_chunks) == []  # no longer the store's: nothing read


# -- real daemons --------------------------------------------------------------------------------


async def _ingest(mesh: Mesh, h: Handle, src: Path, model: str = "m") -> None:
    r = await mesh.client.post(h.url + f"/models/{model}/download",
                               json={"source_url": src.as_uri(), "target_device": f"{h.node.cfg.node_id}:disk"})
    assert r.status_code == 202, r.text
    assert (await wait_transfer(mesh, h.url, r.json()["transfer_id"]))["status"] == "done"


async def _copy(mesh: Mesh, via: Handle, to: Handle, **body: Any) -> dict[str, Any]:
    """Asked of ``via`` (which knows the model), run and followed on ``to``."""
    r = await mesh.client.post(via.url + "/models/m/copy", json={"to_device": f"{to.node.cfg.node_id}:disk", **body})
    assert r.status_code == 202, r.text
    return await wait_transfer(mesh, to.url, r.json()["transfer_id"])


async def _locations(mesh: Mesh, h: Handle) -> list[str]:
    r = await mesh.client.get(h.url + "/models/m")
    return list(r.json().get("locations") or []) if r.status_code == 200 else []


async def test_a_sneaky_overwrite_withdraws_the_copy_before_any_peer_pulls_bad_bytes(
        mesh: Mesh, tmp_path: Path) -> None:
    a = await mesh.start("a", "--scrub-interval", "0.2")
    b = await mesh.start("b", "--scrub-interval", "0.2", join=[a])
    src = _source(tmp_path, {"w.bin": 3 * MiB, "x.bin": MiB})
    await _ingest(mesh, a, src)
    assert (await _copy(mesh, a, b, from_device="a:disk"))["status"] == "done"
    c = a.node.store.get("m", "disk")
    assert c is not None
    _overwrite_sneakily(c.path / "w.bin", at=MiB + 17, length=64)

    async def withdrawn() -> bool:
        return "a:disk" not in await _locations(mesh, b) and "b:disk" in await _locations(mesh, b)

    await wait_for(withdrawn, timeout_s=10, what="the changed copy withdrawn from the catalog")
    assert a.node.store.get("m", "disk") is None and not c.path.exists()
    # A new node pulls the model from the mesh: only b's good bytes, nobody banned.
    n3 = await mesh.start("c", join=[a, b])
    t = await _copy(mesh, b, n3)
    assert t["status"] == "done" and t["bad_chunks"] == 0 and t["banned"] == [], t
    got = n3.node.store.get("m", "disk")
    assert got is not None and (got.path / "w.bin").read_bytes() == (src / "w.bin").read_bytes()


async def test_a_touched_file_is_kept_and_a_peer_s_request_reads_a_good_copy_without_withdrawing_it(
        mesh: Mesh, tmp_path: Path) -> None:
    a = await mesh.start("a", "--scrub-interval", "0.2")
    await _ingest(mesh, a, _source(tmp_path, {"w.bin": 2 * MiB}))
    c = a.node.store.get("m", "disk")
    assert c is not None
    os.utime(c.path / "w.bin", (1e9, 1e9))  # touch -d 2001-09-09: same bytes
    st = os.stat(c.path / "w.bin")

    await wait_for(lambda: _recorded(c).get("w.bin") == [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns],
                   timeout_s=10, what="the touched file hashed again and its new stat recorded")
    assert a.node.store.get("m", "disk") is c and "a:disk" in await _locations(mesh, a)

    # A peer's report of a bad chunk: read again at once, once in a while, and a good copy stays.
    v = a.node.verifier
    assert v is not None
    before = v.counts["verified_chunks"]
    assert v.request("m", c.manifest_hash, 1)["verifying"] == ["a:disk"]
    assert v.request("m", c.manifest_hash, 0)["verifying"] == []  # not again so soon
    with pytest.raises(MeshError) as e:
        v.request("m", "0" * 32, 0)
    assert e.value.code == "COPY_NOT_FOUND"
    await wait_for(lambda: v.counts["verified_chunks"] >= before + c.manifest.n_chunks, timeout_s=10,
                   what="the copy read again")
    assert a.node.store.get("m", "disk") is c and v.counts["bad_copies"] == 0


async def test_a_peer_that_bans_a_holder_makes_it_re_verify_and_withdraw_its_copy(
        mesh: Mesh, tmp_path: Path) -> None:
    """No scrub and no periodic re-verify on ``a`` after its start: only b's
    report can tell it that its copy went bad."""
    a = await mesh.start("a", "--scrub-interval", "3600", "--verify-period", "0")
    b = await mesh.start("b", join=[a])
    await _ingest(mesh, a, _source(tmp_path, {"w.bin": 4 * MiB}))
    c = a.node.store.get("m", "disk")
    assert c is not None
    _overwrite_sneakily(c.path / "w.bin")  # every chunk bad
    r = await mesh.client.post(a.url + "/models/m/copy", json={"from_device": "a:disk", "to_device": "b:disk"})
    assert r.status_code == 202, r.text

    async def withdrawn() -> bool:
        return a.node.store.get("m", "disk") is None and "a:disk" not in await _locations(mesh, b)

    await wait_for(withdrawn, timeout_s=15, what="a told by b, its copy read again and withdrawn")
    assert b.node.puller is not None and b.node.puller.totals["peer_bans"] >= 1
    assert a.node.verifier is not None and a.node.verifier.counts["bad_copies"] == 1
    assert b.node.store.get("m", "disk") is None  # b never published the bad bytes


async def test_the_periodic_re_verify_finds_what_no_stat_shows(
        mesh: Mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the scrub asleep (it ran once, at start), only reading every chunk
    again (here once a second) finds the change.  Its place is saved."""
    monkeypatch.setattr(verifier_mod, "CURSOR_SAVE_S", 0.0)
    a = await mesh.start("a", "--scrub-interval", "3600", "--verify-period", "1", "--verify-rate", "100M")
    await _ingest(mesh, a, _source(tmp_path, {"w.bin": 3 * MiB}))
    c = a.node.store.get("m", "disk")
    assert c is not None
    _overwrite_sneakily(c.path / "w.bin", at=2 * MiB, length=8)
    async def withdrawn() -> bool:
        return a.node.store.get("m", "disk") is None and "a:disk" not in await _locations(mesh, a)

    await wait_for(withdrawn, timeout_s=15, what="the copy read again and withdrawn")
    saved = mesh.root / "a" / "verify.json"
    await wait_for(saved.exists, timeout_s=5, what="the re-verify's place saved")
    assert json.loads(saved.read_bytes())["key"] == f"{c.manifest_hash}@disk"


@pytest.mark.parametrize("saved", [b'{"key": "k@disk", "chunk": 3}', b"\x00garbage", b'{"key": 5, "chunk": "x"}',
                                   b'{"key": "k", "chunk": -1}', b"[1, 2]", b" " * 10_000, b"[" * 4000],
                         ids=["good", "binary", "types", "negative", "list", "large", "deep"])
async def test_the_re_verify_takes_up_its_saved_place_and_shrugs_off_a_bad_one(
        mesh: Mesh, tmp_path: Path, saved: bytes) -> None:
    data = tmp_path / "a"
    data.mkdir(mode=0o700)
    (data / "verify.json").write_bytes(saved)
    a = await mesh.start("a", data_dir=data)
    assert a.node.verifier is not None
    assert a.node.verifier.schedule.cursor == (("k@disk", 3) if saved.startswith(b'{"key": "k@disk"') else None)
    assert (await mesh.client.get(a.url + "/health")).status_code == 200


@pytest.mark.parametrize(("flags", "needle"), [
    (["--verify-period", "-1"], "--verify-period"), (["--verify-period", "nan"], "--verify-period"),
    (["--verify-rate", "0"], "--verify-rate"), (["--verify-rate", "fast"], "--verify-rate"),
    (["--verify-rate", "inf"], "--verify-rate"),
])
def test_bad_verify_flags_are_refused_saying_which(tmp_path: Path, flags: list[str], needle: str) -> None:
    p = argparse.ArgumentParser()
    add_start_arguments(p)
    with pytest.raises(ConfigError, match=needle):
        config_from_args(p.parse_args(["--node-id", "a", "--data-dir", str(tmp_path), *flags]), env={})
    cfg = config_from_args(p.parse_args(["--node-id", "a", "--data-dir", str(tmp_path)]), env={})
    assert (cfg.verify_period_s, cfg.verify_rate_bps) == (7 * 86_400, 50e6)
