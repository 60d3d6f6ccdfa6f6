"""The local store on its own: a source that changes while it is added."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshnode.copies import store as store_mod
from meshnode.copies.store import Store, StoreError

from .conftest import Mesh, wait_transfer


@pytest.mark.parametrize(("listed", "what"), [(500, "grew"), (3000, "shrank")])
def test_a_file_that_changes_size_while_it_is_hashed_is_source_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listed: int, what: str
) -> None:
    """It used to end as ``INTERNAL: ExceptionGroup`` (the manifest builder
    refused a digest count that did not fit the size)."""
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(2000))
    real_walk = store_mod._walk

    def walk(path: Path) -> Iterator[tuple[str, Path, int]]:
        for rel, p, _size in real_walk(path):
            yield rel, p, listed  # the size it had when it was listed

    monkeypatch.setattr(store_mod, "_walk", walk)
    s = Store("n", tmp_path / "data", tmp_path / "shm")
    s.scan()
    with pytest.raises(StoreError) as e:
        s.ingest_path("disk", "m", src, chunk_bytes=1024 * 1024)
    assert e.value.code == "SOURCE_CHANGED" and what in e.value.message
    assert s.copies() == [] and not list((tmp_path / "data" / "copies").rglob("*.bin"))


async def test_a_growing_file_fails_the_transfer_as_source_changed(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    src = mesh.root / "grow.bin"
    src.write_bytes(os.urandom(4000))
    real_walk = store_mod._walk
    monkeypatch.setattr(store_mod, "_walk", lambda p: ((r, q, size - 1000) for r, q, size in real_walk(p)))
    a = await mesh.start("a")
    r = await mesh.client.post(a.url + "/models/g/download", json={"source_url": f"file://{src}", "target_device": "a:disk"})
    t = await wait_transfer(mesh, a.url, r.json()["transfer_id"])
    assert t["status"] == "failed" and t["error"]["code"] == "SOURCE_CHANGED", t


def test_deleting_a_copy_leaves_no_empty_model_directories(tmp_path: Path) -> None:
    """`copies/org/model/` stayed behind, empty, after a move or a delete."""
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(3000))
    s = Store("n", tmp_path / "data", tmp_path / "shm")
    s.scan()
    s.ingest_path("disk", "org/model", src, chunk_bytes=1024 * 1024)
    s.ingest_path("disk", "org/other", src, chunk_bytes=1024 * 1024)
    root = s.tier_root("disk")
    assert (root / "org" / "model").is_dir()
    s.delete("org/model", "disk")
    assert not (root / "org" / "model").exists() and (root / "org" / "other").is_dir()  # the owner still has one
    s.delete("org/other", "disk")
    assert not (root / "org").exists() and root.is_dir()


def _source_and_store(tmp_path: Path, name: str, size: int) -> tuple[Path, Store]:
    """A source directory of one random file, and a scanned store."""
    src = tmp_path / "src"
    src.mkdir()
    (src / name).write_bytes(os.urandom(size))
    s = Store("n", tmp_path / "data", tmp_path / "shm")
    s.scan()
    return src, s


def test_deletes_never_follow_a_symlink_out_of_the_store(tmp_path: Path) -> None:
    """A copy whose files (or whose directory) were swapped for symlinks out
    of the store: deleting it, scrubbing it and sweeping partials remove the
    links, never what they point to."""
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "weights.bin").write_bytes(b"keep me")
    src, s = _source_and_store(tmp_path, "weights.bin", 3000)

    c = s.ingest_path("disk", "m", src)
    (c.path / "weights.bin").unlink()
    (c.path / "weights.bin").symlink_to(outside / "weights.bin")
    assert s.scrub() == [c]  # not a regular file of the right size: no longer whole
    assert s.get("m", "disk") is None and not c.path.exists()
    assert (outside / "weights.bin").read_bytes() == b"keep me"

    c = s.ingest_path("disk", "m2", src)
    target = c.path.with_name("moved-away")
    c.path.rename(target)
    c.path.symlink_to(outside, target_is_directory=True)  # the copy's directory itself
    assert s.delete("m2", "disk") is c
    assert not c.path.exists() and not c.path.is_symlink()
    assert (outside / "weights.bin").read_bytes() == b"keep me"
    assert s.scan() == []  # and a symlinked copy directory is never taken for a copy

    stale = s.staging_dir("disk", "0" * 32)
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.symlink_to(outside, target_is_directory=True)
    kept = s.staging_dir("disk", "1" * 32)
    kept.mkdir()
    old = 1_000_000.0
    os.utime(stale, (old, old), follow_symlinks=False)
    assert s.sweep_partials(active={kept.name}, older_than_s=60) == [stale]
    assert not stale.is_symlink() and kept.is_dir()
    assert (outside / "weights.bin").read_bytes() == b"keep me"


def test_last_use_survives_a_restart(tmp_path: Path) -> None:
    src, s = _source_and_store(tmp_path, "w.bin", 100)
    c = s.ingest_path("disk", "m", src)
    s.touch("m", "disk")
    used = s.last_used("m", "disk")
    assert used > 0
    assert s.locate(c.manifest_hash, 0) is not None  # a peer reading a chunk is a use too
    again = Store("n", tmp_path / "data", tmp_path / "shm")
    again.scan()
    assert abs(again.last_used("m", "disk") - used) < 2  # from the manifest's mtime


def test_a_new_copy_is_not_the_least_recently_used_and_leftovers_never_lead_out(tmp_path: Path) -> None:
    """A copy just written (or just replaced) once had no last use at all, so it
    was the first to be evicted; the sweep of interrupted deletes looked
    through a symlinked model directory."""
    src, s = _source_and_store(tmp_path, "w.bin", 100)
    s.ingest_path("disk", "m", src)
    assert s.last_used("m", "disk") > 0
    (src / "w.bin").write_bytes(os.urandom(100))
    s.ingest_path("disk", "m", src)  # another content replaces it
    assert s.last_used("m", "disk") > 0

    outside = tmp_path / "elsewhere"
    (outside / ".deleting-@abc").mkdir(parents=True)
    (outside / ".deleting-@abc" / "keep.bin").write_bytes(b"keep me")
    (s.tier_root("disk") / "org").symlink_to(outside, target_is_directory=True)
    (s.tier_root("disk") / "m" / ".deleting-@def").mkdir()  # a real leftover, inside the store
    removed = s.sweep_partials(active=(), older_than_s=60)
    assert [p.name for p in removed] == [".deleting-@def"]
    assert (outside / ".deleting-@abc" / "keep.bin").read_bytes() == b"keep me"
