"""A TLS mesh: HTTPS for the API and the peer route, client certificates required."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from .conftest import Handle, Mesh, wait_for


def _certs(tmp: Path) -> tuple[list[str], trustme.CA, Path, Path]:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca_pem, cert_pem, key_pem = tmp / "ca.pem", tmp / "node.pem", tmp / "node.key"
    ca.cert_pem.write_to_path(str(ca_pem))
    leaf.private_key_pem.write_to_path(str(key_pem))
    with open(cert_pem, "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    return ["--tls-cert", str(cert_pem), "--tls-key", str(key_pem), "--tls-ca", str(ca_pem)], ca, cert_pem, key_pem


async def test_tls_mesh_with_client_certificates(mesh: Mesh, tmp_path: Path) -> None:
    flags, ca, cert, key = _certs(tmp_path)
    a = await mesh.start("a", *flags)
    b = await mesh.start("b", *flags, join=[a])
    assert a.url.startswith("https://")
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.load_cert_chain(str(cert), str(key))
    async with httpx.AsyncClient(verify=ctx, timeout=10) as client:
        r = await client.post(a.url + "/models/tls-model/register", json={"model_type": "llm"})
        assert r.status_code == 201

        async def on_b() -> bool:
            return (await client.get(b.url + "/models/tls-model")).status_code == 200

        await wait_for(on_b, what="registration over TLS gossip")
        # llama-orch's availability view gives each node's address with the scheme it serves.
        av = (await client.get(b.url + "/v2/catalog/availability")).json()
        addresses = [n["address"] for n in av["nodes"].values()]
        assert addresses and all(addr.startswith("https://") for addr in addresses), av

    # Without a client certificate the handshake is refused; plain HTTP gets nothing either.
    no_cert = ssl.create_default_context()
    ca.configure_trust(no_cert)
    async with httpx.AsyncClient(verify=no_cert, timeout=5) as client:
        try:
            r = await client.get(a.url + "/health")
            refused = False
        except httpx.HTTPError:
            refused = True
        assert refused
    try:
        await mesh.client.get(a.url.replace("https://", "http://") + "/health")
        plain_refused = False
    except httpx.HTTPError:
        plain_refused = True
    assert plain_refused


async def test_tls_mesh_copies_over_the_tls_data_plane(mesh: Mesh, tmp_path: Path) -> None:
    import os

    flags, ca, cert, key = _certs(tmp_path)
    a = await mesh.start("a", *flags)
    b = await mesh.start("b", *flags, join=[a])
    src = tmp_path / "model"
    src.mkdir()
    (src / "w.bin").write_bytes(os.urandom(9 * 1024 * 1024))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.load_cert_chain(str(cert), str(key))
    async with httpx.AsyncClient(verify=ctx, timeout=10) as client:
        r = await client.post(a.url + "/models/m/download", json={"source_url": src.as_uri(), "target_device": "a:disk"})
        assert r.status_code == 202, r.text

        async def status(h: Handle, tid: str) -> str:
            return str((await client.get(h.url + f"/transfers/{tid}")).json().get("status"))

        tid = r.json()["transfer_id"]
        await wait_for(lambda: _is(status(a, tid), "done"), what="ingest")

        async def b_sees() -> bool:
            return bool((await client.get(b.url + "/models/m")).json().get("copies"))

        await wait_for(b_sees, what="copy in b's catalog")
        r = await client.post(b.url + "/models/m/copy", json={"from_device": "a:disk", "to_device": "b:disk"})
        tid = r.json()["transfer_id"]
        await wait_for(lambda: _is(status(b, tid), "done"), what="copy over TLS")
    c = b.node.store.get("m", "disk")
    assert c is not None and (c.path / "w.bin").read_bytes() == (src / "w.bin").read_bytes()
    assert a.node.data_server_stats()["bytes_sent"] >= 9 * 1024 * 1024
    # The data port speaks TLS only: a plain client with the right secret gets nowhere.
    from meshnode.copies.dataplane import DataClient, DataPlaneError

    plain = DataClient(a.node.cfg.secrets.cluster_secrets, connect_timeout_s=2, read_timeout_s=2)
    try:
        with pytest.raises(DataPlaneError):
            await plain.have(f"127.0.0.1:{a.node.data_port}", c.manifest_hash)
    finally:
        await plain.aclose()


async def _is(value: Any, want: str) -> bool:
    return bool(await value == want)


async def test_the_cli_speaks_tls_with_cacert_cert_and_key(mesh: Mesh, tmp_path: Path) -> None:
    """``--cacert`` to trust the node, ``--cert``/``--key`` when it wants a
    client certificate; without them, one clear line and exit 2."""
    import os
    import sys

    import trio

    flags, _ca, cert, key = _certs(tmp_path)
    a = await mesh.start("a", *flags)
    exe = str(Path(sys.executable).parent / "meshnode")
    ca_pem = flags[flags.index("--tls-ca") + 1]

    async def cli(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        r = await trio.run_process([exe, "--peer", a.url, "--timeout", "5", *argv], capture_stdout=True,
                                   capture_stderr=True, check=False, env={**os.environ, **(env or {})})
        return r.returncode, r.stdout.decode(), r.stderr.decode()

    code, out, err = await cli("--cacert", ca_pem, "--cert", str(cert), "--key", str(key), "nodes")
    assert code == 0 and "a" in out, err
    code, out, err = await cli("nodes", env={"MESHNODE_CACERT": ca_pem, "MESHNODE_CERT": str(cert),
                                             "MESHNODE_KEY": str(key)})
    assert code == 0, err
    code, _out, err = await cli("nodes")  # the test CA is not the system's
    assert code == 2 and "CERTIFICATE_VERIFY_FAILED" in err and err.count("\n") == 1, err
    code, _out, err = await cli("--cacert", ca_pem, "nodes")  # no client certificate
    assert code == 1 and "without a client certificate: --cert, --key" in err and err.count("\n") == 1, err
    code, _out, err = await cli("--cacert", str(tmp_path / "missing.pem"), "nodes")
    assert code == 2 and "missing.pem" in err, err
