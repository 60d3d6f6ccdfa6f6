"""A transfer whose only holder is banned ends (issue 24), and a transfer
can be cancelled through the API and the CLI: real daemons on loopback."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import trio

from .conftest import Handle, Mesh, wait_for, wait_transfer
from .test_transfer import copy_dir, ingest, make_model, until_copies

MiB = 1024 * 1024


def leftovers(h: Handle) -> list[Path]:
    """The partial copies and transfer intents ``h`` has on disk."""
    partial = h.node.store.tier_root("disk") / ".partial"
    found = list(partial.iterdir()) if partial.exists() else []
    intents = h.node.cfg.data_dir / "transfers"
    return found + (list(intents.glob("*.json")) if intents.exists() else [])


async def get(mesh: Mesh, h: Handle, tid: str) -> dict[str, Any]:
    return dict((await mesh.client.get(h.url + f"/transfers/{tid}")).json())


async def test_a_transfer_whose_only_holder_is_banned_fails_naming_the_ban_even_after_a_restart(
        mesh: Mesh, tmp_path: Path) -> None:
    src = make_model(tmp_path, 6 * MiB)  # 1 MiB chunks
    # a's own checks have not caught the corruption yet (bit rot between two scrubs): it serves it.
    a = await mesh.start("a", "--scrub-interval", "3600", "--verify-period", "0")
    b = await mesh.start("b", "--source-wait", "60", join=[a])
    await ingest(mesh, a, "m", src)
    assert a.node.router is not None
    a.node.router.executors.verifier = None  # a holder that does not re-verify when told of a ban (an older one)
    # 4 KiB zeroed in place in the only holder's copy, same size: its chunk 2 fails its hash.
    with open(copy_dir(a, "disk", "m") / "model.safetensors", "r+b") as f:
        f.seek(2 * MiB + 100)
        f.write(bytes(4096))
    await until_copies(mesh, b.url, "m", 1)
    r = await mesh.client.post(b.url + "/models/m/copy", json={"to_device": "b:disk"})
    assert r.status_code == 202, r.text
    tid = r.json()["transfer_id"]
    seen: dict[str, Any] = {}

    async def says_why() -> bool:
        seen.update(await get(mesh, b, tid))
        return "node a's copy is banned" in seen["note"]

    # It waits for a holder that may serve, and says which holder is banned and why.
    await wait_for(says_why, what="the transfer's note naming the ban")
    assert seen["status"] == "running" and seen["banned"] == ["a"], seen
    assert "waiting for a holder" in seen["note"] and "failed its hash" in seen["note"], seen
    # The node stops while the transfer waits: the intent and the verified chunks stay ...
    await b.stop()
    assert leftovers(b)
    # ... and after the restart it resumes, bans again and fails within --source-wait.
    b = await mesh.start("b", "--source-wait", "3", join=[a], data_dir=mesh.root / "b")
    began = trio.current_time()
    t = await wait_transfer(mesh, b.url, tid, timeout_s=30)
    took = trio.current_time() - began
    assert t["status"] == "failed" and t["error"]["code"] == "NO_SOURCE", t
    assert "node a's copy is banned (chunk 2 failed its hash)" in t["error"]["message"], t
    assert took < 3 + 12, took  # --source-wait, plus the manifest, the re-check and the two strikes
    assert b.node.store.get("m", "disk") is None
    assert leftovers(b) == []  # no partial files, no intent

    async def ended_for_a() -> bool:  # what a pinned model's rule reads: only active records are copies under way
        return bool((await get(mesh, a, tid)).get("status") == "failed")

    await wait_for(ended_for_a, what="a sees the transfer failed")
    # Another restart: nothing resumes, nothing hangs.
    await b.stop()
    b = await mesh.start("b", "--source-wait", "3", join=[a], data_dir=mesh.root / "b")
    assert not any(x.status.active for x in b.node.transfers.by_id.values())
    assert (await get(mesh, b, tid))["status"] == "failed"
    assert leftovers(b) == []
    assert (await mesh.client.get(b.url + "/health")).status_code == 200


async def test_a_transfer_is_cancelled_by_the_api_and_the_cli_and_its_partial_files_go(
        mesh: Mesh, tmp_path: Path) -> None:
    src = make_model(tmp_path, 12 * MiB)
    a = await mesh.start("a")
    b = await mesh.start("b", "--max-ingress", "1M", join=[a])  # a slow copy
    await ingest(mesh, a, "m", src)
    await until_copies(mesh, b.url, "m", 1)

    async def slow_copy() -> str:
        r = await mesh.client.post(b.url + "/models/m/copy", json={"to_device": "b:disk"})
        assert r.status_code == 202, r.text
        tid = str(r.json()["transfer_id"])

        async def under_way() -> bool:
            t = await get(mesh, b, tid)
            return bool(t["status"] == "running" and t["bytes_done"] > 0)

        await wait_for(under_way, what="the copy under way")
        assert leftovers(b)
        return tid

    tid = await slow_copy()
    # Any node answers: asked of a, which knows of it by gossip, the node that runs it (b)
    # cancels it, and the answer comes once the partial files are gone.
    await wait_for(lambda: _known(mesh, a, tid), what="a hears of b's transfer")
    r = await mesh.client.delete(a.url + f"/transfers/{tid}")
    assert r.status_code == 200, r.text
    t = r.json()
    assert t["cancelled"] is True and t["status"] == "failed" and t["error"]["code"] == "CANCELLED", t
    assert leftovers(b) == [] and b.node.store.get("m", "disk") is None
    assert (await get(mesh, b, tid))["error"]["code"] == "CANCELLED"
    r = await mesh.client.delete(b.url + f"/transfers/{tid}")  # again: the same answer
    assert r.status_code == 200 and r.json()["error"]["code"] == "CANCELLED", r.text
    r = await mesh.client.delete(b.url + "/transfers/0123456789abcdef")
    assert r.status_code == 404 and r.json()["error"]["code"] == "TRANSFER_NOT_FOUND", r.text
    r = await mesh.client.delete(a.url + f"/transfers/{(await ingest(mesh, a, 'm2', src))['transfer_id']}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "TRANSFER_FINISHED", r.text
    # The CLI: meshnode transfer ID --cancel, through another node.
    tid = await slow_copy()
    await wait_for(lambda: _known(mesh, a, tid), what="a hears of b's transfer")
    exe = str(Path(sys.executable).parent / "meshnode")
    p = await trio.run_process([exe, "--peer", a.url, "transfer", tid, "--cancel"], capture_stdout=True,
                               capture_stderr=True, check=False,
                               env={**os.environ, "COLUMNS": "200", "XDG_STATE_HOME": str(tmp_path / "state")})
    assert p.returncode == 0, p.stderr.decode()
    assert "CANCELLED" in p.stdout.decode(), p.stdout.decode()
    assert leftovers(b) == [] and b.node.store.get("m", "disk") is None
    assert (await mesh.client.get(b.url + "/health")).status_code == 200


async def _known(mesh: Mesh, h: Handle, tid: str) -> bool:
    return (await mesh.client.get(h.url + f"/transfers/{tid}")).status_code == 200
