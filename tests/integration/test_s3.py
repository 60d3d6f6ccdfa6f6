"""S3 as a source, against a real S3 API on loopback (moto's server, with
credentials checked): a model under a prefix (one object uploaded in parts)
fetched once for three nodes asked at once, every file checked; a connection
dropped mid-object resumed; bad credentials, a missing key, a missing bucket
and a bad URL refused with their codes; no secret in any answer."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from bench.s3server import make_user

from .conftest import Mesh, wait_for, wait_transfer

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]


class S3:
    def __init__(self, endpoint: str, key: str, secret: str) -> None:
        self.endpoint, self.key, self.secret = endpoint, key, secret
        import boto3

        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                   aws_access_key_id=key, aws_secret_access_key=secret)
        self.files: dict[str, bytes] = {}

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = httpx.get(self.endpoint + "/__meshnode/stats").json()
        return out

    def fault(self, drop_after: int, times: int) -> None:
        httpx.post(self.endpoint + f"/__meshnode/fault?drop_after={drop_after}&times={times}")


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.s3server", "--port", "0", "--auth"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        endpoint = line.split()[-1]
        key, secret = make_user(endpoint)
        s = S3(endpoint, key, secret)
        s.client.create_bucket(Bucket="models")
        s.files = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": os.urandom(300_000),
                   "model.safetensors": os.urandom(20 * MiB + 12345)}  # uploaded in 3 parts of 8 MiB
        for name, data in s.files.items():
            s.client.upload_fileobj(io.BytesIO(data), "models", f"llama/{name}")
        head = s.client.head_object(Bucket="models", Key="llama/model.safetensors")
        assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag, as the test needs
        yield s
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def aws_env(s3: S3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


async def _download(mesh: Mesh, url: str, node_url: str, target: str, source_url: str) -> dict[str, Any]:
    r = await mesh.client.post(node_url + "/models/llama/download", json={"source_url": source_url,
                                                                          "target_device": target})
    assert r.status_code == 202, r.text
    return await wait_transfer(mesh, url, r.json()["transfer_id"], timeout_s=60)


async def test_three_nodes_asked_at_once_fetch_once_and_check_every_file(
        mesh: Mesh, s3: S3, aws_env: None) -> None:
    flags = ("--s3-endpoint-url", s3.endpoint)
    a = await mesh.start("a", *flags)
    b = await mesh.start("b", *flags, join=[a])
    c = await mesh.start("c", *flags, join=[a])
    httpx.post(s3.endpoint + "/__meshnode/reset")
    results: dict[str, dict[str, Any]] = {}

    async def one(h: Any) -> None:
        nid = h.node.cfg.node_id
        results[nid] = await _download(mesh, h.url, h.url, f"{nid}:disk", "s3://models/llama")

    async with trio.open_nursery() as n:
        for h in (a, b, c):
            n.start_soon(one, h)
    assert {t["status"] for t in results.values()} == {"done"}, results
    want = {k: hashlib.sha256(v).hexdigest() for k, v in s3.files.items()}
    for h in (a, b, c):
        copy = h.node.store.get("llama", "disk")
        assert copy is not None and _digests(copy.path) == want
    total = sum(len(v) for v in s3.files.values())
    served = s3.stats()["object_bytes"]
    assert served == total, (served, total)  # once for the mesh; the others pulled it peer to peer
    info = (await mesh.client.get(a.url + "/models/llama")).json()
    assert info["model_type"] == "llama" and info["source_url"] == "s3://models/llama", info
    metrics = (await mesh.client.get(a.url + "/metrics")).text + (await mesh.client.get(b.url + "/metrics")).text \
        + (await mesh.client.get(c.url + "/metrics")).text
    fetched = sum(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith('meshnode_source_fetched_bytes_total{source="s3"}'))
    assert fetched == total, metrics


async def test_a_dropped_connection_resumes_mid_object(mesh: Mesh, s3: S3, aws_env: None) -> None:
    a = await mesh.start("a", "--s3-endpoint-url", s3.endpoint)
    httpx.post(s3.endpoint + "/__meshnode/reset")
    s3.fault(drop_after=3 * MiB, times=2)  # two ranges cut 3 MiB in
    t = await _download(mesh, a.url, a.url, "a:disk", "s3://models/llama/model.safetensors")
    assert t["status"] == "done", t
    copy = a.node.store.get("llama", "disk")
    assert copy is not None
    assert (copy.path / "model.safetensors").read_bytes() == s3.files["model.safetensors"]
    st = s3.stats()
    assert st["drops_left"] == 0 and st["object_gets"] >= 5  # 3 ranges, and 2 resumed
    # Resumed from where each cut was, not from the start: at most the piece in flight (1 MiB) again.
    size = len(s3.files["model.safetensors"])
    assert size <= st["object_bytes"] <= size + 2 * MiB, st


async def test_refusals_have_their_codes_and_no_secret(
        mesh: Mesh, s3: S3, aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    a = await mesh.start("a", "--s3-endpoint-url", s3.endpoint)
    for url, code in (("s3://models/llama/nope.bin", "NOT_FOUND"), ("s3://no-such-bucket/x", "NOT_FOUND"),
                      ("s3://models/empty-prefix/", "NOT_FOUND")):
        t = await _download(mesh, a.url, a.url, "a:disk", url)
        assert t["status"] == "failed" and t["error"]["code"] == code, (url, t)
    for url, needle in (("s3://models/x?aws_secret_access_key=abc", "credentials"),
                        ("s3://u:p@models/x", "credentials"), ("s3://M/x", "bucket"),
                        ("s3://models/x?endpoint_url=ftp://h", "endpoint_url")):
        r = await mesh.client.post(a.url + "/models/llama/download", json={"source_url": url, "target_device": "a:disk"})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (url, r.text)
        assert "abc" not in r.text or needle != "credentials"
    # Wrong credentials: UNAUTHORIZED, and neither the key id nor the secret in what anyone sees.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-" + "z" * 20)
    t = await _download(mesh, a.url, a.url, "a:disk", "s3://models/llama/config.json")
    assert t["status"] == "failed" and t["error"]["code"] == "UNAUTHORIZED", t
    shown = str(t) + (await mesh.client.get(a.url + "/transfers")).text
    assert "not-the-secret" not in shown and s3.secret not in shown
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    t = await _download(mesh, a.url, a.url, "a:disk", "s3://models/llama/config.json")
    assert t["status"] == "failed" and t["error"]["code"] == "UNAUTHORIZED", t
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    t = await _download(mesh, a.url, a.url, "a:disk", "s3://models/llama/config.json")
    assert t["status"] == "failed" and t["error"]["code"] == "UNAUTHORIZED", t
    assert "no AWS credentials" in t["error"]["message"]


async def test_a_registration_carries_its_endpoint(mesh: Mesh, s3: S3, aws_env: None) -> None:
    """No --s3-endpoint-url on the node: the registration's URL names its endpoint and region."""
    a = await mesh.start("a")
    url = f"s3://models/llama/config.json?endpoint_url={s3.endpoint}&region=us-east-1"
    r = await mesh.client.post(a.url + "/models/llama/register", json={"source_url": url, "model_type": "llm"})
    assert r.status_code == 201, r.text
    r = await mesh.client.post(a.url + "/models/llama/download", json={"target_device": "a:disk"})
    assert r.status_code == 202, r.text
    t = await wait_transfer(mesh, a.url, r.json()["transfer_id"])
    assert t["status"] == "done", t
    assert t["source"] == "s3://models/llama/config.json", t  # shown without its query


