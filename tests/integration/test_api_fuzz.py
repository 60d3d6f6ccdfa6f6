"""Hostile requests on every route of a live ``meshnode`` process: no 5xx, no death.

Two real processes (so that device names can name a live peer) with an API
token and a cluster secret.  Hypothesis builds requests for every route the
app has (the list is checked against the app's own URL map, so a new route
cannot be left out): path parameters from valid to hostile (``..``, encoded
slashes, control characters, 10 KB), query strings, and bodies from valid
JSON objects through wrong types, deep nesting and huge integers to raw bytes
that are not JSON.  The public routes get the API token; the peer routes
(actions, manifests) get a correctly signed request, so the fuzz reaches
their input checks.  Every answer is below 500, and every 4xx carries
``{"error": {"code", "message"}}``; after the run both processes are alive.
Sources are held hermetic: the hub endpoint is a dead local port and no
generated URL names a host outside.
"""

from __future__ import annotations

import json
import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meshnode.api.app import _public_app
from meshnode.config import add_start_arguments, config_from_args
from meshnode.peers import Recipient, sign_headers

from .test_process import NO_HUB, Proc, wait

TOKEN = "fuzz-token-" + "x" * 32
SECRET = "fuzz-secret-" + "y" * 32

pytestmark = pytest.mark.slow

# method, path template: every route of the app (test_the_route_list_is_complete checks it)
ROUTES = [
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/status"),
    ("GET", "/nodes"),
    ("GET", "/storage"),
    ("POST", "/models/{name}/copy"),
    ("POST", "/models/{name}/move"),
    ("POST", "/models/{name}/download"),
    ("GET", "/transfers"),
    ("GET", "/transfers/{tid}"),
    ("GET", "/mesh/v1/manifests/{mhash}"),
    ("POST", "/mesh/v1/actions"),
    ("GET", "/models"),
    ("GET", "/models/{name}/locations"),
    ("POST", "/models/{name}/locations/{device}"),
    ("DELETE", "/models/{name}/locations/{device}"),
    ("POST", "/models/{name}/register"),
    ("GET", "/models/{name}"),
    ("DELETE", "/models/{name}"),
    ("POST", "/models/{name}/pin"),
    ("DELETE", "/models/{name}/pin"),
    ("GET", "/v2/catalog/availability"),
    ("GET", "/v2/nodes"),
    ("GET", "/v2/catalog/models"),
    ("GET", "/v2/catalog/models/{name}"),
    ("POST", "/v2/catalog/models"),
    ("GET", "/metrics"),
    ("POST", "/jobs"),
    ("POST", "/jobs/from-yaml"),
    ("GET", "/jobs"),
    ("GET", "/jobs/{jid}"),
    ("GET", "/jobs/{jid}/status"),
    ("POST", "/jobs/{jid}/cancel"),
    ("GET", "/placement"),
    ("GET", "/mesh/v1/seen"),
    ("GET", "/services"),
    ("GET", "/models/{name}/services"),
    ("POST", "/models/{name}/services"),
    ("DELETE", "/models/{name}/services/{node}"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{name}"),
    ("POST", "/mesh/v1/infer/{port}/v1/{rest}"),
    ("DELETE", "/transfers/{tid}"),
    ("POST", "/models/{name}/serve"),
    ("DELETE", "/models/{name}/serve"),
    ("GET", "/models/{name}/serve/status"),
    ("POST", "/jobs/{jid}/create"),
    ("GET", "/bundles"),
    ("POST", "/bundles"),
    ("POST", "/ensure"),
    ("GET", "/leases"),
    ("DELETE", "/leases"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/"),
    ("GET", "/ui/{file}"),
]


def test_the_route_list_is_complete(tmp_path: Path) -> None:
    import argparse

    p = argparse.ArgumentParser()
    add_start_arguments(p)
    cfg = config_from_args(p.parse_args(["--node-id", "x", "--data-dir", str(tmp_path)]), env={})
    app = _public_app(types.SimpleNamespace(cfg=cfg))  # type: ignore[arg-type]
    found = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<model:name>", "{name}").replace("<device:device>", "{device}")
        path = path.replace("<int:port>", "{port}").replace("<path:rest>", "{rest}")
        for arg in ("tid", "mhash", "device", "jid", "node", "file"):
            path = path.replace(f"<{arg}>", "{" + arg + "}")
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                found.add((method, path))
    assert found == set(ROUTES)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    root = tmp_path_factory.mktemp("apifuzz")
    (root / "models").mkdir()
    (root / "models" / "w.bin").write_bytes(os.urandom(20_000))
    extra = ("--api-tokens", TOKEN, "--cluster-secret", SECRET, "--ingest-roots", str(root / "models"))
    a = Proc("fa", root, None, extra, env=NO_HUB).start()
    b = Proc("fb", root, a.address, extra, env=NO_HUB).start()
    auth = {"authorization": f"Bearer {TOKEN}"}
    wait(lambda: len(httpx.get(a.url + "/nodes", headers=auth, timeout=2).json()["nodes"]) == 2, what="2 nodes")
    httpx.post(a.url + "/models/acme/m/register", json={"model_type": "llm"}, headers=auth, timeout=5)
    yield [a, b]
    for p in (a, b):
        p.kill()


# -- strategies ---------------------------------------------------------------------------

names = st.one_of(
    st.sampled_from(["acme/m", "m", "gpt2", "nope", "acme/nope"]),
    st.sampled_from(["..", "a/../b", "%2F", "a%2Fb", "x" * 300, "a/b/c", "-x", ".hidden", "sp ace", "ü", "a\x00b"]),
    st.text(min_size=1, max_size=30),
)
devices = st.one_of(
    st.sampled_from(["fa:disk", "fb:dram", "fa:gpu0", "ghost:disk", "web", "fa:tape", "fa", ":disk", "fa:disk:x"]),
    st.text(min_size=1, max_size=20),
)
hexes = st.one_of(st.text("0123456789abcdef", min_size=1, max_size=40), st.text(min_size=1, max_size=40))
# URLs only from a list: random text could name a host on the internet.
urls = st.sampled_from([
    "file:///FUZZROOT/w.bin", "/FUZZROOT/w.bin", "file:///etc/shadow", "file:///no/such", "/etc/passwd", "hf://acme/m", "hf://x", "http://127.0.0.1:9/w.bin",
    "https://10.0.0.1/x", "http://[::1]:9/x", "gopher://x", "not a url", "", "file://remote/x", "http://", "hf://../..",
])
ints = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 2**63, 2**64]))
leaf = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False), st.text(max_size=20), urls, devices)
json_values = st.recursive(
    leaf, lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=10), kids, max_size=3)),
    max_leaves=12,
)
KNOWN_FIELDS = ["model_type", "source_url", "metadata", "from_device", "to_device", "keep_source", "priority",
                "source", "target_device", "revision", "allow_patterns", "ignore_patterns", "op", "model", "kind",
                "path", "manifest_hash", "options"]
