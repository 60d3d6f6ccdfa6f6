"""The HTTP API's edge rules on live nodes (issue 22): a browser's
cross-site write and a DNS-rebinding page get nothing from a node without
tokens; a token (or a client) cannot flood the catalog; a method a path
does not take is 405 with exactly the methods it takes."""

from __future__ import annotations

import argparse
import json
import re
import types
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from meshnode.api.app import _public_app
from meshnode.cli.client import AnswerError, ApiClient
from meshnode.config import ConfigError, add_start_arguments, config_from_args

from .conftest import Mesh, wait_for, wait_transfer

EVIL = "http://evil.example"
# What a browser sends for a cross-site <form> post (the three types a page may send unasked).
FORM_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=----x"]
REGISTER = b'{"model_type": "llm", "source_url": "https://example.invalid/m"}'


def err(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def writes(a_url: str, tmp: Path) -> list[tuple[str, str, bytes]]:
    """Writes a cross-site page would want: register, download, serve, a pipeline, the catalog."""
    pipeline = b'{"name": "p", "actions": [{"action_id": "d", "action_type": "download", "model_name": "x/y", ' \
               b'"source_url": "file://' + str(tmp).encode() + b'", "devices": ["a:disk"]}]}'
    return [
        ("POST", "/models/acme/m/register", REGISTER),
        ("POST", "/models/acme/m/download", b'{"source_url": "file://' + str(tmp).encode() + b'", "target_device": "a:disk"}'),
        ("POST", "/models/acme/m/services", b'{"device": "a:gpu0", "engine": "vllm"}'),
        ("POST", "/models/acme/m/pin", b'{"min": 1}'),
        ("POST", "/jobs", pipeline),
        ("POST", "/v2/catalog/models", b'{"id": "acme/n", "source_url": "https://example.invalid/n"}'),
        ("DELETE", "/models/acme/m", b""),
    ]


async def nothing_written(mesh: Mesh, url: str) -> None:
    assert (await mesh.client.get(url + "/models")).json()["total_count"] == 0
    assert (await mesh.client.get(url + "/jobs")).json()["total_count"] == 0
    assert (await mesh.client.get(url + "/transfers")).json()["total_count"] == 0
    assert (await mesh.client.get(url + "/services")).json()["total_count"] == 0


async def test_a_cross_site_form_cannot_write_to_a_node_without_tokens(mesh: Mesh, tmp_path: Path) -> None:
    """``Origin: http://evil.example`` with ``text/plain`` registered a model
    (201), started a download (202) and a service."""
    a = await mesh.start("a")
    for method, path, body in writes(a.url, tmp_path):
        for ctype in FORM_TYPES:
            headers = {"origin": EVIL, "content-type": ctype}
            r = await mesh.client.request(method, a.url + path, content=body, headers=headers)
            assert err(r) == (403, "CROSS_ORIGIN"), (method, path, ctype, r.text)
            # A browser too old to send Origin: the form's body type alone is refused.
            r = await mesh.client.request(method, a.url + path, content=body, headers={"content-type": ctype})
            assert err(r) == (415, "UNSUPPORTED_MEDIA_TYPE"), (method, path, ctype, r.text)
        # fetch() with a JSON type would need a preflight the node never answers; its Origin is refused anyway.
        r = await mesh.client.request(method, a.url + path, content=body,
                                      headers={"origin": EVIL, "content-type": "application/json"})
        assert err(r) == (403, "CROSS_ORIGIN"), (method, path, r.text)
        r = await mesh.client.request(method, a.url + path, content=body, headers={"origin": "null"})
        assert err(r) == (403, "CROSS_ORIGIN"), (method, path, r.text)
    # An empty cross-site POST (no body, no type) is refused by its Origin too.
    r = await mesh.client.post(a.url + "/jobs/j1/cancel", headers={"origin": EVIL})
    assert err(r) == (403, "CROSS_ORIGIN")
    await nothing_written(mesh, a.url)


async def test_a_rebinding_page_gets_no_answer(mesh: Mesh) -> None:
    """``Host: attacker.example`` was answered, so a page whose name was
    rebound to 127.0.0.1 could read the node's answers."""
    a = await mesh.start("a", "--http-hosts", "mesh.example")
    port = a.url.rsplit(":", 1)[1]
    for path in ("/models", "/status", "/", "/ui/app.js", "/openapi.json", "/nodes"):
        r = await mesh.client.get(a.url + path, headers={"host": f"attacker.example:{port}"})
        assert err(r) == (421, "HOST_NOT_ALLOWED"), (path, r.text)
        assert "attacker.example" in r.json()["error"]["message"]
    r = await mesh.client.post(a.url + "/models/acme/m/register", json={}, headers={"host": "attacker.example"})
    assert err(r) == (421, "HOST_NOT_ALLOWED")
    # A page on the rebound name is same-origin with itself: its Origin matches its Host, still refused.
    r = await mesh.client.post(a.url + "/models/acme/m/register", json={},
                               headers={"host": f"attacker.example:{port}", "origin": f"http://attacker.example:{port}"})
    assert err(r) == (421, "HOST_NOT_ALLOWED")
    await nothing_written(mesh, a.url)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"mesh.example:{port}", "MESH.EXAMPLE"):
        r = await mesh.client.get(a.url + "/models", headers={"host": host})
        assert r.status_code == 200, (host, r.text)
    # Probes name the pod's address, or anything: /health and /ready answer every Host.
    for path in ("/health", "/ready"):
        r = await mesh.client.get(a.url + path, headers={"host": "pod-7.attacker.example"})
        assert r.status_code == 200, (path, r.text)