async def test_an_object_too_big_for_the_tier_is_refused_before_a_byte_is_fetched(
        mesh: Mesh, s3: S3, aws_env: None, tmpfs: Callable[[int], Path]) -> None:
    shm = tmpfs(20)
    a = await mesh.start("a", "--s3-endpoint-url", s3.endpoint, "--dram-dir", str(shm),
                         "--dram-watermarks", "60,55")
    httpx.post(s3.endpoint + "/__meshnode/reset")
    t = await _download(mesh, a.url, a.url, "a:dram", "s3://models/llama")  # 20 MiB: past 60% of 20 MiB
    assert t["status"] == "failed" and t["error"]["code"] == "NO_SPACE", t
    assert "high watermark of 60%" in t["error"]["message"], t
    assert s3.stats()["object_bytes"] == 0


async def test_a_client_endpoint_rebinding_to_a_private_address_is_refused_at_connect(
        mesh: Mesh, s3: S3, aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the client's endpoint name answers a public address to the
    node's early checks and loopback (where an S3 API listens) when boto3
    connects.  The connection is checked itself: PRIVATE_SOURCE, not a byte
    fetched, and no retry loop."""
    import socket

    port = int(s3.endpoint.rsplit(":", 1)[1])
    real, real_trio = socket.getaddrinfo, trio.socket.getaddrinfo

    async def checked(host: Any, p: Any, *args: Any, **kw: Any) -> Any:
        if host == "rebind.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", p))]  # public to the checks
        return await real_trio(host, p, *args, **kw)

    def connected(host: Any, p: Any, *args: Any, **kw: Any) -> Any:
        if host == "rebind.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p))]  # loopback to the connect
        return real(host, p, *args, **kw)

    monkeypatch.setattr(trio.socket, "getaddrinfo", checked)
    monkeypatch.setattr(socket, "getaddrinfo", connected)
    a = await mesh.start("a", confined=True)  # public sources only, as by default
    httpx.post(s3.endpoint + "/__meshnode/reset")
    url = f"s3://models/llama/config.json?endpoint_url=http://rebind.example:{port}&region=us-east-1"
    t = await _download(mesh, a.url, a.url, "a:disk", url)
    assert t["status"] == "failed" and t["error"]["code"] == "PRIVATE_SOURCE", t
    assert "rebind.example is 127.0.0.1" in t["error"]["message"], t
    assert s3.stats()["requests"] == 0, s3.stats()  # not one request reached the store


async def test_a_fetch_stopped_midway_resumes_after_a_restart(
        mesh: Mesh, s3: S3, aws_env: None, tmp_path: Path) -> None:
    """The node stops while an object is half fetched; started again on the same
    data directory it re-hashes what its resume record claims, keeps it, and
    fetches only the rest (at most the piece each range had in flight again);
    the record is no file of the copy."""
    from meshnode.copies.sources.s3 import LEDGER

    data = tmp_path / "a-data"
    flags = ("--s3-endpoint-url", s3.endpoint)
    a = await mesh.start("a", *flags, data_dir=data)
    httpx.post(s3.endpoint + "/__meshnode/reset")
    httpx.post(s3.endpoint + f"/__meshnode/slow?rate={3 * MiB}")  # 3 ranges at 3 MiB/s: about 3 s in all
    r = await mesh.client.post(a.url + "/models/llama/download", json={
        "source_url": "s3://models/llama/model.safetensors", "target_device": "a:disk"})
    assert r.status_code == 202, r.text
    tid = r.json()["transfer_id"]
    size = len(s3.files["model.safetensors"])
    t = a.node.transfers.by_id[tid]
    await wait_for(lambda: t.bytes_done >= size // 3, timeout_s=30, what="a third of the object")
    await a.stop()
    kept = t.bytes_done
    assert kept < size and list(data.rglob(LEDGER)), kept
    served = s3.stats()["object_bytes"]

    httpx.post(s3.endpoint + "/__meshnode/slow?rate=0")
    a = await mesh.start("a", *flags, data_dir=data)
    done = await wait_transfer(mesh, a.url, tid, timeout_s=60)
    assert done["status"] == "done", done
    copy = a.node.store.get("llama", "disk")
    assert copy is not None
    assert (copy.path / "model.safetensors").read_bytes() == s3.files["model.safetensors"]
    again = s3.stats()["object_bytes"] - served
    assert again <= size - kept + 3 * MiB, (again, size, kept)  # 3 ranges: at most a piece each again
    assert not list(data.rglob(LEDGER)) and sorted(p.name for p in copy.path.iterdir()) == ["model.safetensors"]