objects = st.dictionaries(st.sampled_from(KNOWN_FIELDS), json_values, max_size=5)
metadata = st.fixed_dictionaries({}, optional={
    "description": st.one_of(st.text(max_size=50), ints), "tags": json_values,
    "requirements": st.dictionaries(st.sampled_from(["min_vram", "min_memory", "gpu_arch", "x"]), json_values, max_size=3),
    "files": json_values, "file_count": ints, "revision": json_values,
})


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


# Bodies of the right shape with hostile values, so requests also get past the shape checks.
plausible = st.one_of(
    st.fixed_dictionaries({"source_url": urls, "target_device": devices}),
    st.fixed_dictionaries({"to_device": devices}, optional={"from_device": devices, "keep_source": json_values}),
    st.fixed_dictionaries({"model_type": st.text(max_size=70)}, optional={"metadata": metadata, "source_url": urls}),
    st.fixed_dictionaries({"device": devices}, optional={
        "devices": st.lists(devices, max_size=3), "port": ints, "config": json_values,
        "engine": st.sampled_from(["vllm", "llama.cpp", "command", "x"])}),  # a serve (no engine runs here)
    st.fixed_dictionaries({"model": names}, optional={"prompt": json_values, "messages": json_values,
                                                      "input": json_values, "stream": json_values}),  # inference
    st.fixed_dictionaries({"op": st.sampled_from(["transfer", "ingest", "fetch", "delete_copy", "serve", "stop_serve",
                                                  "x"]),
                           "model": names, "kind": st.sampled_from(["disk", "dram", "gpu0", "x"])},
                          optional={"path": urls, "source_url": urls, "source": devices, "manifest_hash": hexes,
                                    "keep_source": json_values, "options": json_values, "gpus": json_values,
                                    "port": ints, "config": json_values, "node": st.sampled_from(["fa", "fb"])}),
)

# Pipelines with hostile values; health checks only against a dead local port (hermetic).
steps = st.fixed_dictionaries(
    {"action_id": st.one_of(st.sampled_from(["a", "b", "c"]), st.text(max_size=10)),
     "action_type": st.sampled_from(["download", "move", "copy", "serve", "stop_serve", "delete", "health_check", "x"])},
    optional={"model_name": names, "devices": st.lists(devices, max_size=3), "dependencies": st.lists(
        st.sampled_from(["a", "b", "c", "zz"]), max_size=3), "source_url": urls, "port": ints,
        "target_url": st.just("http://127.0.0.1:9/health"), "keep_source": json_values, "config": json_values,
        "retries": ints, "backoff_s": json_values, "timeout_s": json_values},
)
pipelines = st.fixed_dictionaries({"name": st.one_of(st.text(max_size=20), ints), "actions": st.lists(steps, max_size=4)},
                                  optional={"fail_fast": json_values, "priority": ints, "description": json_values})

