"""README's bundles block, run as written (issue 29): a shell on the connected
side, whose own node holds the models, and ``ssh``/``scp`` to ``gpu1`` of a
second mesh (``gpu1``, ``gpu2``) that never hears of the first.  ``ssh`` and
``scp`` are stand-ins: ``scp FILE HOST:`` copies into HOST's home, ``ssh HOST
CMD`` runs CMD there with HOST's node as the peer (stdin passed through)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import trio

from .conftest import Mesh, all_alive
from .test_bundles import ingest, make_model, tree

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

SSH = """#!/bin/sh
host="$1"; shift
cd "$SHIM_HOMES/$host" || exit 255
peer=$(printf '%s\\n' "$SHIM_PEERS" | tr ',' '\\n' | sed -n "s/^$host=//p")
[ -n "$peer" ] || { echo "ssh: Could not resolve hostname $host" >&2; exit 255; }
MESHNODE_PEER="$peer" exec sh -c "$*"
"""
SCP = """#!/bin/sh
[ $# -eq 2 ] || { echo "scp: usage: scp FILE HOST:" >&2; exit 1; }
host="${2%%:*}"
cp "$1" "$SHIM_HOMES/$host/" || exit 1
"""


def bundles_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Bundles: weights where the internet is not"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "README's bundles block"
    return block.group(1)


async def test_the_bundle_lines_run_as_written(mesh: Mesh, tmp_path: Path) -> None:
    hub = await mesh.start("hub")
    tiny = make_model(tmp_path, "tiny")
    embed = make_model(tmp_path, "embed", {"embed.safetensors": 200_000, "config.json": 50})
    await ingest(mesh, hub, "acme/tiny", tiny, registration={"model_type": "llm"})
    await ingest(mesh, hub, "acme/embed", embed)
    gpu1 = await mesh.start("gpu1")
    gpu2 = await mesh.start("gpu2", join=[gpu1])
    await all_alive(mesh, [gpu1, gpu2])

    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in (("ssh", SSH), ("scp", SCP)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    homes = tmp_path / "homes"
    for host in ("gpu1", "gpu2"):
        (homes / host).mkdir(parents=True)
    work = tmp_path / "connected"
    work.mkdir()
    env = {**os.environ, "PATH": f"{shims}:{BIN}:{os.environ['PATH']}", "MESHNODE_PEER": hub.url,
           "SHIM_HOMES": str(homes), "SHIM_PEERS": f"gpu1={gpu1.url},gpu2={gpu2.url}",
           "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("MESHNODE_TOKEN", None)
    r = await trio.run_process(["bash", "-e", "-o", "pipefail", "-c", bundles_block()], cwd=work, env=env,
                               capture_stdout=True, capture_stderr=True, check=False)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, out + err

    # One bundle of both models, carried over and imported; the tiny one piped straight to dram too.
    assert (homes / "gpu1" / "deploy.bundle").stat().st_size > 3 * 1024 * 1024
    assert "exported acme/tiny,acme/embed" in err
    for model, src, kind in (("acme/tiny", tiny, "disk"), ("acme/embed", embed, "disk"), ("acme/tiny", tiny, "dram")):
        c = gpu1.node.store.get(model, kind)
        assert c is not None and tree(c.path) == tree(src), (model, kind)
    assert "imported: acme/tiny on gpu1:disk" in out and "imported: acme/tiny on gpu1:dram" in out
    # gpu2 got it from gpu1 through the mesh; ensure printed its path; then the lease went back.
    c2 = gpu2.node.store.get("acme/tiny", "disk")
    assert c2 is not None and tree(c2.path) == tree(tiny)
    assert f"{c2.path}\n" in out
    assert "released acme/tiny on gpu2:disk" in out
    assert (await mesh.client.get(gpu2.url + "/leases")).json()["leases"] == []
    # The air-gapped mesh knows the models as the connected one registered them.
    info = (await mesh.client.get(gpu2.url + "/models/acme/tiny")).json()
    assert info["model_type"] == "llm"
