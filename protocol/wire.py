"""The wire codec: versioned msgpack envelopes with a limit on everything.

Theory of operation
-------------------
Every peer message is one msgpack array::

    [PROTOCOL_VERSION, cluster, sender_id, sender_generation, sender_addr, type, body]

``decode`` checks the whole message before anything else sees it: the size
of the raw bytes, the protocol version, the shape and type of every field,
and the size of every string, list and nested value.  Whatever is wrong, the
caller gets a ``RemoteProtocolError`` with a short reason (never a
``KeyError``, ``TypeError`` or msgpack's own exceptions), so the I/O layer can
log the bad peer, count it and go on.

The cluster label is checked here too: a node of another cluster is refused
with ``WrongCluster`` and its message is never merged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import InvalidName, RemoteProtocolError
from .names import validate_address

__all__ = [
    "CLUSTER_MAX",
    "INT_MAX",
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "Ack",
    "Body",
    "DeltaEntry",
    "Envelope",
    "Gossip",
    "Limits",
    "MemberRecord",
    "MemberState",
    "MemberUpdate",
    "MsgType",
    "NodeDelta",
    "NodeDigest",
    "Ping",
    "PingReq",
    "Sync",
    "SyncDelta",
    "SyncDigest",
    "WrongCluster",
    "WrongVersion",
    "check_value",
    "decode",
    "encode",
]

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
CLUSTER_MAX = 64
INT_MAX = 2**63 - 1  # the largest generation, incarnation, version or sequence number


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on every part of a message.  Both sides use the same numbers."""

    message_bytes: int = MAX_MESSAGE_BYTES
    node_id_chars: int = 64
    key_chars: int = 512
    value_bytes: int = 64 * 1024
    value_depth: int = 16
    nodes_per_message: int = 10_000
    entries_per_message: int = 50_000
    updates_per_message: int = 256


DEFAULT_LIMITS = Limits()


class WrongVersion(RemoteProtocolError):
    """The peer speaks a protocol version we do not understand."""


class WrongCluster(RemoteProtocolError):
    """The peer belongs to another cluster."""


class MsgType(enum.IntEnum):
    PING = 1
    ACK = 2
    PING_REQ = 3
    GOSSIP = 4
    SYNC = 5
    SYNC_DIGEST = 6
    SYNC_DELTA = 7


