"""State on disk: restart at a higher generation, corrupt files, unusable data dirs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from meshnode.config import add_start_arguments
from meshnode.node import main_start
from meshnode.persist import STATE_NAME

from .conftest import Mesh, wait_for


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
