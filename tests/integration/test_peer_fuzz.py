"""Hostile peer messages against live ``meshnode`` processes: zero deaths, zero 5xx.

Three real processes share a cluster secret.  Hypothesis builds messages of
every type the peer route takes, field by field: well-formed envelopes whose
fields hold hostile values (addresses no socket can take, generations and
incarnations at the limits, the real nodes' own ids with states that would
evict them, huge and empty strings), and raw msgpack trees with any value in
any slot.  Each is signed as a peer would sign it and POSTed to one node.
Every answer must be 204 (taken) or 400 (refused, with an error body); after
the run every process is alive and answers ``/health``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnode.peers import sign_headers
from protocol.wire import PROTOCOL_VERSION, MsgType

from .test_process import Proc, wait

SECRET = "fuzz-" + "k" * 40
CLUSTER = "meshnode"
PEER_PATH = "/mesh/v1/msg"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trio_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    root = tmp_path_factory.mktemp("fuzz")
    extra = ("--cluster-secret", SECRET)
    a = Proc("fa", root, None, extra).start()
    b = Proc("fb", root, a.address, extra).start()
    c = Proc("fc", root, a.address, extra).start()
    procs = [a, b, c]
    wait(lambda: all(len(httpx.get(p.url + "/nodes", timeout=2).json()["nodes"]) == 3 for p in procs), what="3 nodes")
    yield procs
    for p in procs:
        if p.p is not None and p.p.poll() is None:
            p.p.kill()
            p.p.wait()


# -- strategies: every field of every message type ----------------------------------------

BAD_ADDRESSES = ["999.1.1.1:80", "host:abc", "h:0", "h:65536", "[::1]", "", "a b:1", "x" * 300, "[fe80::1%eth0]:80"]
GOOD_ADDRESSES = ["192.0.2.7:7420", "unreachable.invalid:7420", "[2001:db8::1]:7420"]
REAL_IDS = ["fa", "fb", "fc"]

ints = st.one_of(
    st.sampled_from([0, 1, -1, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]),
    st.integers(0, 2**40),
    st.integers(1_700_000_000_000, 1_900_000_000_000),  # generations are wall-clock ms
)
junk = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True), st.binary(max_size=20), st.text(max_size=20),
    st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**64 - 1), max_size=2),
)
def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Nine in ten from ``good``, else from ``bad``, so that most messages get
    deep into the node and every field is sometimes wrong.  (``one_of(good,
    good, bad)`` would not do: Hypothesis merges equal branches.)"""
    return st.integers(0, 9).flatmap(lambda i: bad if i == 9 else good)


