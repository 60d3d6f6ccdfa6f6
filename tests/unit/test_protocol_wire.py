"""The wire codec: roundtrips, and no input crashes the decoder.

The decoder's contract: any bytes become either an ``Envelope`` or a
``RemoteProtocolError`` (subclasses included), never another exception.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import RemoteProtocolError
from protocol.wire import (
    CLUSTER_MAX,
    DEFAULT_LIMITS,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Ack,
    Body,
    DeltaEntry,
    Envelope,
    Gossip,
    Limits,
    MemberRecord,
    MemberState,
    MemberUpdate,
    MsgType,
    NodeDelta,
    NodeDigest,
    Ping,
    PingReq,
    Sync,
    SyncDelta,
    SyncDigest,
    WrongCluster,
    WrongVersion,
    check_value,
    decode,
    encode,
)

CLUSTER = "meshnode"

SETTINGS = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings(SETTINGS, max_examples=300)

# -- strategies ---------------------------------------------------------------

U63 = st.integers(0, 2**63 - 1)
node_ids = st.text(min_size=1, max_size=DEFAULT_LIMITS.node_id_chars)
_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_hosts = st.one_of(
    st.lists(_labels, min_size=1, max_size=4).filter(lambda ls: not ls[-1].isdigit()).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
)
# Valid HOST:PORT peer addresses (protocol.names.split_address).
addresses = st.builds(lambda h, p: f"{h}:{p}", _hosts, st.integers(1, 65535))
states = st.sampled_from(list(MemberState))

records = st.builds(MemberRecord, node_ids, addresses, U63, U63, states)
updates = st.builds(MemberUpdate, records, st.none() | node_ids)
update_tuples = st.lists(updates, max_size=5).map(tuple)

# JSON-like catalog values, as msgpack gives them back (lists, not tuples).
leaf_values = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    leaf_values,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=20,
)
digests = st.dictionaries(node_ids, st.builds(NodeDigest, U63, U63, U63), max_size=5)


@st.composite
def node_deltas(draw: st.DrawFn) -> NodeDelta:
    frm = draw(st.integers(0, 10**6))
    to = draw(st.integers(frm, frm + 1000))
    entries = []
    if to > frm:
        for _ in range(draw(st.integers(0, 5))):
            tomb = draw(st.booleans())
            entries.append(
                DeltaEntry(
                    draw(st.text(min_size=1, max_size=30)),
                    draw(st.integers(frm + 1, to)),
                    None if tomb else draw(values),
                    tomb,
                )
            )
    return NodeDelta(
        draw(node_ids),
        draw(U63),
        frm,
        to,
        draw(U63),
        draw(st.booleans()),
        tuple(entries),
    )


bodies: st.SearchStrategy[Body] = st.one_of(
    st.builds(Ping, U63, node_ids, update_tuples),
    st.builds(Ack, U63, node_ids, update_tuples),
    st.builds(PingReq, U63, node_ids, addresses, update_tuples),
    st.builds(Gossip, update_tuples),
    st.builds(Sync, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    st.builds(SyncDigest, digests, st.none() | st.lists(records, max_size=4).map(tuple)),
    st.builds(
        SyncDelta,
        st.lists(node_deltas(), max_size=3).map(tuple),
        st.none() | digests,
        st.none() | st.lists(records, max_size=4).map(tuple),
    ),
)

envelopes = st.builds(
    Envelope,
    st.just(CLUSTER),
    node_ids,
    U63,
    addresses,
    bodies,
)


def _decode_ok_or_remote(data: bytes, cluster: str = CLUSTER) -> Envelope | None:
    """The decoder contract: Envelope or RemoteProtocolError, nothing else."""
    try:
        env = decode(data, cluster)
    except RemoteProtocolError:
        return None
    assert isinstance(env, Envelope)
    # Whatever was accepted encodes again to something that decodes equal.
    assert decode(encode(env), cluster) == env
    return env


def _env(body: Body, **kw: Any) -> Envelope:
    fields: dict[str, Any] = {
        "cluster": CLUSTER,
        "sender": "n1",
        "generation": 1,
        "sender_addr": "10.0.0.1:7946",
        "body": body,
    }
    fields.update(kw)
    return Envelope(**fields)


# -- roundtrips ---------------------------------------------------------------


@SETTINGS
@given(envelopes)
def test_roundtrip_every_message_type(env: Envelope) -> None:
    data = encode(env)
    assert isinstance(data, bytes)
    out = decode(data, CLUSTER)
    assert out == env
    assert out.type is env.type
    assert out.version == PROTOCOL_VERSION


@pytest.mark.parametrize(
    ("body", "msg_type"),
    [
        (Ping(1, "n2"), MsgType.PING),
        (Ack(1, "n2"), MsgType.ACK),
        (PingReq(1, "n2", "h2:7420"), MsgType.PING_REQ),
        (Gossip(()), MsgType.GOSSIP),
        (Sync(0, 2**64 - 1), MsgType.SYNC),
        (SyncDigest({}, None), MsgType.SYNC_DIGEST),
        (SyncDelta(()), MsgType.SYNC_DELTA),
    ],
)
def test_each_type_minimal_roundtrip(body: Body, msg_type: MsgType) -> None:
    env = _env(body)
    assert env.type is msg_type
    assert decode(encode(env), CLUSTER) == env
    assert msgpack.unpackb(encode(env))[5] == int(msg_type)


def test_decoded_member_state_is_enum() -> None:
    rec = MemberRecord("n2", "h2:7420", 3, 4, MemberState.SUSPECT)
    out = decode(encode(_env(Gossip((MemberUpdate(rec, "n3"),)))), CLUSTER)
    assert isinstance(out.body, Gossip)
    got = out.body.updates[0]
    assert got.record.state is MemberState.SUSPECT
    assert got.accuser == "n3"


def test_decode_accepts_bytearray_and_memoryview() -> None:
    env = _env(Ping(5, "n2"))
    data = encode(env)
    assert decode(bytearray(data), CLUSTER) == env
    assert decode(memoryview(data), CLUSTER) == env


def test_encode_rejects_non_body() -> None:
    with pytest.raises((TypeError, KeyError)):
        encode(_env("not a body"))  # type: ignore[arg-type]


# -- the decoder never crashes -------------------------------------------------


@FUZZ
@given(st.binary(max_size=512))
def test_any_bytes_decode_or_remote_error(data: bytes) -> None:
    _decode_ok_or_remote(data)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda kids: (
        st.lists(kids, max_size=8)
        | st.dictionaries(st.text(max_size=5) | st.binary(max_size=3), kids, max_size=4)
    ),
    max_leaves=40,
)


@FUZZ
@given(msgpack_values)
def test_any_msgpack_structure_decode_or_remote_error(value: Any) -> None:
    _decode_ok_or_remote(msgpack.packb(value, use_bin_type=True))


@FUZZ
@given(
    msg_type=st.integers(0, 9),
    body=msgpack_values,
    sender=st.sampled_from(["n1", "", 3, None, "x" * 65]),
    generation=st.sampled_from([0, 1, -1, 2**64 - 1, "1", True]),
    addr=st.sampled_from(["h1:7420", "a", "", None, "x" * 256, "999.1.1.1:80", "host:abc"]),
)
def test_random_bodies_in_valid_envelope(
    msg_type: int, body: Any, sender: Any, generation: Any, addr: Any
) -> None:
    raw = [PROTOCOL_VERSION, CLUSTER, sender, generation, addr, msg_type, body]
    _decode_ok_or_remote(msgpack.packb(raw, use_bin_type=True))


def _mutate(tree: Any, path: list[int], new: Any) -> Any:
    """Replace the node at ``path`` (indices into lists, wrapping) with ``new``."""
    if not path or not isinstance(tree, list) or not tree:
        return new
    i = path[0] % len(tree)
    out = list(tree)
    out[i] = _mutate(tree[i], path[1:], new)
    return out


@FUZZ
@given(
    env=envelopes,
    path=st.lists(st.integers(0, 10), min_size=1, max_size=6),
    new=msgpack_values,
)
def test_mutated_valid_message_decode_or_remote_error(
    env: Envelope, path: list[int], new: Any
) -> None:
    raw = msgpack.unpackb(encode(env), raw=False, strict_map_key=False)
    _decode_ok_or_remote(msgpack.packb(_mutate(raw, path, new), use_bin_type=True))


@FUZZ
@given(env=envelopes, data=st.data())
def test_truncated_valid_message(env: Envelope, data: st.DataObject) -> None:
    full = encode(env)
    cut = data.draw(st.integers(0, len(full) - 1))
    with pytest.raises(RemoteProtocolError):
        decode(full[:cut], CLUSTER)


@FUZZ
@given(env=envelopes, data=st.data())
def test_bit_flipped_valid_message(env: Envelope, data: st.DataObject) -> None:
    full = bytearray(encode(env))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(full) - 1))
        full[i] ^= 1 << data.draw(st.integers(0, 7))
    _decode_ok_or_remote(bytes(full))


@FUZZ
@given(env=envelopes, junk=st.binary(min_size=1, max_size=16))
def test_trailing_garbage_rejected(env: Envelope, junk: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(encode(env) + junk, CLUSTER)


@pytest.mark.parametrize("data", ["text", None, 12, [1, 2]])
def test_non_bytes_input_is_remote_error(data: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(data, CLUSTER)


@pytest.mark.parametrize(
    "raw",
    [
        None,
        1,
        "x",
        {},
        [],
        {"v": 1},
        [PROTOCOL_VERSION],
        [PROTOCOL_VERSION, CLUSTER],
        [PROTOCOL_VERSION, CLUSTER, "n1", 1, "h1:7420", 1, [1, "n2", []], "extra"],
        [PROTOCOL_VERSION, CLUSTER, "n1", 1, "h1:7420", 0, []],
        [PROTOCOL_VERSION, CLUSTER, "n1", 1, "h1:7420", 8, []],
        [PROTOCOL_VERSION, CLUSTER, "n1", 1, "h1:7420", 256, []],
        [PROTOCOL_VERSION, CLUSTER, "n1", 1, "h1:7420", "1", [1, "n2", []]],
        [PROTOCOL_VERSION, CLUSTER, "n1", -1, "h1:7420", 1, [1, "n2", []]],
        [PROTOCOL_VERSION, CLUSTER, "", 1, "h1:7420", 1, [1, "n2", []]],
        [PROTOCOL_VERSION, CLUSTER, "n1", 1, "", 1, [1, "n2", []]],
        [PROTOCOL_VERSION, 5, "n1", 1, "h1:7420", 1, [1, "n2", []]],
        [PROTOCOL_VERSION, CLUSTER, "n1", 1, "h1:7420", 1, [1, "n2"]],
        [PROTOCOL_VERSION, CLUSTER, "n1", 1, "h1:7420", 1, [1, "n2", [[["n3", "h3:7420", 1, 1, 4], None]]]],
        [PROTOCOL_VERSION, CLUSTER, "n1", 1, "h1:7420", 1, [1, "n2", [[["n3", "h3:7420", 1, 1], None]]]],
        [PROTOCOL_VERSION, CLUSTER, "n1", 1, "h1:7420", 1, [1, "n2", [[["n3", "h3:7420", 1, 1, 0], ""]]]],
        [PROTOCOL_VERSION, CLUSTER, "n1", 1, "h1:7420", 5, [-1, 0]],
        [PROTOCOL_VERSION, CLUSTER, "n1", 1, "h1:7420", 5, [0, 1.5]],
        [PROTOCOL_VERSION, CLUSTER, "n1", 1, "h1:7420", 6, [{"n2": [1, 2]}, None]],
        [PROTOCOL_VERSION, CLUSTER, "n1", 1, "h1:7420", 6, [{"": [1, 2, 3]}, None]],
        [PROTOCOL_VERSION, CLUSTER, "n1", 1, "h1:7420", 6, [[], None]],
        [PROTOCOL_VERSION, CLUSTER, "n1", 1, "h1:7420", 7, [[["n2", 1, 0, 1, 0, 0, []]], None, None]],
        [PROTOCOL_VERSION, CLUSTER, "n1", 1, "h1:7420", 7, [[["n2", 1, 5, 4, 0, False, []]], None, None]],
        [
            PROTOCOL_VERSION,
            CLUSTER,
            "n1",
            1,
            "h1:7420",
            7,
            [[["n2", 1, 0, 1, 0, False, [["k", 1, 1, 1]]]], None, None],
        ],
        [
            PROTOCOL_VERSION,
            CLUSTER,
            "n1",
            1,
            "h1:7420",
            7,
            [[["n2", 1, 0, 1, 0, False, [["k", 1, 1, True]]]], None, None],
        ],
        [
            PROTOCOL_VERSION,
            CLUSTER,
            "n1",
            1,
            "h1:7420",
            7,
            [[["n2", 1, 0, 1, 0, False, [["", 1, 1, False]]]], None, None],
        ],
        [
            PROTOCOL_VERSION,
            CLUSTER,
            "n1",
            1,
            "h1:7420",
            7,
            [[["n2", 1, 0, 1, 0, False, [["k", 0, 1, False]]]], None, None],
        ],
        [
            PROTOCOL_VERSION,
            CLUSTER,
            "n1",
            1,
            "h1:7420",
            7,
            [[["n2", 1, 0, 1, 0, False, [["k" * 513, 1, 1, False]]]], None, None],
        ],
    ],
)
def test_malformed_envelopes_rejected(raw: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(msgpack.packb(raw, use_bin_type=True), CLUSTER)


def test_non_string_map_keys_rejected() -> None:
    raw = [PROTOCOL_VERSION, CLUSTER, "n1", 1, "h1:7420", 6, [{1: [1, 2, 3]}, None]]
    with pytest.raises(RemoteProtocolError):
        decode(msgpack.packb(raw, use_bin_type=True, strict_types=False), CLUSTER)
    value = {b"k": 1}
    raw = [
        PROTOCOL_VERSION,
        CLUSTER,
        "n1",
        1,
        "h1:7420",
        7,
        [[["n2", 1, 0, 1, 0, False, [["k", 1, value, False]]]], None, None],
    ]
    with pytest.raises(RemoteProtocolError):
        decode(msgpack.packb(raw, use_bin_type=True), CLUSTER)


def test_ext_types_rejected_in_values() -> None:
    for ext in (msgpack.ExtType(5, b"xx"), msgpack.Timestamp(1, 0)):
        raw = [
            PROTOCOL_VERSION,
            CLUSTER,
            "n1",
            1,
            "h1:7420",
            7,
            [[["n2", 1, 0, 1, 0, False, [["k", 1, ext, False]]]], None, None],
        ]
        with pytest.raises(RemoteProtocolError):
            decode(msgpack.packb(raw, use_bin_type=True), CLUSTER)


@pytest.mark.parametrize("bad", ["999.1.1.1:80", "host:abc", "h:0", "[::1]", "a b:1", ""])
@pytest.mark.parametrize("where", ["sender", "ping update", "ping-req target", "gossip", "digest members", "delta members"])
def test_bad_peer_addresses_rejected_wherever_they_enter(bad: str, where: str) -> None:
    """An address no socket can take never gets past the decoder: a forged
    member record with one killed every node that gossiped it."""

    def raw(addr: str) -> list[Any]:
        rec = ["n3", addr, 1, 0, 0]
        bodies = {
            "sender": (1, [1, "n2", []]),
            "ping update": (1, [1, "n2", [[rec, None]]]),
            "ping-req target": (3, [1, "n2", addr, []]),
            "gossip": (4, [[[rec, None]]]),
            "digest members": (6, [None, [["n4", "h4:7420", 1, 0, 0], rec]]),
            "delta members": (7, [[], None, [rec]]),
        }
        msg_type, body = bodies[where]
        return [PROTOCOL_VERSION, CLUSTER, "n1", 1, addr if where == "sender" else "h1:7420", msg_type, body]

    decode(msgpack.packb(raw("h3:7420"), use_bin_type=True), CLUSTER)  # a good address passes
    with pytest.raises(RemoteProtocolError, match="address"):
        decode(msgpack.packb(raw(bad), use_bin_type=True), CLUSTER)


# -- limits --------------------------------------------------------------------


def test_oversized_message_rejected_before_parsing() -> None:
    env = _env(Gossip(()))
    data = encode(env) + b"\x00" * MAX_MESSAGE_BYTES
    with pytest.raises(RemoteProtocolError, match="limit"):
        decode(data, CLUSTER)


def test_custom_message_limit() -> None:
    env = _env(Ping(1, "n2"))
    data = encode(env)
    assert decode(data, CLUSTER, Limits(message_bytes=len(data))) == env
    with pytest.raises(RemoteProtocolError):
        decode(data, CLUSTER, Limits(message_bytes=len(data) - 1))


def test_too_many_updates_rejected() -> None:
    rec = MemberRecord("n2", "h2:7420", 1, 0, MemberState.ALIVE)
    lim = Limits(updates_per_message=3)
    ok = _env(Gossip((MemberUpdate(rec),) * 3))
    assert decode(encode(ok), CLUSTER, lim) == ok
    with pytest.raises(RemoteProtocolError):
        decode(encode(_env(Gossip((MemberUpdate(rec),) * 4))), CLUSTER, lim)


def test_too_many_delta_entries_rejected_across_nodes() -> None:
    lim = Limits(entries_per_message=4)

    def nd(nid: str, n: int) -> NodeDelta:
        return NodeDelta(
            nid, 1, 0, n, 0, False, tuple(DeltaEntry(f"k{i}", i + 1, i, False) for i in range(n))
        )

    ok = _env(SyncDelta((nd("a", 2), nd("b", 2))))
    assert decode(encode(ok), CLUSTER, lim) == ok
    with pytest.raises(RemoteProtocolError):
        decode(encode(_env(SyncDelta((nd("a", 2), nd("b", 3))))), CLUSTER, lim)


def test_too_many_digest_nodes_rejected() -> None:
    lim = Limits(nodes_per_message=2)
    d = {f"n{i}": NodeDigest(1, 1, 0) for i in range(3)}
    with pytest.raises(RemoteProtocolError):
        decode(encode(_env(SyncDigest(d, None))), CLUSTER, lim)


@pytest.mark.parametrize(
    ("field_name", "value"),
    [("sender", "x" * 65), ("sender_addr", "x" * 256), ("cluster", "c" * (CLUSTER_MAX + 1))],
)
def test_long_strings_rejected(field_name: str, value: str) -> None:
    env = _env(Ping(1, "n2"), **{field_name: value})
    with pytest.raises(RemoteProtocolError):
        decode(encode(env), value if field_name == "cluster" else CLUSTER)


def _nested(depth: int) -> Any:
    v: Any = "leaf"
    for i in range(depth):
        v = [v] if i % 2 else {"k": v}
    return v


def _delta_with_value(value: Any) -> Envelope:
    return _env(
        SyncDelta((NodeDelta("n2", 1, 0, 1, 0, False, (DeltaEntry("k", 1, value, False),)),))
    )


def test_value_depth_limit() -> None:
    limit = DEFAULT_LIMITS.value_depth
    ok = _delta_with_value(_nested(limit))
    assert decode(encode(ok), CLUSTER) == ok
    with pytest.raises(RemoteProtocolError, match="deep"):
        decode(encode(_delta_with_value(_nested(limit + 1))), CLUSTER)
    with pytest.raises(RemoteProtocolError):
        decode(encode(_delta_with_value(_nested(200))), CLUSTER)


def test_check_value_direct() -> None:
    check_value({"a": [1, 2.5, None, True, "s", b"b"]})
    for bad in ({1: 2}, {"a": (1,)}, object(), {"a": {1, 2}}, _nested(17)):
        with pytest.raises(RemoteProtocolError):
            check_value(bad)


def test_deeply_nested_message_body_rejected() -> None:
    # Far past msgpack's own stack limit: its error comes back as ours.
    raw = b"\x97\x01\xa8meshnode\xa2n1\x01\xa1a\x07" + b"\x91" * 5000 + b"\xc0"
    with pytest.raises(RemoteProtocolError):
        decode(raw, CLUSTER)


def test_deeply_nested_version_field_is_remote_error() -> None:
    # [[[[...1...]]]]: 1000 bytes, well under every size limit, nested under
    # msgpack's 1024-level stack limit but past Python's repr recursion limit.
    data = b"\x91" * 1000 + b"\x01"
    with pytest.raises(RemoteProtocolError):
        decode(data, CLUSTER)


# -- version and cluster ---------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, 255, -1, "1", None, [1], 2**64 - 1])
def test_wrong_version(version: Any) -> None:
    env = _env(Ping(1, "n2"), version=version)
    with pytest.raises(WrongVersion):
        decode(encode(env), CLUSTER)


@pytest.mark.parametrize("version", [True, 1.0])
def test_version_must_be_an_integer(version: Any) -> None:
    raw = [version, CLUSTER, "n1", 1, "h1:7420", int(MsgType.PING), [1, "n2", []]]
    with pytest.raises(WrongVersion):
        decode(msgpack.packb(raw, use_bin_type=True), CLUSTER)


def test_wrong_version_checked_before_shape() -> None:
    # A future version may change the envelope shape: still WrongVersion.
    raw = [2, "whatever", {"new": "shape"}]
    with pytest.raises(WrongVersion):
        decode(msgpack.packb(raw), CLUSTER)


def test_wrong_cluster() -> None:
    env = _env(Ping(1, "n2"), cluster="other")
    data = encode(env)
    with pytest.raises(WrongCluster):
        decode(data, CLUSTER)
    assert decode(data, "other") == env
    assert issubclass(WrongCluster, RemoteProtocolError)
    assert issubclass(WrongVersion, RemoteProtocolError)


def test_empty_cluster_label_is_a_cluster() -> None:
    env = _env(Ping(1, "n2"), cluster="")
    assert decode(encode(env), "") == env
    with pytest.raises(WrongCluster):
        decode(encode(env), CLUSTER)


# -- delta version windows --------------------------------------------------------


@pytest.mark.parametrize(
    ("frm", "to", "version", "ok"),
    [
        (0, 5, 1, True),
        (0, 5, 5, True),
        (3, 5, 4, True),
        (3, 5, 3, False),  # not above from_version
        (3, 5, 6, False),  # above to_version
        (0, 0, 1, False),
        (5, 5, 5, False),
        (3, 5, 2, False),
    ],
)
def test_delta_entry_version_window(frm: int, to: int, version: int, ok: bool) -> None:
    nd = NodeDelta("n2", 1, frm, to, 0, False, (DeltaEntry("k", version, 1, False),))
    env = _env(SyncDelta((nd,)))
    if ok:
        assert decode(encode(env), CLUSTER) == env
    else:
        with pytest.raises(RemoteProtocolError):
            decode(encode(env), CLUSTER)


@SETTINGS
@given(
    frm=st.integers(0, 100),
    to=st.integers(0, 100),
    versions=st.lists(st.integers(1, 120), max_size=5),
)
def test_delta_window_property(frm: int, to: int, versions: list[int]) -> None:
    nd = NodeDelta(
        "n2",
        1,
        frm,
        to,
        0,
        False,
        tuple(DeltaEntry(f"k{i}", v, None, True) for i, v in enumerate(versions)),
    )
    env = _env(SyncDelta((nd,)))
    valid = to >= frm and all(frm < v <= to for v in versions)
    if valid:
        assert decode(encode(env), CLUSTER) == env
    else:
        with pytest.raises(RemoteProtocolError):
            decode(encode(env), CLUSTER)


def test_tombstone_with_value_rejected() -> None:
    nd = NodeDelta("n2", 1, 0, 1, 0, False, (DeltaEntry("k", 1, "zombie", True),))
    with pytest.raises(RemoteProtocolError):
        decode(encode(_env(SyncDelta((nd,)))), CLUSTER)
