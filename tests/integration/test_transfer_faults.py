"""Transfers against real processes: kill -9 of the receiver, SIGSTOP of a holder."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from .test_process import Proc, wait
from .test_process import procs as procs  # the fixture, re-exported for these tests

MiB = 1024 * 1024


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def transfer(url: str, tid: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/transfers/{tid}", timeout=5).json())


def ingest(p: Proc, model: str, src: Path) -> None:
    r = httpx.post(f"{p.url}/models/{model}/download", json={"source_url": src.as_uri(), "target_device": f"{p.node_id}:disk"}, timeout=10)
    assert r.status_code == 202, r.text
    tid = r.json()["transfer_id"]
    wait(lambda: transfer(p.url, tid)["status"] == "done", what="ingest")


def copies(url: str, model: str) -> int:
    r = httpx.get(f"{url}/models/{model}", timeout=5)
    return len(r.json()["copies"]) if r.status_code == 200 else 0


def published(root: Path, node: str, name: str) -> Path:
    found = [p for p in (root / node / "copies").rglob(name) if ".partial" not in p.parts]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["kill -9", "SIGTERM"])
def test_kill_9_receiver_half_way_resumes_without_refetching(procs, tmp_path: Path, stop: str) -> None:  # type: ignore[no-untyped-def]
    # A crash and a clean stop alike: the intent stays and the restart resumes.
    src = tmp_path / "model"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(40 * MiB))  # 40 chunks of 1 MiB
    a = procs("a", None, "--max-egress", "8M").start()
    b = procs("b", a.address).start()
    ingest(a, "m", src)
    wait(lambda: copies(b.url, "m") == 1, what="b sees a's copy")
    r = httpx.post(f"{b.url}/models/m/copy", json={"from_device": "a:disk", "to_device": "b:disk"}, timeout=10)
    tid = r.json()["transfer_id"]
    seen: dict[str, Any] = {}

    def half() -> bool:
        seen.update(transfer(b.url, tid))
        return int(seen["chunks_total"]) > 0 and int(seen["chunks_fetched"]) >= int(seen["chunks_total"]) // 2

    wait(half, timeout_s=30, what="half the chunks")
    done_before = int(seen["chunks_fetched"])
    total = int(seen["chunks_total"])
    assert total == 40, seen
    if stop == "SIGTERM":
        assert b.term() == 0
    else:
        b.kill()
    assert any((tmp_path / "b" / "copies" / ".partial").iterdir())
    b.start()  # same data dir: the intent is found and the transfer resumes
    final: dict[str, Any] = {}

    def finished() -> bool:
        final.update(transfer(b.url, tid))
        return final["status"] in ("done", "failed")

    wait(finished, timeout_s=40, what="resumed transfer")
    assert final["status"] == "done", final
    assert final["chunks_resumed"] >= done_before, final
    # Only what was missing (at most the chunks in flight at the kill, plus the rest) was fetched again.
    assert final["chunks_resumed"] + final["chunks_fetched"] == total, final
    assert sha(published(tmp_path, "b", "weights.bin")) == sha(src / "weights.bin")
    assert not any((tmp_path / "b" / "copies" / ".partial").iterdir())


@pytest.mark.slow
def test_holder_that_stops_answering_loses_its_chunks_to_others(procs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "model"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(40 * MiB))
    a = procs("a", None, "--max-egress", "10M").start()
    c = procs("c", a.address, "--max-egress", "10M").start()
    b = procs("b", a.address, "--chunk-stall", "2").start()
    ingest(a, "m", src)
    wait(lambda: copies(c.url, "m") == 1, what="c sees a's copy")
    r = httpx.post(f"{c.url}/models/m/copy", json={"from_device": "a:disk", "to_device": "c:disk"}, timeout=10)
    wait(lambda: transfer(c.url, r.json()["transfer_id"])["status"] == "done", timeout_s=30, what="c's copy")
    wait(lambda: copies(b.url, "m") == 2, what="b sees both copies")
    r = httpx.post(f"{b.url}/models/m/copy", json={"to_device": "b:disk"}, timeout=10)
    tid = r.json()["transfer_id"]
    wait(lambda: transfer(b.url, tid)["chunks_fetched"] >= 1, timeout_s=20, what="progress")
    assert a.p is not None
    os.kill(a.p.pid, signal.SIGSTOP)
    try:
        final: dict[str, Any] = {}

        def finished() -> bool:
            final.update(transfer(b.url, tid))
            return final["status"] in ("done", "failed")

        wait(finished, timeout_s=40, what="transfer to finish without a")
        assert a.p.poll() is None  # it finished while a was still stopped
    finally:
        os.kill(a.p.pid, signal.SIGCONT)
    assert final["status"] == "done", final
    assert sha(published(tmp_path, "b", "weights.bin")) == sha(src / "weights.bin")
    assert "c" in final["sources"], final  # the chunks a held were taken from c
