"""llama-orch's catalog API on real daemons: every copy computes its sha256
digest once, keeps it beside its manifest and gossips it; /v2/catalog/models
answers {id, digest} from any node; POST adds a model with the digest its
copies must have, and says whether they do."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .conftest import Mesh, wait_for, wait_transfer
from .test_transfer import ingest, make_model

FAST = ("--scrub-interval", "0.2")


def _expected(src: Path) -> str:
    files = {p.relative_to(src).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in src.rglob("*") if p.is_file()}
    lines = "".join(f"{files[p]}  {p}\n" for p in sorted(files))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


async def test_digests_per_copy_and_the_catalog_shape(mesh: Mesh, tmp_path: Path) -> None:
    src = make_model(tmp_path, 3 * 1024 * 1024)
    want = _expected(src)
    a = await mesh.start("a", *FAST)
    b = await mesh.start("b", *FAST, join=[a])
    await ingest(mesh, a, "m", src)
    r = await mesh.client.post(a.url + "/models/m/copy", json={"to_device": "b:disk"})
    t = await wait_transfer(mesh, b.url, r.json()["transfer_id"])
    assert t["status"] == "done", t

    async def both_digested() -> dict[str, Any] | None:
        r = await mesh.client.get(b.url + "/v2/catalog/models")
        (m,) = r.json()["models"]
        return m if [c["digest"] for c in m["copies"]] == [want, want] else None

    await wait_for(both_digested, what="both copies' digests in the catalog")
    m = (await mesh.client.get(b.url + "/v2/catalog/models/m")).json()
    assert m["id"] == "m" and m["digest"] == want and m["conflict"] is False and m["verified"] is None, m
    for h in (a, b):  # kept beside the manifest, read back at a restart
        c = h.node.store.get("m", "disk")
        assert c is not None and c.path.with_name(c.path.name + ".sha256").is_file()

    # llama-orch adds the model with the digest it expects: the copies agree.
    r = await mesh.client.post(a.url + "/v2/catalog/models", json={"id": "m", "digest": want})
    assert r.status_code == 200 and r.json()["verified"] is True, r.text
    r = await mesh.client.post(a.url + "/v2/catalog/models", json={"id": "m", "digest": "sha256:" + "0" * 64})
    assert r.status_code == 200 and r.json()["verified"] is False and r.json()["digest"] == want, r.text
    info = (await mesh.client.get(a.url + "/models/m")).json()
    assert info["metadata"]["digest"] == "sha256:" + "0" * 64 and info["metadata"]["files"], info  # the rest kept

    r = await mesh.client.post(a.url + "/v2/catalog/models", json={"id": "acme/new", "digest": want,
                                                                   "source_url": "hf://acme/new"})
    assert r.status_code == 201 and r.json()["digest"] is None and r.json()["copies"] == [], r.text
    for bad in ({"id": "x", "digest": "md5:abc"}, {"digest": want}, {"id": "../x"}):
        r = await mesh.client.post(a.url + "/v2/catalog/models", json=bad)
        assert r.status_code == 400 and r.json()["error"]["code"] in ("INVALID_REQUEST", "INVALID_MODEL_NAME"), r.text
    assert (await mesh.client.get(a.url + "/v2/catalog/models/nope")).status_code == 404

    # After a restart the digest is read back, not computed again.
    await a.stop()
    a = await mesh.start("a", *FAST, join=[b])
    assert a.node.store.digest("m", "disk") == want
