"""Bad input gets a clear 4xx with {"error": {"code", "message"}} and loses nothing."""

from __future__ import annotations

import logging

import msgpack
import pytest

from protocol.wire import PROTOCOL_VERSION, Envelope, Sync, encode

from .conftest import Mesh, raw_oversized_post, wait_for


def err(r: object) -> tuple[int, str]:
    body = r.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return r.status_code, body["error"]["code"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "path",
    [
        "/models/..%2Fetc/register",
        "/models/a%2F..%2Fb/register",
        "/models/%2Fleading/register",
        "/models/bad%0Aname/register",
        "/models/a/b/c/register",
        "/models/" + "x" * 201 + "/register",
        "/models/sp%20ace/register",
    ],
)
async def test_bad_model_names_are_refused(mesh: Mesh, path: str) -> None:
    a = await mesh.start("a")
    r = await mesh.client.post(a.url + path, json={})
    status, code = err(r)
    assert status in (400, 404)
    assert code in ("INVALID_MODEL_NAME", "NOT_FOUND")
    assert (await mesh.client.get(a.url + "/models")).json()["total_count"] == 0


async def test_request_errors(mesh: Mesh) -> None:
    a = await mesh.start("a")
    c = mesh.client
    assert err(await c.get(a.url + "/models/nope")) == (404, "MODEL_NOT_FOUND")
    assert err(await c.get(a.url + "/models/org/nope")) == (404, "MODEL_NOT_FOUND")
    assert err(await c.delete(a.url + "/models/nope")) == (404, "MODEL_NOT_FOUND")
    assert err(await c.post(a.url + "/models/m/register", content=b"{not json")) == (400, "INVALID_JSON")
    assert err(await c.post(a.url + "/models/m/register", json=[1])) == (400, "INVALID_REQUEST")
    assert err(await c.post(a.url + "/models/m/register", json={"bogus": 1})) == (400, "INVALID_REQUEST")
    assert err(await c.post(a.url + "/models/m/register", json={"metadata": {"requirements": {"min_vram": "lots"}}})) == (400, "INVALID_REQUEST")
    assert err(await c.post(a.url + "/models/m/register", json={"model_type": "x" * 65})) == (400, "INVALID_REQUEST")
    assert err(await c.get(a.url + "/no/such/route")) == (404, "NOT_FOUND")
    reply = await raw_oversized_post(a.address, "/models/m/register", 5 * 1024 * 1024)
    assert reply.startswith(b"HTTP/1.1 413")
    assert (await c.post(a.url + "/models/m/register", json={"model_type": "llm"})).status_code == 201
    assert err(await c.post(a.url + "/models/m/locations/a:tape")) == (400, "INVALID_DEVICE")
    assert err(await c.post(a.url + "/models/m/locations/web")) == (400, "INVALID_DEVICE")
    assert err(await c.post(a.url + "/models/m/locations/ghost:disk")) == (404, "NODE_NOT_FOUND")
    assert err(await c.delete(a.url + "/models/m/locations/a:disk")) == (404, "LOCATION_NOT_FOUND")
    # Nothing was lost on the way.
    assert (await c.get(a.url + "/models/m")).json()["model_type"] == "llm"
    assert (await c.get(a.url + "/health")).json()["status"] == "ok"


async def test_deep_json_and_huge_integers_are_400_not_500(mesh: Mesh) -> None:
    """JSON nested 1,000 levels gave a 500 (RecursionError); integers of 2**64
    and up in min_vram, min_memory or file_count gave a 500 (OverflowError,
    when the catalog packed them)."""
    a = await mesh.start("a")
    c = mesh.client
    for depth in (33, 1000, 100_000):
        body = b'{"metadata": ' * 1 + b"[" * depth + b"]" * depth + b"}"
        assert err(await c.post(a.url + "/models/m/register", content=body)) == (400, "INVALID_JSON")
    assert err(await c.post(a.url + "/models/m/copy", content=b"[" * 5000 + b"]" * 5000)) == (400, "INVALID_JSON")
    for field in ("min_vram", "min_memory"):
        for v in (2**63, 2**64, 2**100):
            r = await c.post(a.url + "/models/m/register", json={"metadata": {"requirements": {field: v}}})
            assert err(r) == (400, "INVALID_REQUEST")
    r = await c.post(a.url + "/models/m/register", json={"metadata": {"file_count": 2**64}})
    assert err(r) == (400, "INVALID_REQUEST")
    r = await c.post(a.url + "/models/m/register", json={"metadata": {"requirements": {"min_vram": 2**63 - 1}}})
    assert r.status_code == 201
    assert (await c.get(a.url + "/models/m")).json()["metadata"]["requirements"]["min_vram"] == 2**63 - 1


