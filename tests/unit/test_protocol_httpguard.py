"""The API's edge rules (``protocol.httpguard``): which Host a node answers,
which writes it takes from a browser, and how fast one client writes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.httpguard import (
    HostPolicy,
    WriteLimiter,
    check_request,
    content_type_allowed,
    host_allowed,
    limit_key,
    origin_allowed,
    split_host,
)
from protocol.registry import (
    METADATA_BYTES_MAX,
    InvalidInput,
    fit_metadata,
    metadata_bytes,
    parse_registration,
)

HOME = HostPolicy()  # a node without tokens on loopback: no names of its own


def refusal(method: str, path: str, *, host: str | None = "127.0.0.1:7420", origin: str | None = None,
            content_type: str | None = None, policy: HostPolicy = HOME, scheme: str = "http") -> str | None:
    r = check_request(method, path, host=host, origin=origin, content_type=content_type, scheme=scheme, policy=policy)
    return None if r is None else r.code


# -- Host ---------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "localhost:7420", "LOCALHOST.:1", "127.0.0.1", "127.0.0.1:7420",
                                  "127.9.8.7:80", "[::1]", "[::1]:7420", "10.1.2.3:7420", "[fd00::1]:1"])
def test_loopback_names_and_ip_literals_are_answered(host: str) -> None:
    assert host_allowed(host, HOME)


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:7420", "localhost.attacker.example",
                                  "127.0.0.1.nip.io:7420", "", "::1", "[::1", "[127.0.0.1]", "a b", "a/b", "x:",
                                  "x:99999", "x:0", "x:-1", "x@127.0.0.1", "\u0131ocalhost", "x" * 2000])
def test_other_names_are_not(host: str) -> None:
    assert not host_allowed(host, HOME)


def test_the_operator_names_more_and_tokens_turn_the_rule_off() -> None:
    policy = HostPolicy.of(["Mesh.Example.", "node1:7420", "[fd00::1]:9"])
    assert policy.names == frozenset({"mesh.example", "node1", "fd00::1"})
    assert host_allowed("mesh.example:443", policy) and host_allowed("NODE1", policy)
    assert not host_allowed("attacker.example", policy)
    assert host_allowed("attacker.example", HostPolicy(enforce=False))
    assert host_allowed(None, HOME)  # no Host at all: no browser sent it


@settings(max_examples=300)
@given(st.text(max_size=60))
def test_no_host_header_crashes_the_parser(text: str) -> None:
    hp = split_host(text)
    if hp is not None:
        name, port = hp
        assert name == name.lower() and not name.endswith(".") and (port is None or 0 < port < 65536)
    host_allowed(text, HOME)
    origin_allowed(text, "localhost", "http")
    origin_allowed("http://" + text, text, "http")


@given(st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){1,3}", fullmatch=True),
       st.one_of(st.none(), st.integers(1, 65535)))
def test_a_name_is_answered_only_when_listed(name: str, port: int | None) -> None:
    host = name if port is None else f"{name}:{port}"
    assert host_allowed(host, HostPolicy.of([name])) and not host_allowed(host, HOME)


# -- Origin and body types --------------------------------------------------------------------


@pytest.mark.parametrize(("origin", "host", "scheme", "ok"), [
    ("http://127.0.0.1:7420", "127.0.0.1:7420", "http", True),
    ("http://localhost:7420", "LOCALHOST:7420", "http", True),
    ("http://localhost", "localhost:80", "http", True),  # the scheme's default port
    ("https://mesh.example", "mesh.example:443", "https", True),
    ("http://evil.example", "127.0.0.1:7420", "http", False),
    ("http://127.0.0.1:7421", "127.0.0.1:7420", "http", False),  # another port is another origin
    ("https://127.0.0.1:7420", "127.0.0.1:7420", "http", False),
    ("null", "127.0.0.1:7420", "http", False),
    ("http://127.0.0.1:7420/", "127.0.0.1:7420", "http", False),
    ("file://", "127.0.0.1:7420", "http", False),
    ("http://127.0.0.1:7420", None, "http", False),
])
def test_only_the_nodes_own_origin_is_same_origin(origin: str, host: str | None, scheme: str, ok: bool) -> None:
    assert origin_allowed(origin, host, scheme) is ok


BROWSER_TYPES = ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x"]


@pytest.mark.parametrize("ctype", BROWSER_TYPES)
@pytest.mark.parametrize("path", ["/models/m/register", "/models/m/download", "/models/m/services", "/jobs",
                                  "/jobs/j1/cancel", "/v2/catalog/models", "/models/m"])
def test_a_cross_site_form_is_refused_with_or_without_origin(path: str, ctype: str) -> None:
    assert refusal("POST", path, origin="http://evil.example", content_type=ctype) == "CROSS_ORIGIN"
    assert refusal("POST", path, content_type=ctype) == "UNSUPPORTED_MEDIA_TYPE"  # a browser without Origin
    assert refusal("POST", path, origin="http://evil.example", content_type="application/json") == "CROSS_ORIGIN"


def test_what_the_cli_scripts_and_the_dashboard_send_passes() -> None:
    assert refusal("POST", "/models/m/register", content_type="application/json") is None
    assert refusal("POST", "/models/m/register", content_type="Application/JSON; charset=utf-8") is None
    assert refusal("POST", "/jobs/from-yaml", content_type="application/yaml") is None
    assert refusal("POST", "/jobs/from-yaml", content_type="multipart/form-data; boundary=b") is None
    assert refusal("POST", "/jobs/j1/cancel") is None  # no body, no type
    assert refusal("DELETE", "/models/m") is None
    assert refusal("POST", "/models/m/register", origin="http://127.0.0.1:7420", content_type="application/json") is None
    assert refusal("GET", "/models", origin="http://evil.example") is None  # a read: the browser hides the answer
    assert refusal("GET", "/ui/app.js", host="localhost:7420") is None


def test_health_and_peer_routes_answer_any_host() -> None:
    for path in ("/health", "/ready"):
        assert refusal("GET", path, host="10.0.0.7:7420") is None
        assert refusal("GET", path, host="pod.attacker.example") is None
    assert refusal("GET", "/status", host="attacker.example") == "HOST_NOT_ALLOWED"
    assert refusal("POST", "/mesh/v1/actions", host="attacker.example", origin="http://x", content_type="text/plain") is None


def test_the_host_rule_comes_first_and_a_token_node_skips_it() -> None:
    assert refusal("POST", "/models/m/register", host="attacker.example:7420", origin="http://attacker.example:7420",
                   content_type="application/json") == "HOST_NOT_ALLOWED"
    tokens = HostPolicy(enforce=False)
    assert refusal("GET", "/status", host="meshnode.svc.cluster.local", policy=tokens) is None
    assert refusal("POST", "/models/m/register", host="x.example", origin="http://evil.example",
                   content_type="application/json", policy=tokens) == "CROSS_ORIGIN"


@given(st.sampled_from(["POST", "PUT", "PATCH", "DELETE"]), st.text(max_size=40), st.text(max_size=40))
def test_a_write_from_a_foreign_origin_never_passes(method: str, origin_host: str, ctype: str) -> None:
    origin = "http://" + origin_host
    hp = split_host(origin_host)
    if hp is not None and hp[0] == "127.0.0.1" and hp[1] in (None, 80):
        return  # that is the node's own origin (port 80)
    r = refusal(method, "/models/m/register", host="127.0.0.1", origin=origin, content_type=ctype)
    assert r in ("CROSS_ORIGIN", "HOST_NOT_ALLOWED")


def test_content_types() -> None:
    json_only = frozenset({"application/json"})
    assert content_type_allowed(None, json_only) and content_type_allowed("", json_only)
    assert content_type_allowed("application/json;charset=utf-8", json_only)
    assert not content_type_allowed("application/jsonx", json_only)
    assert not content_type_allowed("text/json", json_only)


# -- the write rate ---------------------------------------------------------------------------


def test_a_key_is_a_hash_never_the_token() -> None:
    token = "secret-token-" + "z" * 30
    key = limit_key(token, "127.0.0.1")
    assert token not in key and "secret" not in key and key.startswith("token:")
    assert key == limit_key(token, "10.0.0.9") != limit_key(token + "x", "127.0.0.1")
    assert limit_key(None, "127.0.0.1") == "addr:127.0.0.1" != limit_key(None, "127.0.0.2")


def test_a_burst_then_the_rate() -> None:
    lim = WriteLimiter(5, 50)
    assert [lim.take("k", 0.0) for _ in range(50)] == [0.0] * 50
    wait = lim.take("k", 0.0)
    assert wait == pytest.approx(0.2)
    assert lim.take("other", 0.0) == 0.0  # keys are apart
    assert lim.take("k", 0.1) > 0  # still early
    assert lim.take("k", 0.2) == 0.0  # one write a fifth of a second
    assert lim.take("k", 0.2) > 0
    assert lim.take("k", 100.0) == 0.0  # refilled, up to the burst
    assert lim.refused == 3


@settings(max_examples=200)
@given(st.lists(st.tuples(st.floats(0, 5), st.integers(0, 3)), max_size=200), st.floats(0.5, 100), st.integers(1, 20))
def test_never_more_than_burst_plus_rate_times_time(steps: list[tuple[float, int]], rate: float, burst: int) -> None:
    lim = WriteLimiter(rate, burst, keys_max=2)
    now = 0.0
    allowed: dict[int, int] = {}
    for dt, key in steps:
        now += dt
        if lim.take(str(key), now) == 0.0:
            allowed[key] = allowed.get(key, 0) + 1
        assert len(lim) <= 2  # bounded, whatever the keys
    # A key evicted while not full may start over: the bound holds per life of a bucket,
    # so check it only when no key was ever evicted (at most 2 keys used).
    if len({k for _, k in steps}) <= 2:
        for n in allowed.values():
            assert n <= burst + rate * now + 1e-6


def test_idle_keys_are_evicted_first() -> None:
    lim = WriteLimiter(1, 2, keys_max=3)
    lim.take("busy", 0.0)
    lim.take("busy", 0.0)  # empty
    lim.take("idle1", 0.0)
    lim.take("idle2", 0.0)
    assert lim.take("new", 5.0) == 0.0  # idle1 and idle2 are full again by now: they go, not busy
    assert len(lim) <= 3
    lim2 = WriteLimiter(1, 2, keys_max=2)
    lim2.take("a", 0.0)
    lim2.take("a", 0.0)
    lim2.take("b", 0.0)
    lim2.take("b", 0.0)
    lim2.take("c", 0.1)  # none full: the least recently used goes
    assert len(lim2) == 2 and lim2.take("b", 0.1) > 0


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (float("nan"), 1), (float("inf"), 1), (1, 0.5)])
def test_a_limiter_needs_a_rate(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        WriteLimiter(rate, burst)


# -- the size of a registration ---------------------------------------------------------------


def _files_of(total_bytes: int) -> list[str]:
    """File names whose metadata ({"files": [...]}) is about ``total_bytes`` of JSON."""
    n = total_bytes // 1000
    return [f"dir/{i:04d}-" + "f" * 986 for i in range(n)]


def test_metadata_over_16_kib_is_too_large() -> None:
    ok = {"metadata": {"files": _files_of(15 * 1024)}}
    assert 14 * 1024 < metadata_bytes(ok["metadata"]) <= METADATA_BYTES_MAX
    assert parse_registration(ok).metadata["files"] == ok["metadata"]["files"]
    big = {"metadata": {"files": _files_of(17 * 1024)}}
    with pytest.raises(InvalidInput) as e:
        parse_registration(big)
    assert e.value.code == "TOO_LARGE" and "16 KiB" in e.value.message
    # Counted as UTF-8 bytes, not characters.
    wide = {"metadata": {"description": "\u00e9" * 4000, "tags": ["\u20ac" * 60] * 64}}
    with pytest.raises(InvalidInput):
        parse_registration(wide)


@given(st.lists(st.text(st.characters(codec="utf-8"), min_size=1, max_size=1024), max_size=200))
def test_a_nodes_own_registration_is_fitted(files: list[str]) -> None:
    meta = fit_metadata({"files": files, "file_count": len(files), "description": "x" * 4000})
    assert metadata_bytes(meta) <= METADATA_BYTES_MAX
    assert meta["file_count"] == len(files) and meta.get("files", []) == files[: len(meta.get("files", []))]
    parse_registration({"metadata": meta})
    assert json.loads(json.dumps(meta)) == meta
