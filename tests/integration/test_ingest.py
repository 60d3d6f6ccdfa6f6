"""Ingest from the (fake, local) Hugging Face hub through the mesh: once per mesh."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.integration.fakehub import FakeHub, FakeRepo, model_files, run_fakehub
from tests.integration.test_sources import hf_env as hf_env  # autouse: a clean HF environment

from .conftest import Handle, Mesh, all_alive, wait_for, wait_transfer
from .test_metrics import scrape

REPO = "acme/tiny"
MARGIN = 256 * 1024


@pytest.fixture
async def hub(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeHub]:
    async with run_fakehub() as h:
        repo = FakeRepo(REPO)
        repo.add_commit(model_files(seed=1), "main")
        h.add_repo(repo)
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


def hub_files(hub: FakeHub) -> dict[str, bytes]:
    repo = hub.repos[REPO]
    return {k: v.data for k, v in repo.commits[repo.refs["main"]].items()}


def copy_files(h: Handle, model: str) -> dict[str, bytes]:
    c = h.node.store.get(model, "disk")
    assert c is not None
    return {p.relative_to(c.path).as_posix(): p.read_bytes() for p in sorted(c.path.rglob("*")) if p.is_file()}


async def download(mesh: Mesh, h: Handle, model: str, body: dict[str, Any]) -> str:
    r = await mesh.client.post(h.url + f"/models/{model}/download", json={"target_device": f"{h.node.cfg.node_id}:disk", **body})
    assert r.status_code == 202, r.text
    return str(r.json()["transfer_id"])


async def finished(mesh: Mesh, h: Handle, tid: str, timeout_s: float = 40) -> dict[str, Any]:
    return await wait_transfer(mesh, h.url, tid, timeout_s)


async def test_download_from_the_hub_registers_and_publishes(mesh: Mesh, hub: FakeHub) -> None:
    a = await mesh.start("a")
    # No URL: an owner/name model is a Hugging Face repo id.
    t = await finished(mesh, a, await download(mesh, a, REPO, {}))
    assert t["status"] == "done", t
    assert copy_files(a, REPO) == hub_files(hub)
    info = (await mesh.client.get(a.url + f"/models/{REPO}")).json()
    assert info["model_type"] == "llama" and info["source_url"] == f"hf://{REPO}"
    assert info["metadata"]["revision"] == hub.repos[REPO].refs["main"]  # the resolved commit
    assert sorted(info["metadata"]["files"]) == sorted(hub_files(hub)) and info["metadata"]["file_count"] == 6
    assert t["files_total"] == t["files_done"] == 6 and t["bytes_done"] == t["bytes_total"] == info["size"]
    samples, _ = await scrape(mesh, a.url)  # the hub's bytes, in the metrics
    assert samples[("meshnode_source_fetched_bytes_total", (("source", "hf"),))] == info["size"]
    assert samples[("meshnode_source_fetched_bytes_total", (("source", "http"),))] == 0
    # Asking again is a no-op that says so: nothing more from the hub.
    served = sum(hub.served.values())
    t = await finished(mesh, a, await download(mesh, a, REPO, {}))
    assert t["status"] == "done" and t["note"] == "already present", t
    assert sum(hub.served.values()) == served
    # Another node asked later copies from the mesh, not from the hub.
    b = await mesh.start("b", join=[a])
    t = await finished(mesh, b, await download(mesh, b, REPO, {}))
    assert t["status"] == "done" and t["sources"] == ["a"], t
    assert copy_files(b, REPO) == hub_files(hub)
    assert sum(hub.served.values()) == served
    # A new commit on main is a new source, and new content: one model has one
    # content, so it is refused while the old copies exist ...
    repo = hub.repos[REPO]
    older = hub_files(hub)
    newer = model_files(seed=3)
    repo.add_commit(newer, "main")
    t = await finished(mesh, b, await download(mesh, b, REPO, {}))
    assert t["status"] == "failed" and t["error"]["code"] == "CONTENT_CONFLICT", t
    assert copy_files(b, REPO) == older  # nothing replaced
    assert sum(hub.served.values()) == served  # refused before a byte was fetched
    # ... and fetched, not taken from the mesh, once they are purged (by a, once it knows of b's copy).
    async def a_knows_both() -> bool:
        return len((await mesh.client.get(a.url + f"/models/{REPO}")).json()["copies"]) == 2

    await wait_for(a_knows_both, what="a sees both copies")
    r = await mesh.client.delete(a.url + f"/models/{REPO}", params={"purge": "true"})
    assert r.json()["deleted_copies"] == ["a:disk", "b:disk"], r.text
    # Through b at once, after the purge (read your writes): the purged copies
    # are going, so the new commit is fetched.
    r = await mesh.client.post(b.url + f"/models/{REPO}/download", json={"target_device": "b:disk"},
                               headers={"X-Mesh-After": r.headers["X-Mesh-Token"]})
    assert r.status_code == 202, r.text
    t = await finished(mesh, b, r.json()["transfer_id"])
    assert t["status"] == "done" and t["note"].startswith("fetched "), t
    assert copy_files(b, REPO) == {k: v.data for k, v in newer.items()}


async def test_three_nodes_asked_at_once_fetch_from_the_hub_once(mesh: Mesh, hub: FakeHub) -> None:
    a = await mesh.start("a")
    b = await mesh.start("b", join=[a])
    c = await mesh.start("c", join=[a])
    await all_alive(mesh, [a, b, c])
    url = f"{hub.endpoint}/{REPO}"
    tids: dict[str, str] = {}

    async def ask(h: Handle) -> None:
        tids[h.node.cfg.node_id] = await download(mesh, h, "tiny", {"source_url": url})

    async with trio.open_nursery() as n:
        for h in (a, b, c):
            n.start_soon(ask, h)
    results = {}
    for h in (a, b, c):
        results[h.node.cfg.node_id] = await finished(mesh, h, tids[h.node.cfg.node_id])
    assert all(t["status"] == "done" for t in results.values()), results
    want = hub_files(hub)
    for h in (a, b, c):
        assert copy_files(h, "tiny") == want
    # The hub saw each file's bytes once (plus a small margin), not three times.
    for name, data in want.items():
        assert hub.served[name] <= len(data) + MARGIN, (name, hub.served[name], len(data))
    notes = sorted(t["note"] for t in results.values())
    assert sum(n.startswith("fetched ") and "files" in n for n in notes) == 1, notes
    assert sum(n.startswith("fetched by another node") for n in notes) == 2, notes


async def test_hub_errors_fail_the_transfer_clearly(mesh: Mesh, hub: FakeHub, tmp_path: Path) -> None:
    a = await mesh.start("a")
    t = await finished(mesh, a, await download(mesh, a, "x", {"source_url": "hf://acme/missing"}))
    assert t["status"] == "failed" and t["error"]["code"] == "NOT_FOUND", t
    hub.token = "the-right-token"
    (tmp_path / "token").write_text("not-the-token")
    import os

    os.environ["HF_TOKEN_PATH"] = str(tmp_path / "token")
    try:
        t = await finished(mesh, a, await download(mesh, a, "y", {"source_url": f"hf://{REPO}"}))
    finally:
        del os.environ["HF_TOKEN_PATH"]
    assert t["status"] == "failed" and t["error"]["code"] in ("UNAUTHORIZED", "NOT_FOUND"), t
    assert "not-the-token" not in str(t)
    assert a.node.store.get("y", "disk") is None
    assert not any((mesh.root / "a" / "copies" / ".partial").glob("ingest-*"))


async def test_web_ingest_needs_room_for_one_copy_not_two(mesh: Mesh, hub: FakeHub, tmpfs: Callable[[int], Path]) -> None:
    tmpfs_6m = tmpfs(6)
    # About 4.1 MiB of model on a 6 MiB tier: the files fetched into the staging
    # directory are renamed into the copy, not copied beside themselves.
    size = sum(len(v) for v in hub_files(hub).values())
    assert 3 * 2**20 < size < 6 * 2**20 < 2 * size
    a = await mesh.start("a", "--dram-dir", str(tmpfs_6m))
    r = await mesh.client.post(a.url + f"/models/{REPO}/download", json={"target_device": "a:dram"})
    assert r.status_code == 202, r.text
    t = await finished(mesh, a, str(r.json()["transfer_id"]))
    assert t["status"] == "done", t
    c = a.node.store.get(REPO, "dram")
    assert c is not None
    assert {p.relative_to(c.path).as_posix(): p.read_bytes() for p in c.path.rglob("*") if p.is_file()} == hub_files(hub)
    left = [p for p in (tmpfs_6m / ".partial").rglob("*") if p.is_file()]
    assert left == [], left  # the staging directory is gone


async def test_a_web_ingest_is_owner_only(mesh: Mesh, hub: FakeHub) -> None:
    """Files fetched into staging are renamed into the copy: they too end 0640
    or tighter, in 0750 directories, whatever the umask."""
    import os

    from .test_host_access import _loose

    old = os.umask(0o000)
    try:
        a = await mesh.start("a")
        t = await finished(mesh, a, await download(mesh, a, REPO, {}))
        assert t["status"] == "done", t
        assert _loose(mesh.root / "a") == []
    finally:
        os.umask(old)