def maybe(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The field's own kind of value, or now and then anything at all."""
    return mostly(s, junk)


node_ids = mostly(st.sampled_from([*REAL_IDS, "ghost"]), st.one_of(st.sampled_from(["", "x" * 65, "a/../b"]), st.text(max_size=10)))
addresses = mostly(st.sampled_from(GOOD_ADDRESSES), st.one_of(st.sampled_from(BAD_ADDRESSES), st.text(max_size=30)))
states = mostly(st.integers(0, 3), st.sampled_from([4, -1, 255]))


records = st.tuples(maybe(node_ids), maybe(addresses), maybe(ints), maybe(ints), maybe(states)).map(list)
updates = st.lists(st.tuples(maybe(records), st.one_of(st.none(), maybe(node_ids))).map(list), max_size=4)
digests = st.dictionaries(node_ids, st.lists(maybe(ints), min_size=3, max_size=3), max_size=4)
entries = st.lists(
    st.tuples(maybe(st.text(max_size=40)), maybe(ints), junk, maybe(st.booleans())).map(list), max_size=4
)
deltas = st.lists(
    st.tuples(maybe(node_ids), maybe(ints), maybe(ints), maybe(ints), maybe(ints), maybe(st.booleans()), maybe(entries)).map(list),
    max_size=3,
)
member_lists = st.one_of(st.none(), st.lists(maybe(records), max_size=4))

BODIES: dict[MsgType, st.SearchStrategy[Any]] = {
    MsgType.PING: st.tuples(maybe(ints), maybe(node_ids), maybe(updates)).map(list),
    MsgType.ACK: st.tuples(maybe(ints), maybe(node_ids), maybe(updates)).map(list),
    MsgType.PING_REQ: st.tuples(maybe(ints), maybe(node_ids), maybe(addresses), maybe(updates)).map(list),
    MsgType.GOSSIP: st.tuples(maybe(updates)).map(list),
    MsgType.SYNC: st.tuples(maybe(ints), maybe(ints)).map(list),
    MsgType.SYNC_DIGEST: st.tuples(st.one_of(st.none(), maybe(digests)), maybe(member_lists)).map(list),
    MsgType.SYNC_DELTA: st.tuples(maybe(deltas), st.one_of(st.none(), maybe(digests)), maybe(member_lists)).map(list),
}


@st.composite
def envelopes(draw: st.DrawFn) -> tuple[str, bytes]:
    """(the node id to sign as, the message): signed as its own sender when
    that is a usable id, so most messages get past the credential check."""
    t = draw(st.sampled_from(list(MsgType)))
    raw = [
        draw(maybe(st.just(PROTOCOL_VERSION))),
        draw(maybe(st.just(CLUSTER))),
        draw(maybe(node_ids)),
        draw(maybe(ints)),
        draw(maybe(addresses)),
        draw(maybe(st.just(int(t)))),
        draw(maybe(BODIES[t])),
    ]
    if draw(st.integers(0, 19)) == 19:  # sometimes a field too many or too few
        raw = raw[:-1] if draw(st.booleans()) else [*raw, draw(junk)]
    usable = isinstance(raw[2], str) and raw[2].isascii() and raw[2].isalnum() and len(raw[2]) <= 64
    sender = raw[2] if usable else "fb"
    return sender, bytes(msgpack.packb(raw, use_bin_type=True))


FUZZ = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


def post(client: httpx.Client, p: Proc, sender: str, body: bytes) -> httpx.Response:
    headers = sign_headers(SECRET, sender, "POST", PEER_PATH, body)
    return client.post(p.url + PEER_PATH, content=body, headers={"content-type": "application/msgpack", **headers})


def test_fuzzed_peer_messages_kill_no_node(trio_mesh: list[Proc]) -> None:
    target = trio_mesh[0]
    seen: dict[int, int] = {}
    reasons: dict[str, int] = {}
    with httpx.Client(timeout=10) as client:

        @FUZZ
        @given(envelopes())
        def one(message: tuple[str, bytes]) -> None:
            r = post(client, target, *message)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            if r.status_code != 204:
                why = r.json()["error"]["message"].split(":")[0][:40]
                reasons[why] = reasons.get(why, 0) + 1
            assert r.status_code in (204, 400), (r.status_code, r.text[:300])
            if r.status_code == 400:
                assert r.json()["error"]["code"]

        one()
    for p in trio_mesh:
        assert p.p is not None and p.p.poll() is None, f"{p.node_id} died:\n{p.log.read_text()[-3000:]}"
        assert httpx.get(p.url + "/health", timeout=5).status_code == 200
    assert seen.get(204, 0) > 100 and seen.get(400, 0) > 100, (seen, reasons)  # both paths were exercised


def test_a_member_record_with_a_bad_address_is_refused_and_harms_nobody(trio_mesh: list[Proc]) -> None:
    """The reported kill: a ``Gossip`` (and a ``Ping``) carrying ``999.1.1.1:80``
    took a 3-node mesh down within 3 s as it spread."""
    target = trio_mesh[0]
    with httpx.Client(timeout=10) as client:
        for bad in ("999.1.1.1:80", "host:abc"):
            gossip = [PROTOCOL_VERSION, CLUSTER, "fb", 1, trio_mesh[1].address, int(MsgType.GOSSIP),
                      [[[["evil", bad, 2_000_000_000_000, 0, 0], None]]]]
            ping = [PROTOCOL_VERSION, CLUSTER, "evil2", 1, bad, int(MsgType.PING), [1, "fa", []]]
            for raw in (gossip, ping):
                r = post(client, target, str(raw[2]), msgpack.packb(raw, use_bin_type=True))
                assert r.status_code == 400 and "address" in r.json()["error"]["message"]
    # Gossip rounds go on after the attack: a registration on the target reaches the others.
    assert httpx.post(target.url + "/models/after-attack/register", json={}, timeout=5).status_code == 201
    for p in trio_mesh:
        wait(lambda p=p: "after-attack" in httpx.get(p.url + "/models/after-attack", timeout=2).text, what=f"{p.node_id} hears")
    for p in trio_mesh:
        assert p.p is not None and p.p.poll() is None
        nodes = {n["node_id"]: n["address"] for n in httpx.get(p.url + "/nodes", timeout=5).json()["nodes"]}
        assert {"fa", "fb", "fc"} <= set(nodes) and not {"evil", "evil2"} & set(nodes)
        assert not {"999.1.1.1:80", "host:abc"} & set(nodes.values())