class MemberState(enum.IntEnum):
    """Member states, in the order in which they win at an equal version."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def reachable(self) -> bool:
        """Alive or suspect: a suspect is probably alive, so worth asking."""
        return self in (MemberState.ALIVE, MemberState.SUSPECT)


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """What the mesh believes of one member.  Records form a lattice:
    the one with the higher ``(generation, incarnation, state)`` wins."""

    node_id: str
    address: str
    generation: int
    incarnation: int
    state: MemberState

    @property
    def rank(self) -> tuple[int, int, int]:
        return (self.generation, self.incarnation, int(self.state))

    def to_wire(self) -> list[Any]:
        return [self.node_id, self.address, self.generation, self.incarnation, int(self.state)]


@dataclass(frozen=True, slots=True)
class MemberUpdate:
    """A rumour about a member; ``accuser`` names who suspects it."""

    record: MemberRecord
    accuser: str | None = None

    def to_wire(self) -> list[Any]:
        return [self.record.to_wire(), self.accuser]


@dataclass(frozen=True, slots=True)
class NodeDigest:
    generation: int
    max_version: int
    last_gc_version: int


@dataclass(frozen=True, slots=True)
class DeltaEntry:
    key: str
    version: int
    value: Any  # None for a tombstone
    tombstone: bool


@dataclass(frozen=True, slots=True)
class NodeDelta:
    """Keys of one origin node with versions in ``(from_version, to_version]``.

    ``reset`` replaces the receiver's whole state for that node (the receiver
    fell behind tombstone collection, or does not know this generation)."""

    node_id: str
    generation: int
    from_version: int
    to_version: int
    last_gc_version: int
    reset: bool
    entries: tuple[DeltaEntry, ...]


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    target: str
    updates: tuple[MemberUpdate, ...] = ()


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    target: str
    updates: tuple[MemberUpdate, ...] = ()


@dataclass(frozen=True, slots=True)
class PingReq:
    seq: int
    target: str
    target_addr: str
    updates: tuple[MemberUpdate, ...] = ()


@dataclass(frozen=True, slots=True)
class Gossip:
    updates: tuple[MemberUpdate, ...]


@dataclass(frozen=True, slots=True)
class Sync:
    """Opens anti-entropy: hashes only, so agreeing peers exchange one small message.

    ``recent`` (None: a full sync) lists the digest entries of the origins that
    changed lately at the sender, or, in answer to one, those the answerer
    lacks: steady gossip carries what changed, not a digest of everything."""

    digest_hash: int
    members_hash: int
    recent: dict[str, NodeDigest] | None = None
    answer: bool = False  # sent in answer to a sync: it asks for what it lacks, and offers nothing more


@dataclass(frozen=True, slots=True)
class SyncDigest:
    digest: dict[str, NodeDigest] | None  # None: our catalogs already agree
    members: tuple[MemberRecord, ...] | None


@dataclass(frozen=True, slots=True)
class SyncDelta:
    deltas: tuple[NodeDelta, ...]
    digest: dict[str, NodeDigest] | None = None
    members: tuple[MemberRecord, ...] | None = None


Body = Ping | Ack | PingReq | Gossip | Sync | SyncDigest | SyncDelta

_TYPE_OF: dict[type, MsgType] = {
    Ping: MsgType.PING,
    Ack: MsgType.ACK,
    PingReq: MsgType.PING_REQ,
    Gossip: MsgType.GOSSIP,
    Sync: MsgType.SYNC,
    SyncDigest: MsgType.SYNC_DIGEST,
    SyncDelta: MsgType.SYNC_DELTA,
}


@dataclass(frozen=True, slots=True)
class Envelope:
    cluster: str
    sender: str
    generation: int
    sender_addr: str
    body: Body = field(repr=False)
    version: int = PROTOCOL_VERSION

    @property
    def type(self) -> MsgType:
        return _TYPE_OF[type(self.body)]


# -- encoding ---------------------------------------------------------------


def _digest_wire(d: dict[str, NodeDigest]) -> dict[str, list[int]]:
    return {k: [v.generation, v.max_version, v.last_gc_version] for k, v in d.items()}


def _body_wire(b: Body) -> list[Any]:
    if isinstance(b, Ping):
        return [b.seq, b.target, [u.to_wire() for u in b.updates]]
    if isinstance(b, Ack):
        return [b.seq, b.target, [u.to_wire() for u in b.updates]]
    if isinstance(b, PingReq):
        return [b.seq, b.target, b.target_addr, [u.to_wire() for u in b.updates]]
    if isinstance(b, Gossip):
        return [[u.to_wire() for u in b.updates]]
    if isinstance(b, Sync):
        if b.recent is None:  # as every version has sent it
            return [b.digest_hash, b.members_hash]
        return [b.digest_hash, b.members_hash, _digest_wire(b.recent), b.answer]
    if isinstance(b, SyncDigest):
        return [
            None if b.digest is None else _digest_wire(b.digest),
            None if b.members is None else [m.to_wire() for m in b.members],
        ]
    if isinstance(b, SyncDelta):
        return [
            [
                [
                    d.node_id,
                    d.generation,
                    d.from_version,
                    d.to_version,
                    d.last_gc_version,
                    d.reset,
                    [[e.key, e.version, e.value, e.tombstone] for e in d.entries],
                ]
                for d in b.deltas
            ],
            None if b.digest is None else _digest_wire(b.digest),
            None if b.members is None else [m.to_wire() for m in b.members],
        ]
    raise TypeError(f"not a message body: {type(b).__name__}")


def encode(env: Envelope) -> bytes:
    data: bytes = msgpack.packb(
        [
            env.version,
            env.cluster,
            env.sender,
            env.generation,
            env.sender_addr,
            int(env.type),
            _body_wire(env.body),
        ],
        use_bin_type=True,
    )
    return data


def encoded_size(value: Any) -> int:
    """Bytes ``value`` takes on the wire (used to cut deltas to a budget)."""
    return len(msgpack.packb(value, use_bin_type=True))


# -- decoding ---------------------------------------------------------------


def _fail(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(what)


def _int(v: Any, what: str, lo: int = 0, hi: int = INT_MAX) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _fail(f"{what}: expected an integer in [{lo}, {hi}]")
    return v


def _str(v: Any, what: str, max_chars: int, *, empty: bool = False) -> str:
    if not isinstance(v, str) or len(v) > max_chars or (not empty and not v):
        raise _fail(f"{what}: expected a string of 1 to {max_chars} characters")
    return v


def _address(v: Any, what: str) -> str:
    """A peer address (``HOST:PORT``), checked before anything dials it."""
    try:
        return validate_address(v)
    except InvalidName as e:
        raise _fail(f"{what}: {e}") from None


def _list(v: Any, what: str, max_len: int, length: int | None = None) -> list[Any]:
    if not isinstance(v, list) or len(v) > max_len:
        raise _fail(f"{what}: expected a list of at most {max_len} items")
    if length is not None and len(v) != length:
        raise _fail(f"{what}: expected {length} fields, got {len(v)}")
    return v


_LEAF_TYPES = frozenset({type(None), bool, float, str, bytes})
_INT_LO, _INT_HI = -(2**63), 2**64


def check_value(v: Any, depth: int = 0, max_depth: int = DEFAULT_LIMITS.value_depth) -> None:
    """Raise ``RemoteProtocolError`` unless ``v`` is a plain JSON-like value."""
    if depth > max_depth:
        raise _fail("value nested too deeply")
    # The common shapes by exact type first (every delta entry comes through
    # here); anything else, subclasses included, by the general rules below.
    t = type(v)
    if t in _LEAF_TYPES or (t is int and _INT_LO <= v < _INT_HI):
        return
    if t is dict and depth < max_depth:
        for k, item in v.items():
            if type(k) is not str and not isinstance(k, str):
                raise _fail("value has a non-string map key")
            ti = type(item)
            if not (ti in _LEAF_TYPES or (ti is int and _INT_LO <= item < _INT_HI)):
                check_value(item, depth + 1, max_depth)
        return
    if t is list and depth < max_depth:
        for item in v:
            ti = type(item)
            if not (ti in _LEAF_TYPES or (ti is int and _INT_LO <= item < _INT_HI)):
                check_value(item, depth + 1, max_depth)
        return
    if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**64:
        raise _fail("integer out of range")
    if v is None or isinstance(v, bool | int | float | str | bytes):
        return
    if isinstance(v, list):
        for item in v:
            check_value(item, depth + 1, max_depth)
        return
    if isinstance(v, dict):
        for k, item in v.items():
            if not isinstance(k, str):
                raise _fail("value has a non-string map key")
            check_value(item, depth + 1, max_depth)
        return
    raise _fail(f"value of unsupported type {type(v).__name__}")


class _Decoder:
    def __init__(self, lim: Limits) -> None:
        self.lim = lim

    def node_id(self, v: Any) -> str:
        return _str(v, "node id", self.lim.node_id_chars)

    def record(self, v: Any) -> MemberRecord:
        f = _list(v, "member record", 5, 5)
        try:
            state = MemberState(_int(f[4], "member state", 0, 3))
        except ValueError as e:  # pragma: no cover - _int bounds it already
            raise _fail("member state") from e
        return MemberRecord(
            self.node_id(f[0]),
            _address(f[1], "member address"),
            _int(f[2], "generation"),
            _int(f[3], "incarnation"),
            state,
        )

    def records(self, v: Any) -> tuple[MemberRecord, ...] | None:
        if v is None:
            return None
        return tuple(self.record(r) for r in _list(v, "members", self.lim.nodes_per_message))

    def updates(self, v: Any) -> tuple[MemberUpdate, ...]:
        out = []
        for u in _list(v, "updates", self.lim.updates_per_message):
            f = _list(u, "update", 2, 2)
            accuser = None if f[1] is None else self.node_id(f[1])
            out.append(MemberUpdate(self.record(f[0]), accuser))
        return tuple(out)

    def digest(self, v: Any) -> dict[str, NodeDigest] | None:
        if v is None:
            return None
        if not isinstance(v, dict) or len(v) > self.lim.nodes_per_message:
            raise _fail(f"digest: expected a map of at most {self.lim.nodes_per_message} nodes")
        out = {}
        for k, d in v.items():
            f = _list(d, "digest entry", 3, 3)
            out[self.node_id(k)] = NodeDigest(
                _int(f[0], "generation"), _int(f[1], "max version"), _int(f[2], "gc version")
            )
        return out

    def deltas(self, v: Any) -> tuple[NodeDelta, ...]:
        out = []
        total = 0
        for raw in _list(v, "deltas", self.lim.nodes_per_message):
            f = _list(raw, "node delta", 7, 7)
            entries = []
            raw_entries = _list(f[6], "delta entries", self.lim.entries_per_message)
            total += len(raw_entries)
            if total > self.lim.entries_per_message:
                raise _fail("too many delta entries")
            for e in raw_entries:
                ef = _list(e, "delta entry", 4, 4)
                if not isinstance(ef[3], bool):
                    raise _fail("tombstone flag must be a boolean")
                value = ef[2]
                if ef[3] and value is not None:
                    raise _fail("a tombstone carries no value")
                check_value(value, 0, self.lim.value_depth)
                entries.append(
                    DeltaEntry(
                        _str(ef[0], "key", self.lim.key_chars),
                        _int(ef[1], "entry version", 1),
                        value,
                        ef[3],
                    )
                )
            if not isinstance(f[5], bool):
                raise _fail("reset flag must be a boolean")
            frm, to = _int(f[2], "from version"), _int(f[3], "to version")
            if to < frm:
                raise _fail("delta to_version is below from_version")
            for e in entries:
                if not frm < e.version <= to:
                    raise _fail("delta entry version outside (from, to]")
            out.append(
                NodeDelta(
                    self.node_id(f[0]),
                    _int(f[1], "generation"),
                    frm,
                    to,
                    _int(f[4], "gc version"),
                    f[5],
                    tuple(entries),
                )
            )
        return tuple(out)

    def body(self, t: MsgType, v: Any) -> Body:
        if t is MsgType.PING:
            f = _list(v, "ping", 3, 3)
            return Ping(_int(f[0], "seq"), self.node_id(f[1]), self.updates(f[2]))
        if t is MsgType.ACK:
            f = _list(v, "ack", 3, 3)
            return Ack(_int(f[0], "seq"), self.node_id(f[1]), self.updates(f[2]))
        if t is MsgType.PING_REQ:
            f = _list(v, "ping-req", 4, 4)
            return PingReq(
                _int(f[0], "seq"),
                self.node_id(f[1]),
                _address(f[2], "target address"),
                self.updates(f[3]),
            )
        if t is MsgType.GOSSIP:
            f = _list(v, "gossip", 1, 1)
            return Gossip(self.updates(f[0]))
        if t is MsgType.SYNC:
            f = _list(v, "sync", 4)
            if len(f) not in (2, 4):
                raise _fail("sync: expected 2 or 4 fields")
            hashes = _int(f[0], "digest hash", 0, 2**64 - 1), _int(f[1], "members hash", 0, 2**64 - 1)
            if len(f) == 2:
                return Sync(*hashes)
            recent = self.digest(f[2])
            if recent is None or not isinstance(f[3], bool):
                raise _fail("sync: expected a map of recent digest entries and an answer flag")
            return Sync(*hashes, recent, f[3])
        if t is MsgType.SYNC_DIGEST:
            f = _list(v, "sync digest", 2, 2)
            return SyncDigest(self.digest(f[0]), self.records(f[1]))
        f = _list(v, "sync delta", 3, 3)
        return SyncDelta(self.deltas(f[0]), self.digest(f[1]), self.records(f[2]))


def decode(data: bytes, cluster: str, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Decode and validate one message.  Any problem: ``RemoteProtocolError``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _fail("message is not bytes")
    if len(data) > limits.message_bytes:
        raise _fail(f"message of {len(data)} bytes is over the {limits.message_bytes} byte limit")
    try:
        raw = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
        )
    except Exception as e:  # msgpack raises several unrelated types
        raise _fail(f"undecodable message ({type(e).__name__})") from None
    if not isinstance(raw, list) or not raw:
        raise _fail("message is not an envelope")
    v = raw[0]
    if type(v) is not int or v != PROTOCOL_VERSION:
        # Never format an arbitrary peer object: a deeply nested one breaks repr().
        shown = v if type(v) is int else type(v).__name__
        raise WrongVersion(f"protocol version {shown!r}, this node speaks {PROTOCOL_VERSION}")
    f = _list(raw, "envelope", 7, 7)
    peer_cluster = _str(f[1], "cluster", CLUSTER_MAX, empty=True)
    if peer_cluster != cluster:
        raise WrongCluster(f"peer belongs to cluster {peer_cluster!r}, not {cluster!r}")
    dec = _Decoder(limits)
    try:
        t = MsgType(_int(f[5], "message type", 1, 255))
    except ValueError:
        raise _fail(f"unknown message type {f[5]}") from None
    return Envelope(
        cluster=peer_cluster,
        sender=dec.node_id(f[2]),
        generation=_int(f[3], "generation"),
        sender_addr=_address(f[4], "sender address"),
        body=dec.body(t, f[6]),
    )
