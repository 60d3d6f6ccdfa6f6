"""Where a health check may look (``protocol.healthcheck``): gswarm's node
names, the mesh's own hosts and services, and every other URL read strictly."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.healthcheck import (
    UNREACHABLE,
    URL_MAX,
    HealthTarget,
    TargetRefused,
    health_target,
    parse_target,
    shown_url,
    unreachable_message,
)
from protocol.pipeline import InvalidPipeline, parse_pipeline

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None)
MEMBERS = {"node1": "127.0.0.1:7070", "gpu2": "10.0.0.2:7070", "gpu3": "[FD00:0::3]:7070",
           "edge": "edge.cluster.internal:7070"}


def test_a_node_id_is_the_host_that_member_advertises() -> None:
    """gswarm writes http://gpu2:8080/health: the host is replaced, port, path and query kept."""
    t = health_target("http://gpu2:8080/health?full=1", MEMBERS)
    assert t == HealthTarget("http", "10.0.0.2", 8080, "/health?full=1", in_mesh=True, node_id="gpu2")
    assert t.url == "http://10.0.0.2:8080/health?full=1" and t.shown == "http://10.0.0.2:8080/health"
    v6 = health_target("https://gpu3/ready", MEMBERS)
    assert v6.url == "https://[fd00::3]/ready" and v6.in_mesh and v6.node_id == "gpu3"
    assert health_target("http://edge:9000/", MEMBERS).url == "http://edge.cluster.internal:9000/"


def test_a_members_host_is_the_meshs_own_on_any_port() -> None:
    for url in ("http://10.0.0.2:22/", "http://127.0.0.1:9/health", "http://[fd00::3]:81/", "http://[FD00:0:0::3]/",
                "http://EDGE.cluster.internal:1/"):
        t = health_target(url, MEMBERS)
        assert t.in_mesh and t.node_id is None, url


def test_a_service_is_the_meshs_own_at_its_port_and_on_its_own_nodes_loopback() -> None:
    members = {"a": "192.0.2.10:7070", "b": "192.0.2.11:7070"}
    services = [("a", 8101), ("b", 8102)]
    assert health_target("http://127.0.0.1:8101/health", members, services, here="a").in_mesh
    assert health_target("http://localhost:8101/health", members, services, here="a").in_mesh
    assert health_target("http://[::1]:8101/health", members, services, here="a").in_mesh
    # Loopback of this node is not where b's engine answers; nor is another port.
    assert not health_target("http://127.0.0.1:8102/health", members, services, here="a").in_mesh
    assert not health_target("http://127.0.0.1:8100/health", members, services, here="a").in_mesh
    assert not health_target("http://127.0.0.1:8101/health", members, services, here=None).in_mesh


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.3:8080/", "http://localhost:8080/",
    "http://127.1/", "http://2130706433/", "http://[::ffff:127.0.0.1]/", "http://[::1]/", "https://example.com/h",
    "http://GPU2:8080/health",  # node ids are matched as written
])
def test_every_other_host_is_outside(url: str) -> None:
    """Outside hosts go to the executor's address rule (public only unless the operator allows)."""
    t = health_target(url, MEMBERS, [("node1", 8000)], here="gpu2")
    assert not t.in_mesh and t.node_id is None


@pytest.mark.parametrize(("url", "why"), [
    ("http://user:pass@10.0.0.2/", "user info"), ("http://user@127.0.0.1/", "user info"),
    ("http://:@gpu2:8080/", "user info"), ("http://gpu2@169.254.169.254/", "user info"),
    ("ftp://gpu2/", "http(s)"), ("file:///etc/passwd", "http(s)"), ("gopher://x/", "http(s)"),
    ("//x/", "http(s)"), ("http:/x", "http(s)"), ("x", "http(s)"), ("", "http(s)"),
    ("http://x:0/", "port"), ("http://x:65536/", "port"), ("http://x:/", "port"), ("http://x:8o/", "port"),
    ("http://[fe80::1%25eth0]/", "IPv6"), ("http://[fe80::1%eth0]/", "IPv6"), ("http://[127.0.0.1]/", "URL"),
    ("http://[::1/", "URL"), ("http:///x", "host"), ("http://%31%32%37.0.0.1/", "host"),
    ("http://a..b/", "host"), ("http://x\\@169.254.169.254/", "ASCII"), ("http://x /", "ASCII"),
    ("http://x/\n", "ASCII"), ("http://x/\u00e9", "ASCII"), ("http://x/" + "a" * URL_MAX, "longer"),
])
def test_what_is_refused_before_anything_is_looked_up(url: str, why: str) -> None:
    with pytest.raises(TargetRefused) as e:
        health_target(url, MEMBERS)
    assert why in str(e.value), (url, str(e.value))