async def test_the_dashboard_origin_and_the_cli_keep_working(mesh: Mesh, tmp_path: Path) -> None:
    a = await mesh.start("a")
    port = a.url.rsplit(":", 1)[1]
    # The dashboard's own page: same origin, under any of the node's names.
    for origin, host in ((a.url, None), (f"http://localhost:{port}", f"localhost:{port}")):
        headers = {"origin": origin, **({"host": host} if host else {})}
        r = await mesh.client.post(a.url + "/models/dash/m/register", json={"model_type": "llm"}, headers=headers)
        assert r.status_code in (200, 201), r.text
        for page in ("/", "/ui/app.js", "/models"):
            assert (await mesh.client.get(a.url + page, headers=headers)).status_code == 200
    # What the CLI sends, request for request (meshnode.cli's client, as `meshnode ...` uses it).
    (tmp_path / "w.bin").write_bytes(b"x" * 1000)
    pipeline = (f"name: p\nactions:\n  - action_id: d\n    action_type: download\n    model_name: cli/w\n"
                f"    source_url: {(tmp_path / 'w.bin').as_uri()}\n    devices: ['a:disk']\n").encode()

    def cli() -> list[Any]:
        with ApiClient(a.url) as api:
            out = [api.register_model("cli/m", model_type="llm", source_url="https://example.invalid/m")]
            out.append(api.pin_model("cli/m", {"min": 1}))
            out.append(api.pin_model("cli/m", None))
            job = api.submit_pipeline(pipeline)
            out.append(job)
            try:
                out.append(api.cancel_job(job["job_id"]))
            except AnswerError as e:  # it may have ended already: then a cancel is refused, not 4xx-by-guard
                assert e.status not in (403, 415, 421, 429), e
            out.append(api.download_model("cli/d", target_device="a:disk", source_url=(tmp_path / "w.bin").as_uri()))
            out.append(api.unregister_model("cli/m"))
            return out

    out = await trio.to_thread.run_sync(cli)
    assert out[0]["registered"] is True and out[-1]["unregistered"] is True
    assert out[3]["job_id"] and out[-2]["transfer_id"]


async def test_with_tokens_any_host_is_answered_but_no_cross_site_write(mesh: Mesh) -> None:
    """A rebinding page has no token: a node with tokens answers every Host
    (a Kubernetes service name, an ingress) unless --http-hosts lists them."""
    token = "guard-token-" + "t" * 32
    a = await mesh.start("a", "--api-tokens", token)
    auth = {"authorization": f"Bearer {token}"}
    r = await mesh.client.get(a.url + "/models", headers={**auth, "host": "meshnode.ns.svc.cluster.local"})
    assert r.status_code == 200, r.text
    r = await mesh.client.get(a.url + "/models", headers={"host": "attacker.example"})
    assert err(r) == (401, "UNAUTHORIZED")
    r = await mesh.client.post(a.url + "/models/acme/m/register", content=REGISTER,
                               headers={**auth, "origin": EVIL, "content-type": "text/plain"})
    assert err(r) == (403, "CROSS_ORIGIN")


# -- limits on what a token can write ---------------------------------------------------------


