"""/metrics after real work, read with Prometheus's own parser: a 50 MB copy
between two nodes shows in bytes, chunks and transfers; the gossip, the
request latency by route, and every labelled family with its zeros."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from .conftest import Mesh, wait_transfer
from .test_transfer import ingest, make_model, until_copies

SIZE = 50_000_000

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(mesh: Mesh, url: str) -> tuple[Samples, dict[str, str]]:
    r = await mesh.client.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
    samples: Samples = {}
    types: dict[str, str] = {}
    for fam in text_string_to_metric_families(r.text):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


async def test_a_50_mb_copy_shows_in_the_metrics_of_both_nodes(mesh: Mesh, tmp_path: Path) -> None:
    src = make_model(tmp_path, size=SIZE)
    a = await mesh.start("a")
    b = await mesh.start("b", join=[a])
    await ingest(mesh, a, "org/big", src)
    await until_copies(mesh, b.url, "org/big", 1)
    r = await mesh.client.post(b.url + "/models/org/big/copy", json={"to_device": "b:disk"})
    assert r.status_code == 202, r.text
    t = await wait_transfer(mesh, b.url, r.json()["transfer_id"])
    assert t["status"] == "done" and t["sources"] == ["a"], t

    sa, types = await scrape(mesh, a.url)
    sb, _ = await scrape(mesh, b.url)
    size = t["bytes_total"]
    assert size > SIZE
    # The copy, as each side saw it.
    assert size <= sb[("meshnode_data_received_bytes_total", ())] <= size * 1.1
    assert sb[("meshnode_chunks_verified_total", ())] == t["chunks_total"] > 1
    assert size <= sa[("meshnode_data_sent_bytes_total", ())] <= size * 1.1
    for name in ("bad_chunks", "peer_bans", "chunk_stalls"):
        assert sb[(f"meshnode_{name}_total", ())] == 0  # listed, and zero
    assert sb[("meshnode_transfers", (("state", "done"),))] == 1
    assert sb[("meshnode_transfers", (("state", "failed"),))] == 0
    # Nothing came from outside the mesh (a local ingest is no fetch).
    assert sa[("meshnode_source_fetched_bytes_total", (("source", "hf"),))] == 0
    assert sa[("meshnode_source_fetched_bytes_total", (("source", "http"),))] == 0
    # Storage per tier: b's disk now holds the copy.
    assert sb[("meshnode_storage_used_bytes", (("tier", "disk"),))] >= size
    assert sb[("meshnode_storage_free_bytes", (("tier", "dram"),))] > 0
    # Gossip and members.
    for s in (sa, sb):
        assert s[("meshnode_gossip_rounds_total", ())] > 0
        assert s[("meshnode_gossip_sent_bytes_total", ())] > 0 and s[("meshnode_gossip_received_bytes_total", ())] > 0
        assert s[("meshnode_members", (("state", "alive"),))] == 2
        assert s[("meshnode_members", (("state", "dead"),))] == 0
    # Request latency by route: labelled by the route's rule, not the path asked.
    copy = (("method", "POST"), ("route", "/models/<model:name>/copy"))
    assert sb[("meshnode_http_request_duration_seconds_count", copy)] == 1
    assert sb[("meshnode_http_request_duration_seconds_bucket", (("le", "+Inf"), *copy))] == 1
    assert sb[("meshnode_http_request_duration_seconds_sum", copy)] > 0
    routes = {dict(labels).get("route") for (name, labels) in sb if name.startswith("meshnode_http_request")}
    assert not any(r and "org/big" in r for r in routes), routes
    # Names by Prometheus's conventions: counters end in _total, units are base units.
    assert types["meshnode_data_received_bytes"] == "counter"
    assert types["meshnode_http_request_duration_seconds"] == "histogram"
    assert ("process_resident_memory_bytes", ()) in sa and ("meshnode_build_info", (("version", "0.1.0"),)) in sa


async def test_lists_page_with_a_bound(mesh: Mesh) -> None:
    """Every list pages (``limit`` 1 to 1000, ``offset``) in a stable order,
    and says where the page is; a bad page is a 400 in the error shape."""
    a = await mesh.start("a")
    names = [f"org/m{i}" for i in range(5)]
    for n in names:
        r = await mesh.client.post(a.url + f"/models/{n}/register", json={"model_type": "llm"})
        assert r.status_code == 201, r.text
    r = await mesh.client.get(a.url + "/models", params={"limit": 2, "offset": 1})
    body = r.json()
    assert [m["model_name"] for m in body["models"]] == names[1:3]
    assert (body["total_count"], body["limit"], body["offset"]) == (5, 2, 1)
    assert len((await mesh.client.get(a.url + "/models")).json()["models"]) == 5  # default: up to 1000
    for path in ("/models", "/nodes", "/transfers", "/services", "/jobs", "/models/org/m0/services"):
        for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"limit": "x"}):
            r = await mesh.client.get(a.url + path, params=bad)
            assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_REQUEST", (path, bad, r.text)
        assert (await mesh.client.get(a.url + path, params={"limit": 1})).json()["limit"] == 1
