"""The decisions that the daemon and the simulator share, tested without either:
registry writes, availability and totals, holders and source choice, claims,
the transfer state table, and the typed peer actions."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.actions import (
    CopyOf,
    DeleteCopy,
    LocalPath,
    StartTransfer,
    Web,
    decode_action,
    encode_action,
    source_from_text,
    source_text,
)
from protocol.hlc import HLC, Stamp
from protocol.keys import (
    CopyRecord,
    LocOp,
    LocRecord,
    RegOp,
    RegRecord,
    SrcRecord,
    Storage,
    TierUsage,
    XferRecord,
    copy_key,
    reg_key,
    src_key,
    xfer_key,
)
from protocol.registry import (
    InvalidInput,
    Registration,
    availability,
    location_write,
    parse_registration,
    pin_write,
    purged_models,
    register_write,
    storage_totals,
    unregister_writes,
)
from protocol.replicas import ReplicaPolicy
from protocol.transfer.claims import live_claims, mesh_copy
from protocol.transfer.sources import (
    content_conflict,
    fetch_conflict,
    holders,
    source_manifest_hash,
)
from protocol.transfer.states import TRANSITIONS, IllegalTransition, TransferStatus, advance
from protocol.view import resolve_models

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)

NODES = ["a", "b", "c", "d", "e"]
HASHES = ["0" * 32, "1" * 32, "2" * 32]
nodes = st.sampled_from(NODES)
hashes = st.sampled_from(HASHES)


# -- registry --------------------------------------------------------------------------------


def _apply(items: dict[tuple[str, str], Any], node: str, writes: list[tuple[str, Any]]) -> None:
    for key, value in writes:
        items[(node, key)] = value


def _models(items: dict[tuple[str, str], Any]) -> dict[str, Any]:
    return resolve_models((n, k, v) for (n, k), v in items.items())


ops = st.lists(
    st.tuples(nodes, st.sampled_from(["register", "unregister", "purge", "locate", "pin", "unpin"]), st.integers(0, 50)),
    min_size=1,
    max_size=25,
)


@SETTINGS
@given(ops)
def test_registry_writes_follow_what_they_read(steps: list[tuple[str, str, int]]) -> None:
    """Any node's write wins over the registration it read, whatever the
    writers' clocks; re-registering keeps ``since`` (and the locations made
    under it), unregistering starts a new one, purge drops the locations."""
    clocks = {n: HLC(n) for n in NODES}
    items: dict[tuple[str, str], Any] = {}
    now = 1_000
    for node, op, skew in steps:
        now += 1
        wall = now + skew  # every node's wall clock is off by its own amount
        before = _models(items).get("m")
        if op == "register":
            ws, warning = register_write("m", Registration("llm"), before, clocks[node], wall)
            _apply(items, node, ws)
            after = _models(items)["m"]
            assert after.registered_by == node and warning is None
            if before is not None:  # the locations and the pin made under it stay
                assert after.since == before.since and after.locations == before.locations
                assert after.policy == before.policy
        elif before is None:
            continue
        elif op in ("pin", "unpin"):
            policy = ReplicaPolicy(1, len(node) + 1) if op == "pin" else None
            w, _ = pin_write(before, policy, clocks[node], wall)
            _apply(items, node, [w])
            assert _models(items)["m"].policy == policy
        elif op == "locate":
            w, _ = location_write(before, f"{node}:disk", True, clocks[node], wall)
            _apply(items, node, [w])
            assert f"{node}:disk" in _models(items)["m"].locations
        else:
            dropped, writes, _ = unregister_writes(before, clocks[node], wall, purge=op == "purge")
            _apply(items, node, writes)
            assert "m" not in _models(items)
            # While the purge is the newest record, every node deletes its copies.
            assert purged_models((n, k, v) for (n, k), v in items.items()) == ({"m"} if op == "purge" else set())
            assert dropped == (list(before.locations) if op == "purge" else [])
            ws, _ = register_write("m", Registration(), None, clocks[node], wall)
            _apply(items, node, ws)
            again = _models(items)["m"]
            assert again.since > before.since  # a new registration, not the old one revived
            assert again.policy is None  # and no pin of the old one
            if op == "purge":
                assert again.locations == []
            assert purged_models((n, k, v) for (n, k), v in items.items()) == set()  # a registration ends it


def test_a_stamp_from_far_in_the_future_is_reported_not_followed() -> None:
    clock = HLC("a", max_drift_ms=60_000)
    items: dict[tuple[str, str], Any] = {}
    future = Stamp(10_000_000, 0, "z")
    items[("z", reg_key("m"))] = RegRecord(future, future, RegOp.REGISTER).to_value()
    before = _models(items)["m"]
    [(_key, value)], warning = register_write("m", Registration(), before, clock, 1_000)
    assert warning is not None and "future" in warning
    assert RegRecord.from_value(value).stamp < future  # it cannot win, and says so


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ([], "JSON object"),
        ({"colour": "red"}, "unknown fields: colour"),
        ({"model_type": ""}, "model_type"),
        ({"metadata": {"tags": "x"}}, "tags"),
        ({"metadata": {"requirements": {"min_vram": True}}}, "min_vram"),
        ({"metadata": {"requirements": {"min_memory": 2**63}}}, "min_memory"),
        ({"metadata": {"files": ["a"] * 201}}, "files"),
        ({"metadata": {"requirements": {"gpu_arch": ["sm_80", 90]}}}, "gpu_arch"),
        ({"metadata": {"requirements": {"gpu_arch": []}}}, "gpu_arch"),
        ({"metadata": {"secret": 1}}, "unknown metadata fields: secret"),
    ],
)
def test_a_bad_registration_says_what_is_wrong(body: Any, needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle) as e:
        parse_registration(body)
    assert e.value.code == "INVALID_REQUEST"


def test_a_registration_keeps_only_what_it_checked() -> None:
    reg = parse_registration({"model_type": "llm", "metadata": {"tags": ["a"], "requirements": {"min_vram": 5}}})
    assert reg == Registration("llm", None, {"tags": ["a"], "requirements": {"min_vram": 5}})
    assert parse_registration(None) == Registration()
    # gpu_arch as the seeds write it: a list (it was refused), or one string.
    for arch in (["sm_80", "sm_90"], "sm_80"):
        got = parse_registration({"metadata": {"requirements": {"gpu_arch": arch}}})
        assert got.metadata["requirements"]["gpu_arch"] == arch


@SETTINGS
@given(st.dictionaries(st.sampled_from(["m1", "m2", "m3"]), st.sets(nodes, max_size=5), max_size=3), st.sets(nodes))
def test_availability_classes_are_exact(placement: dict[str, set[str]], online: set[str]) -> None:
    items: dict[tuple[str, str], Any] = {}
    s = Stamp(1, 0, "a")
    for model, on in placement.items():
        items[("a", reg_key(model))] = RegRecord(s, s, RegOp.REGISTER).to_value()
        for n in on:
            items[(n, f"loc/{model}@{n}:disk")] = LocRecord(s, LocOp.ADD).to_value()
    av = availability(_models(items), NODES, online)
    up = [n for n in NODES if n in online]
    for model, on in placement.items():
        live = on & online
        assert (model in av.single_node) == (len(live) == 1)
        assert (model in av.replicated) == (len(live) >= 2 and len(live) == len(up))
        for n in NODES:
            assert (model in av.models_by_node[n]) == (n in on)


@SETTINGS
@given(st.lists(st.dictionaries(st.sampled_from(["disk", "dram"]), st.tuples(*[st.integers(0, 2**40)] * 3)), max_size=5))
def test_storage_totals_are_the_sums(raw: list[dict[str, tuple[int, int, int]]]) -> None:
    storages = [Storage({t: TierUsage(*u) for t, u in d.items()}) for d in raw]
    totals = storage_totals(storages)
    for tier in ("disk", "dram"):
        rows = [d[tier] for d in raw if tier in d]
        if not rows:
            assert tier not in totals
            continue
        assert totals[tier] == {k: sum(r[i] for r in rows) for i, k in enumerate(("total", "used", "free"))}


# -- transfers: holders, source choice, claims -----------------------------------------------

copy_items = st.lists(
    st.tuples(nodes, st.sampled_from(["m", "other"]), st.sampled_from(["disk", "dram"]), hashes, st.integers(0, 9)),
    max_size=12,
)
xfer_items = st.lists(
    st.tuples(nodes, st.text("xyz", min_size=1, max_size=3), hashes, st.sampled_from(list(TransferStatus))),
    max_size=8,
)


def _catalog(copies: list[Any], xfers: list[Any]) -> list[tuple[str, str, Any]]:
    items: dict[tuple[str, str], Any] = {}
    for n, model, kind, h, ms in copies:
        items[(n, copy_key(model, kind))] = CopyRecord(h, 10, published_ms=ms).to_value()
    for n, tid, h, status in xfers:
        items[(n, xfer_key(tid))] = XferRecord("m", "disk", status, h).to_value()
    items[("e", copy_key("m", "disk") + "x")] = "not a record"  # a hostile value is skipped
    items[("b", xfer_key("bad"))] = {"status": "exploded"}
    return [(n, k, v) for (n, k), v in items.items()]


@SETTINGS
@given(copy_items, xfer_items, hashes, nodes, st.sets(nodes))
def test_holders_are_the_reachable_copies_and_running_transfers(copies, xfers, h, me, up) -> None:  # type: ignore[no-untyped-def]
    items = _catalog(copies, xfers)
    got = holders(items, h, me, lambda n: n in up)
    # the last record of a key wins in the catalog: the truth is what it holds
    whole = {n for n, k, v in items if k.startswith("copy/") and isinstance(v, dict) and v["manifest_hash"] == h} - {me}
    fetching = {n for n, k, v in items if k.startswith("xfer/") and isinstance(v, dict) and v.get("manifest_hash") == h
                and v.get("status") == "running"} - {me}
    assert got.complete == frozenset(whole & up)
    assert got.nodes == frozenset((whole | fetching) & up)
    assert got.complete <= got.nodes and me not in got.nodes


@SETTINGS
@given(copy_items, nodes, st.sets(nodes))
def test_the_source_copy_is_the_most_held_or_the_named_one(copies, me, up) -> None:  # type: ignore[no-untyped-def]
    items = _catalog(copies, [])
    mine = [(n, k, v) for n, k, v in items if k in (copy_key("m", "disk"), copy_key("m", "dram"))]
    got = source_manifest_hash(items, "m", None, me, lambda n: n in up)
    counted = [v for n, _k, v in mine if n == me or n in up]
    if not counted:
        assert got is None
    else:
        votes = {h: sum(1 for v in counted if v["manifest_hash"] == h) for h in HASHES}
        assert got is not None and votes[got] == max(votes.values())
    for n, k, v in mine:  # a named device picks its copy, reachable or not
        device = f"{n}:{k.rsplit('@', 1)[1]}"
        assert source_manifest_hash(items, "m", device, me, lambda _n: False) == v["manifest_hash"]
    assert source_manifest_hash(items, "m", "nobody:disk", me, lambda _n: True) is None


def test_equal_votes_pick_the_newest_copy() -> None:
    items = [("a", copy_key("m", "disk"), CopyRecord(HASHES[0], 1, published_ms=5).to_value()),
             ("b", copy_key("m", "disk"), CopyRecord(HASHES[1], 1, published_ms=9).to_value())]
    assert source_manifest_hash(items, "m", None, "z", lambda _n: True) == HASHES[1]


claim_items = st.lists(
    st.tuples(nodes, st.sampled_from(["s1", "s2"]), st.sampled_from(list(TransferStatus)), st.none() | st.integers(0, 9)),
    max_size=10,
)


@SETTINGS
@given(claim_items, nodes, st.sets(nodes))
def test_only_active_claims_of_reachable_nodes_count(raw, me, up) -> None:  # type: ignore[no-untyped-def]
    items = [(n, xfer_key(f"t{i}"), XferRecord("m", "disk", status, None, source_id=sid,
                                               claim=None if c is None else Stamp(c, 0, n)).to_value())
             for i, (n, sid, status, c) in enumerate(raw)]
    got = live_claims([*items, ("a", xfer_key("junk"), 17)], "s1", me, lambda n: n in up)
    want = sorted((Stamp(c, 0, n), n) for n, sid, status, c in raw
                  if sid == "s1" and status.active and c is not None and (n == me or n in up))
    assert sorted((cl.stamp, cl.node_id) for cl in got) == want


def test_a_mesh_copy_of_a_source_is_used_only_where_it_can_be_had() -> None:
    items = [("a", src_key("s1"), SrcRecord("s1", HASHES[0], "m").to_value()),
             ("b", src_key("s1"), SrcRecord("s1", HASHES[1], "m").to_value()),
             ("b", src_key("junk"), [1, 2])]
    assert mesh_copy(items, "s1", lambda h: h == HASHES[1]) == HASHES[1]
    assert mesh_copy(items, "s1", lambda _h: False) is None
    assert mesh_copy(items, "s2", lambda _h: True) is None


@SETTINGS
@given(st.lists(st.sampled_from(list(TransferStatus)), max_size=6))
def test_a_transfer_moves_only_along_its_table(path: list[TransferStatus]) -> None:
    cur = TransferStatus.QUEUED
    for nxt in path:
        if nxt in TRANSITIONS[cur]:
            cur = advance(cur, nxt)
        else:
            with pytest.raises(IllegalTransition):
                advance(cur, nxt)
    assert not TRANSITIONS[TransferStatus.DONE] and not TRANSITIONS[TransferStatus.FAILED]  # the ends are ends


# -- typed peer actions ----------------------------------------------------------------------

devices = st.builds(lambda n, k: f"{n}:{k}", nodes, st.sampled_from(["disk", "dram"]))
patterns = st.none() | st.lists(st.text("ab*.", min_size=1, max_size=5), max_size=3).map(tuple)
sources = st.one_of(
    st.builds(CopyOf, st.none() | devices),
    st.builds(LocalPath, st.text("abc/", max_size=10).map(lambda p: "/" + p)),
    st.builds(Web, st.sampled_from(["hf://acme/m", "https://x.example/m.bin"]),
              st.none() | st.sampled_from(["main", "abc123"]), patterns, patterns),
)
actions = st.one_of(
    st.builds(DeleteCopy, st.sampled_from(["m", "acme/m"]), st.sampled_from(["disk", "dram"])),
    st.builds(lambda m, k, s, h, keep: StartTransfer(m, k, s, h if isinstance(s, CopyOf) else None,
                                                     keep if isinstance(s, CopyOf) else True),
              st.sampled_from(["m", "acme/m"]), st.sampled_from(["disk", "dram"]), sources,
              st.none() | hashes, st.booleans()),
)


@SETTINGS
@given(actions)
def test_every_action_crosses_the_peer_route_unchanged(a: Any) -> None:
    assert decode_action(encode_action(a)) == a
    if isinstance(a, StartTransfer):
        src = a.source
        options = src.options() if isinstance(src, Web) else None
        assert source_from_text(source_text(src), options) == src


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"op": "transfer", "model": "m", "kind": "disk", "keep_source": "false"}, "keep_source must be true or false"),
        ({"op": "transfer", "model": "m", "kind": "disk", "keep_source": 0}, "keep_source must be true or false"),
        ({"op": "transfer", "model": "m", "kind": "gpu0"}, "no device"),
        ({"op": "transfer", "model": "m", "kind": "disk", "source": "n1:gpu0"}, "node:disk or node:dram"),
        ({"op": "transfer", "model": "m", "kind": "disk", "manifest_hash": "XYZ"}, "manifest_hash"),
        ({"op": "transfer", "model": "../m", "kind": "disk"}, "relative segment"),
        ({"op": "explode", "model": "m", "kind": "disk"}, "unknown action"),
        ({"op": "delete_copy", "model": "m", "kind": "disk", "purge": True}, "unknown fields"),
        ({"op": "ingest", "model": "m", "kind": "disk", "path": "relative"}, "absolute path"),
        ({"op": "fetch", "model": "m", "kind": "disk", "source_url": "ftp://x"}, "URL"),
        ({"op": "fetch", "model": "m", "kind": "disk", "source_url": "hf://a/b", "options": {"token": "x"}}, "options"),
        ([], "JSON object"),
    ],
)
def test_a_bad_action_is_refused_with_a_reason(raw: Any, needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        decode_action(raw)


# -- one model, one content ---------------------------------------------------------


def _copy(nid: str, model: str, h: str) -> tuple[str, str, Any]:
    return (nid, copy_key(model, "disk"), CopyRecord(h, 10).to_value())


def _src(nid: str, sid: str, h: str, model: str) -> tuple[str, str, Any]:
    return (nid, src_key(sid), SrcRecord(sid, h, model).to_value())


def test_content_conflict_names_a_copy_with_other_bytes() -> None:
    items = [_copy("a", "m", "h1"), _copy("b", "other", "h2"), ("c", copy_key("m", "disk"), {"bad": 1})]
    assert content_conflict(items, "m", "h1") is None
    assert content_conflict(items, "m", "h2") == "a:disk"
    assert content_conflict(items, "nobody", "h2") is None


@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(["h1", "h2"])), max_size=4),
       st.booleans(), st.sets(st.sampled_from("abc")))
def test_a_fetch_is_refused_before_it_starts_exactly_when_it_could_only_conflict(
        copies: list[tuple[str, str]], purged: bool, up: set[str]) -> None:
    """``fetch_conflict`` names a copy iff one of the model's copies, not going
    away under a purge, holds bytes no node made from this source."""
    src = [_src("z", "S", "h1", "m"), _src("z", "T", "h2", "m")]
    items = [_copy(n, "m", h) for n, h in copies]
    got = fetch_conflict(items, src, "m", "S", purged=purged, reachable=up.__contains__)
    blocking = [f"{n}:disk" for n, h in copies if h != "h1" and not (purged and n in up)]
    assert (got is None) == (not blocking)
    assert got is None or got in blocking