async def test_bad_peer_messages_are_logged_and_dropped(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="meshnode")
    a = await mesh.start("a")
    b = await mesh.start("b", join=[a])
    c = mesh.client
    url = a.url + "/mesh/v1/msg"
    good = encode(Envelope("meshnode", "x", 1, "127.0.0.1:1", Sync(1, 2)))
    cases = [
        b"",  # empty
        b"\xc1",  # never-used msgpack byte
        good[:-3],  # truncated
        msgpack.packb([PROTOCOL_VERSION + 7, "meshnode", "x", 1, "h:1", 5, [1, 2]]),  # wrong version
        msgpack.packb([PROTOCOL_VERSION, "meshnode", "x", 1, "h:1", 99, []]),  # unknown type
        msgpack.packb([PROTOCOL_VERSION, "meshnode", "x" * 500, 1, "h:1", 5, [1, 2]]),  # oversized field
        msgpack.packb({"not": "an envelope"}),
    ]
    for body in cases:
        r = await c.post(url, content=body)
        assert err(r) == (400, "BAD_PEER_MESSAGE"), body
    reply = await raw_oversized_post(a.address, "/mesh/v1/msg", 5 * 1024 * 1024)  # over the message limit
    assert reply.startswith(b"HTTP/1.1 413")
    assert any("bad message" in rec.getMessage() or "another protocol" in rec.getMessage() for rec in caplog.records)
    # The node is still fine and still gossiping.
    await mesh.client.post(b.url + "/models/after/register", json={})
    await wait_for(lambda: _has(mesh, a.url, "after"), what="gossip after bad input")


async def _has(mesh: Mesh, url: str, name: str) -> bool:
    return (await mesh.client.get(url + f"/models/{name}")).status_code == 200


async def test_names_and_routes_are_never_ambiguous(mesh: Mesh) -> None:
    """`acme/locations` once could not be registered: the route for model
    `acme` answered.  A sub-resource's name is reserved as the second
    segment of a model name, and every sub-resource of `acme/m` reaches its
    own handler."""
    from protocol.names import RESERVED_SEGMENTS

    a = await mesh.start("a")
    for word in sorted(RESERVED_SEGMENTS):
        r = await mesh.client.post(a.url + f"/models/acme/{word}/register", json={})
        assert err(r) == (400, "INVALID_MODEL_NAME"), word
        assert "reserves" in r.json()["error"]["message"]
    assert (await mesh.client.get(a.url + "/models")).json()["total_count"] == 0
    assert (await mesh.client.post(a.url + "/models/acme/m/register", json={})).status_code == 201
    assert (await mesh.client.post(a.url + "/models/locations/register", json={})).status_code == 201  # one segment: fine
    m = a.url + "/models/acme/m"
    assert (await mesh.client.get(m)).json()["model_name"] == "acme/m"
    assert (await mesh.client.get(m + "/locations")).json() == {"model_name": "acme/m", "locations": []}
    r = await mesh.client.post(m + "/locations/a:disk")
    assert r.status_code == 201 and r.json()["device"] == "a:disk"
    assert (await mesh.client.get(m + "/locations")).json()["locations"] == ["a:disk"]
    assert (await mesh.client.delete(m + "/locations/a:disk")).json()["dropped"] is True
    # copy, move and download answer for acme/m, with their own checks.
    assert err(await mesh.client.post(m + "/copy", json={"to_device": "a:disk"})) == (404, "COPY_NOT_FOUND")
    assert err(await mesh.client.post(m + "/move", json={"from_device": "a:disk", "to_device": "a:dram"}))[1] in (
        "COPY_NOT_FOUND", "NO_SOURCE")
    assert err(await mesh.client.post(m + "/download", json={"source_url": "gopher://x", "target_device": "a:disk"})) == (
        400, "INVALID_REQUEST")
    r = await mesh.client.post(m + "/pin", json={"min": 1})
    assert r.status_code == 200 and r.json()["model_name"] == "acme/m", r.text
    r = await mesh.client.delete(m + "/pin")
    assert r.status_code == 200 and r.json()["replicas"] is None, r.text
    assert (await mesh.client.get(a.url + "/models/locations")).json()["model_name"] == "locations"