def test_a_node_that_advertises_every_address_is_not_a_host() -> None:
    members = {"wild": "0.0.0.0:7070", "wild6": "[::]:7070"}
    assert not health_target("http://0.0.0.0:22/", members).in_mesh
    assert not health_target("http://[::]:22/", members).in_mesh
    with pytest.raises(TargetRefused):
        health_target("http://wild:8080/", members)


def test_not_a_string_is_refused() -> None:
    for bad in (None, 1, b"http://x/", ["http://x/"]):
        with pytest.raises(TargetRefused):
            parse_target(bad)


def test_the_unreachable_message_is_one_for_every_cause() -> None:
    m = unreachable_message("http://10.0.0.2:8080/health", "node1")
    assert m == f"health check of http://10.0.0.2:8080/health from node1: {UNREACHABLE}"
    assert "HTTP " not in m and "Error" not in m


def test_a_shown_url_never_carries_a_secret() -> None:
    assert shown_url("http://user:hunter2@10.0.0.2:8080/h?sig=s3cret") == "http://10.0.0.2:8080/h"
    assert shown_url("http://10.0.0.2:8080/h?sig=s3cret") == "http://10.0.0.2:8080/h"
    assert shown_url(None) == "<not a URL>"
    assert "\n" not in shown_url("http://x/\nInjected: 1")


def test_a_pipeline_refuses_a_target_url_with_user_info_at_submission() -> None:
    def doc(url: str) -> dict[str, object]:
        return {"name": "p", "actions": [{"action_id": "h", "action_type": "health_check", "target_url": url}]}

    with pytest.raises(InvalidPipeline) as e:
        parse_pipeline(doc("http://admin:pw@gpu2:8080/health"))
    assert [(p.action_id, p.field) for p in e.value.problems] == [("h", "target_url")]
    assert "user info" in str(e.value) and "pw" not in str(e.value)
    assert parse_pipeline(doc("http://gpu2:8080/health")).actions[0].target_url == "http://gpu2:8080/health"


# -- any text -----------------------------------------------------------------------------------

HOSTS = st.one_of(
    st.sampled_from(["gpu2", "node1", "edge", "GPU2", "localhost", "127.0.0.1", "10.0.0.2", "[::1]", "[fd00::3]",
                     "169.254.169.254", "example.com", "a..b", "[fe80::1%25x]", "x@y", "", "%32"]),
    st.text(alphabet="abcAB019.-_:[]@%\\ /", max_size=20),
)
URLS = st.one_of(
    st.builds(lambda s, u, h, p, path: f"{s}://{u}{h}{p}{path}",
              st.sampled_from(["http", "https", "HTTP", "ftp", "file", ""]),
              st.sampled_from(["", "user:pw@", "@", "gpu2@"]), HOSTS,
              st.sampled_from(["", ":8080", ":0", ":99999", ":", ":x"]),
              st.text(alphabet="/abc?=&#%@:\\ \n", max_size=20)),
    st.text(max_size=60),
)


@SETTINGS
@given(URLS, st.sampled_from([None, "node1", "gpu2"]))
def test_any_text_is_refused_or_read_alike_by_the_http_client(url: str, here: str | None) -> None:
    """Whatever the text, the answer is a refusal or a target whose URL (rebuilt
    from the parts judged) the HTTP client reads the same: same host, port and
    scheme, no user info; the mesh's own only for a member's host or a service."""
    try:
        t = health_target(url, MEMBERS, [("node1", 8000), ("gpu2", 8001)], here=here)
    except TargetRefused:
        return
    u = httpx.URL(t.url)
    assert (u.scheme, u.host, u.port or {"http": 80, "https": 443}[u.scheme]) == (t.scheme, t.host, t.port)
    assert u.userinfo == b"" and "@" not in u.netloc.decode()
    assert parse_target(t.url).url == t.url  # read again, the same
    member_hosts = {"127.0.0.1", "10.0.0.2", "fd00::3", "edge.cluster.internal"}
    if t.in_mesh:
        assert t.host in member_hosts or (here == "node1" and t.port == 8000 and t.host in ("localhost", "::1")), t
    else:
        assert t.host not in member_hosts and t.node_id is None
