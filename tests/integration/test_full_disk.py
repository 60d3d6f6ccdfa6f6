"""A copy asked of a node whose data dir is full answers 507 ``NO_SPACE``
(not 500), and nothing half-written stays in its transfers directory."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

from .conftest import Mesh, all_alive, wait_for
from .test_serving import put_model


def fill(directory: Path) -> None:
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    try:
        with open(directory / "filler-small", "wb") as f:  # the last few blocks too
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass


async def test_a_copy_to_a_full_data_dir_is_no_space(mesh: Mesh, tmp_path: Path,
                                                     tmpfs: Callable[[int], Path]) -> None:
    a = await mesh.start("a")
    full = tmpfs(20)
    b = await mesh.start("b", join=[a], data_dir=full / "b")
    await all_alive(mesh, [a, b])
    await put_model(mesh, a, tmp_path, "org/tiny")
    await wait_for(lambda: b.node.registry is not None and b.node.registry.find("org/tiny") is not None,
                   what="b knows the model")
    fill(full)
    r = await mesh.client.post(b.url + "/models/org/tiny/copy", json={"to_device": "b:disk"})
    assert r.status_code == 507, r.text
    assert r.json()["error"]["code"] == "NO_SPACE" and "full" in r.json()["error"]["message"]
    assert [p.name for p in (full / "b" / "transfers").iterdir()] == []  # no intent, no temp file
    assert (await mesh.client.get(b.url + "/health")).status_code == 200