bodies = st.one_of(
    plausible.map(lambda o: json.dumps(o).encode()),
    pipelines.map(lambda o: json.dumps(o).encode()),
    objects.map(lambda o: json.dumps(o).encode()),
    st.fixed_dictionaries({"metadata": metadata}).map(lambda o: json.dumps(o).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"", b"{", b"\xff\xfe", b"null", _deep(40), _deep(3000), b'{"a": ' + b"9" * 5000 + b"}"]),
    st.binary(max_size=100),
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    method, template = draw(st.sampled_from(ROUTES))
    path = template
    nodes = st.one_of(st.sampled_from(["fa", "fb", "ghost"]), st.text(min_size=1, max_size=20))
    for field, strategy in (("{name}", names), ("{device}", devices), ("{tid}", hexes), ("{mhash}", hexes),
                            ("{jid}", hexes), ("{node}", nodes),
                            ("{port}", st.sampled_from(["8000", "1", "65535", "0", "99999"])),
                            ("{rest}", st.sampled_from(["completions", "chat/completions", "embeddings", "x", "../x"])),
                            ("{file}", st.sampled_from(["app.js", "style.css", "../x", "index.html", "none"]))):
        if field in path:
            value = draw(strategy)
            # Names keep their one '/' (as clients send them); everything else is encoded.
            path = path.replace(field, quote(value, safe="/" if field == "{name}" else ""))
    query = draw(st.one_of(st.just(""), st.sampled_from(["?purge=true", "?purge=1", "?purge=%00", "?x=" + "y" * 300,
                                                         "?model=acme/m&device=gpu", "?model=acme/m&device=tape",
                                                         "?model=..", "?limit=0", "?limit=x&offset=-1"])))
    body = draw(bodies) if method != "GET" or draw(st.integers(0, 9)) == 0 else b""
    return method, path + query, body


FUZZ = settings(
    max_examples=800,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


def test_fuzzed_requests_on_every_route_get_no_5xx(nodes: list[Proc]) -> None:
    a = nodes[0]
    statuses: dict[int, int] = {}
    routes_hit: set[str] = set()
    to_a = Recipient("fa", httpx.get(a.url + "/health", timeout=10).json()["generation"])  # peer requests name a
    with httpx.Client(timeout=30) as client:

        @FUZZ
        @given(requests())
        # Requests the node accepts (202), whatever the draws: the fuzzing also runs past the checks.
        @example(("POST", "/models/acme/m/download",
                  json.dumps({"source_url": "file:///FUZZROOT/w.bin", "target_device": "fa:disk"}).encode()))
        @example(("POST", "/models/acme/m/copy", json.dumps({"to_device": "fb:dram"}).encode()))
        def one(req: tuple[str, str, bytes]) -> None:
            method, target, body = req
            body = body.replace(b"/FUZZROOT", str(a.root / "models").encode())  # a file it may ingest
            if target.startswith("/mesh/"):
                headers: dict[str, Any] = sign_headers(SECRET, "fb", method, target, body, to=to_a)
            else:
                headers = {"authorization": f"Bearer {TOKEN}"}
            headers["content-type"] = "application/json"
            r = client.request(method, a.url + target, content=body, headers=headers)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            routes_hit.add(f"{method} {target.split('?')[0].split('/')[1]}")
            # 503 NO_HEALTHY_SERVICE is the one 5xx the API means: a model nobody serves (none runs here).
            unserved = r.status_code == 503 and target.startswith("/v1/") and "NO_HEALTHY_SERVICE" in r.text
            assert r.status_code < 500 or unserved, (method, target, body[:200], r.status_code, r.text[:300])
            if r.status_code >= 400:
                err = r.json()["error"]
                assert isinstance(err["code"], str) and isinstance(err["message"], str), r.text

        one()
    for p in nodes:
        assert p.p is not None and p.p.poll() is None, f"{p.node_id} died:\n{p.log.read_text()[-3000:]}"
        assert httpx.get(p.url + "/health", timeout=5).status_code == 200
    assert statuses.get(202, 0) > 0 and statuses.get(200, 0) > 50 and statuses.get(400, 0) > 100, statuses
    assert "Traceback" not in a.log.read_text(), a.log.read_text()[-3000:]
    assert len(routes_hit) >= 12, routes_hit