def _metadata_of(size: int) -> dict[str, Any]:
    files = [f"shard-{i:04d}-" + "f" * 985 for i in range(size // 1000)]
    return {"files": files}


async def test_metadata_size_and_the_number_of_models_are_bounded(mesh: Mesh) -> None:
    """22,569 registrations, 3,000 of them with 52 KB of metadata, were all accepted."""
    a = await mesh.start("a", "--max-models", "3")
    big = await mesh.client.post(a.url + "/models/big/register", json={"metadata": _metadata_of(17 * 1024)})
    assert err(big) == (413, "TOO_LARGE") and "16 KiB" in big.json()["error"]["message"], big.text
    ok = await mesh.client.post(a.url + "/models/m1/register", json={"metadata": _metadata_of(15 * 1024)})
    assert ok.status_code == 201, ok.text
    assert len(ok.json()["metadata"]["files"]) == 15
    for name in ("m2", "m3"):
        assert (await mesh.client.post(a.url + f"/models/{name}/register", json={})).status_code == 201
    r = await mesh.client.post(a.url + "/models/m4/register", json={})
    assert err(r) == (507, "TOO_MANY_MODELS") and "--max-models" in r.json()["error"]["message"], r.text
    # The catalog's own add, and a download that would register one, are refused alike.
    r = await mesh.client.post(a.url + "/v2/catalog/models", json={"id": "m5", "source_url": "https://example.invalid/x"})
    assert err(r) == (507, "TOO_MANY_MODELS"), r.text
    r = await mesh.client.post(a.url + "/models/m6/download",
                               json={"source_url": "https://example.invalid/x", "target_device": "a:disk"})
    assert err(r) == (507, "TOO_MANY_MODELS"), r.text
    # Registering an existing model again is no new model.
    r = await mesh.client.post(a.url + "/models/m2/register", json={"model_type": "llm"})
    assert r.status_code == 200 and r.json()["replaced"] is True, r.text
    assert (await mesh.client.get(a.url + "/models")).json()["total_count"] == 3
    assert (await mesh.client.delete(a.url + "/models/m3")).status_code == 200
    assert (await mesh.client.post(a.url + "/models/m4/register", json={})).status_code == 201


async def test_a_download_registers_its_model_within_the_limit(mesh: Mesh, tmp_path: Path) -> None:
    """A model of 200 files with long names is more than 16 KiB of file
    names: the registration the download makes keeps the names that fit."""
    src = tmp_path / "many"
    src.mkdir()
    for i in range(200):
        (src / (f"{i:03d}-" + "n" * 120 + ".bin")).write_bytes(b"%d" % i)
    a = await mesh.start("a")
    r = await mesh.client.post(a.url + "/models/org/many/download",
                               json={"source_url": src.as_uri(), "target_device": "a:disk"})
    assert r.status_code == 202, r.text
    t = await wait_transfer(mesh, a.url, r.json()["transfer_id"])
    assert t["status"] == "done", t
    meta = (await mesh.client.get(a.url + "/models/org/many")).json()["metadata"]
    assert meta["file_count"] == 200 and 0 < len(meta["files"]) < 200, meta.get("file_count")
    assert len(json.dumps(meta, separators=(",", ":")).encode()) <= 16 * 1024


async def test_a_flood_of_writes_is_rate_limited_and_reads_are_not(mesh: Mesh) -> None:
    a = await mesh.start("a", "--write-rate", "5")  # bursts of 50
    limited = None
    for i in range(400):
        r = await mesh.client.post(a.url + f"/jobs/nope{i}/cancel")
        if r.status_code == 429:
            limited = r
            break
        assert r.status_code == 404, r.text
    assert limited is not None and 50 <= i < 400, i
    assert limited.json()["error"]["code"] == "RATE_LIMITED" and "--write-rate" in limited.json()["error"]["message"]
    retry = limited.headers["retry-after"]
    assert re.fullmatch(r"[1-9][0-9]*", retry), retry
    # Reads never are.
    for _ in range(100):
        assert (await mesh.client.get(a.url + "/models")).status_code == 200
    # Once the bucket has refilled a little, a write goes through.
    ok: list[int] = []

    async def writes_again() -> bool:
        ok.append((await mesh.client.post(a.url + "/models/later/register", json={})).status_code)
        return ok[-1] == 201

    await wait_for(writes_again, timeout_s=2 + int(retry), what="a write after the wait")
    assert set(ok) <= {201, 429}


async def test_each_token_has_its_own_bucket(mesh: Mesh) -> None:
    t1, t2 = "token-one-" + "a" * 32, "token-two-" + "b" * 32
    a = await mesh.start("a", "--api-tokens", f"{t1},{t2}", "--write-rate", "1")  # bursts of 10
    codes = [(await mesh.client.post(a.url + f"/jobs/j{i}/cancel", headers={"authorization": f"Bearer {t1}"})).status_code
             for i in range(30)]
    assert 429 in codes and codes.index(429) >= 9, codes
    r = await mesh.client.post(a.url + "/jobs/j/cancel", headers={"authorization": f"Bearer {t2}"})
    assert err(r) == (404, "JOB_NOT_FOUND"), r.text
    # A wrong token is refused for itself, and takes nothing from anyone's bucket.
    for _ in range(20):
        r = await mesh.client.post(a.url + "/jobs/j/cancel", headers={"authorization": "Bearer wrong"})
        assert err(r) == (401, "UNAUTHORIZED")


# -- methods and routes -----------------------------------------------------------------------


async def test_an_empty_pin_is_not_an_unpin(mesh: Mesh) -> None:
    a = await mesh.start("a")
    m = a.url + "/models/acme/m"
    assert (await mesh.client.post(m + "/register", json={})).status_code == 201
    r = await mesh.client.post(m + "/pin", json={"min": 1})
    assert r.status_code == 200 and r.json()["replicas"] is not None, r.text
    for r in (await mesh.client.post(m + "/pin"), await mesh.client.post(m + "/pin", content=b" ",
                                                                         headers={"content-type": "application/json"})):
        assert err(r) == (400, "INVALID_REQUEST") and "DELETE" in r.json()["error"]["message"], r.text
    assert (await mesh.client.get(m)).json()["replicas"] is not None  # still pinned
    r = await mesh.client.delete(m + "/pin")
    assert r.status_code == 200 and r.json()["replicas"] is None, r.text


SAMPLES = {"model": "acme/m", "device": "a:disk", "int": "8000", "path": "chat/completions", "file": "app.js"}
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _sample(rule: str) -> str:
    def value(m: re.Match[str]) -> str:
        conv, name = m.group(1), m.group(2)
        return SAMPLES.get(name if name == "file" else conv or "", "x1")

    return re.sub(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>", value, rule)


async def test_a_method_a_path_does_not_take_is_405_with_exactly_what_it_takes(mesh: Mesh) -> None:
    """A GET on a POST-only route under /models/<name>/... was read as the
    model ``<name>/register`` (400), and Allow listed the bare model's
    methods too."""
    a = await mesh.start("a")
    app = _public_app(types.SimpleNamespace())  # type: ignore[arg-type]
    takes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint != "static":
            takes.setdefault(_sample(rule.rule), set()).update(rule.methods or ())
    assert len(takes) > 30
    wrong = []
    for path, methods in sorted(takes.items()):
        for method in METHODS:
            if method in methods:
                continue
            r = await mesh.client.request(method, a.url + path)
            allow = {m.strip() for m in r.headers.get("allow", "").split(",") if m.strip()}
            if r.status_code != 405 or allow != methods:
                wrong.append((method, path, r.status_code, sorted(allow), sorted(methods)))
    assert wrong == [], "\n".join(map(str, wrong))


def test_the_flags_are_checked(tmp_path: Path) -> None:
    def cfg(*argv: str) -> Any:
        p = argparse.ArgumentParser()
        add_start_arguments(p)
        return config_from_args(p.parse_args(["--node-id", "x", "--data-dir", str(tmp_path), *argv]), env={})

    c = cfg("--http-hosts", "mesh.example,node1:7420", "--advertise", "node9:7420")
    assert c.host_names == ("127.0.0.1", "node9", "mesh.example", "node1:7420")
    assert (c.max_models, c.write_rate) == (100_000, 50.0)
    for argv, flag in ((("--http-hosts", "a/b"), "--http-hosts"), (("--max-models", "0"), "--max-models"),
                       (("--write-rate", "-1"), "--write-rate"), (("--write-rate", "nan"), "--write-rate")):
        with pytest.raises(ConfigError, match=flag):
            cfg(*argv)
    p = argparse.ArgumentParser()
    add_start_arguments(p)
    env = {"MESHNODE_HTTP_HOSTS": "a.example", "MESHNODE_WRITE_RATE": "0", "MESHNODE_MAX_MODELS": "7"}
    c = config_from_args(p.parse_args(["--node-id", "x", "--data-dir", str(tmp_path)]), env=env)
    assert (c.http_hosts, c.write_rate, c.max_models) == (("a.example",), 0.0, 7)
