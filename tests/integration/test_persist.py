"""State on disk: restart at a higher generation, corrupt files, unusable data dirs."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest

from meshnode.config import add_start_arguments
from meshnode.daemon import main_start
from meshnode.persist import STATE_NAME

from .conftest import Mesh, wait_for, wait_transfer


async def test_restart_keeps_registrations_and_bumps_generation(mesh: Mesh) -> None:
    a = await mesh.start("a")
    r = await mesh.client.post(a.url + "/models/org/kept/register", json={"model_type": "llm"})
    assert r.status_code == 201
    gen1 = a.node.generation
    a.kill()  # no clean shutdown: the acknowledged write must already be on disk
    await a.done.wait()
    a2 = await mesh.start("a", data_dir=mesh.root / "a")
    assert a2.node.generation > gen1
    info = (await mesh.client.get(a2.url + "/models/org/kept")).json()
    assert info["model_type"] == "llm"


async def test_corrupt_state_file_is_kept_aside(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    a = await mesh.start("a")
    b = await mesh.start("b", join=[a])
    await mesh.client.post(b.url + "/models/from-b/register", json={})
    a.kill()
    await a.done.wait()
    state = mesh.root / "a" / STATE_NAME
    state.write_bytes(b"\x93garbage that is not msgpack state")
    a2 = await mesh.start("a", join=[b], data_dir=mesh.root / "a")
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    aside = list((mesh.root / "a").glob(STATE_NAME + ".corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"\x93garbage")
    # Starts from its peers.
    await wait_for(lambda: _has(mesh, a2.url, "from-b"), what="catalog from peers")


async def _has(mesh: Mesh, url: str, name: str) -> bool:
    return (await mesh.client.get(url + f"/models/{name}")).status_code == 200


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_start_arguments(p)
    return p.parse_args(list(argv))


def test_unusable_data_dir_exits_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main_start(_args("--node-id", "a", "--port", "0", "--data-dir", str(blocker / "sub")))
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("meshnode: error: data dir") and "not usable" in err
    assert err.count("\n") == 1


def test_data_dir_of_another_node_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import msgpack

    (tmp_path / STATE_NAME).write_bytes(msgpack.packb({"format": 1, "node_id": "other", "generation": 5}))
    rc = main_start(_args("--node-id", "a", "--port", "0", "--data-dir", str(tmp_path)))
    assert rc == 2
    assert "belongs to node 'other'" in capsys.readouterr().err


async def test_a_node_cleans_what_interrupted_writes_left(mesh: Mesh, tmp_path: Path) -> None:
    """kill -9 during a save left ``.state.msgpack.tmp-<pid>`` files (13 after
    40 kills) and ENOSPC left ``.write-test-<pid>``: a node removes its own
    leftovers at start (it holds the data dir's lock, so nothing else writes
    there), and only those."""
    a = await mesh.start("a")
    src = tmp_path / "m"
    src.mkdir()
    (src / ".weights.tmp-1").write_bytes(b"a model file that only looks like a leftover")
    r = await mesh.client.post(a.url + "/models/m/download", json={"source_url": f"file://{src}", "target_device": "a:disk"})
    assert (await wait_transfer(mesh, a.url, r.json()["transfer_id"]))["status"] == "done"
    a.kill()
    await a.done.wait()
    data = mesh.root / "a"
    copy_dir = next((data / "copies" / "m").glob("@*[!t]"))
    leftovers = [
        data / ".state.msgpack.tmp-4242",
        data / ".write-test-77",
        data / "transfers" / ".0123abcd.json.tmp-99",
        copy_dir.parent / f".{copy_dir.name}.manifest.tmp-5",
    ]
    for p in leftovers:
        p.write_bytes(b"half")
    await mesh.start("a", data_dir=data)
    assert [p for p in leftovers if p.exists()] == []
    assert (copy_dir / ".weights.tmp-1").read_bytes().startswith(b"a model file")


def test_one_process_per_data_dir(tmp_path: Path) -> None:
    """A second node on a data dir in use exits 2 with one line naming the first."""
    import subprocess
    import sys

    from .test_process import Proc

    first = Proc("a", tmp_path).start()
    assert first.p is not None
    r = subprocess.run(
        [sys.executable, "-m", "meshnode", "start", "--node-id", "a", "--port", "0", "--data-dir", str(tmp_path / "a")],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 2, r.stderr
    assert f"in use by another meshnode process (pid {first.p.pid})" in r.stderr and r.stderr.count("\n") == 1
    first.kill()
    assert first.start().p is not None  # kill -9 released it
    first.kill()


async def test_a_full_data_dir_refuses_writes_with_507_and_shows_nothing(mesh: Mesh, tmpfs: Callable[[int], Path]) -> None:
    """Registrations on a full data dir were 500 INTERNAL after the write had
    already gone out by gossip.  Now a write is on disk before anyone hears of
    it: a full disk is 507 NO_SPACE and no node sees the model."""
    data = tmpfs(4)
    a = await mesh.start("a", data_dir=data)
    b = await mesh.start("b", join=[a])
    await wait_for(lambda: _has_node(mesh, b.url, "a"), what="b knows a")
    filler = data / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    for attempt in range(3):
        r = await mesh.client.post(a.url + f"/models/lost-{attempt}/register", json={"model_type": "llm"})
        assert r.status_code == 507 and r.json()["error"]["code"] == "NO_SPACE", r.text
    assert (await mesh.client.get(a.url + "/models/lost-0")).status_code == 404
    filler.unlink()
    r = await mesh.client.post(a.url + "/models/kept/register", json={"model_type": "llm"})
    assert r.status_code == 201, r.text
    await wait_for(lambda: _has(mesh, b.url, "kept"), what="the later registration reaches b")
    for attempt in range(3):
        assert not await _has(mesh, b.url, f"lost-{attempt}")
    # And it survives a kill: the log holds it, nothing half-written in it.
    a.kill()
    await a.done.wait()
    a2 = await mesh.start("a", data_dir=data)
    assert await _has(mesh, a2.url, "kept") and not await _has(mesh, a2.url, "lost-0")


async def _has_node(mesh: Mesh, url: str, node: str) -> bool:
    return node in {n["node_id"] for n in (await mesh.client.get(url + "/nodes")).json()["nodes"]}
