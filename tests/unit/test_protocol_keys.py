"""Catalog key families and their typed records."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.hlc import Stamp
from protocol.keys import (
    STORAGE_SLACK,
    STORAGE_SLACK_MAX,
    TRANSITIONS,
    CopyRecord,
    ErrorRecord,
    LocOp,
    LocRecord,
    NodeInfo,
    RecordError,
    RegOp,
    RegRecord,
    SrcRecord,
    Storage,
    TierUsage,
    TransferStatus,
    XferRecord,
    copy_key,
    loc_key,
    model_of_key,
    parse_copy_key,
    parse_loc_key,
    reg_key,
    src_key,
    xfer_key,
)

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)

stamps = st.builds(Stamp, st.integers(0, 2**62), st.integers(0, 2**31), st.text(min_size=1, max_size=10))
small = st.integers(0, 2**40)
texts = st.text(max_size=30)
records = st.one_of(
    st.builds(RegRecord, stamps, stamps, st.just(RegOp.REGISTER), st.none() | texts, st.none() | texts,
              st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)),
    st.builds(RegRecord, stamps, stamps, st.just(RegOp.UNREGISTER), purged=st.booleans()),
    st.builds(LocRecord, stamps, st.sampled_from(list(LocOp))),
    st.builds(CopyRecord, st.text("0123456789abcdef", min_size=32, max_size=32), small, small, small, small),
    st.builds(XferRecord, texts, st.sampled_from(["disk", "dram"]), st.sampled_from(list(TransferStatus)),
              st.none() | st.text("0123456789abcdef", min_size=32, max_size=32), small, small, small,
              st.lists(texts, max_size=3).map(tuple), st.none() | st.builds(ErrorRecord, st.text(max_size=10), texts),
              small, small, texts, small, small, st.none() | texts, st.none() | stamps, small, small, small),
    st.builds(SrcRecord, texts, st.text("0123456789abcdef", max_size=32), texts, st.none() | texts),
    st.builds(NodeInfo, texts, texts, small, st.integers(1, 65535)),
    st.builds(Storage, st.dictionaries(st.sampled_from(["disk", "dram"]), st.builds(TierUsage, small, small, small))),
)


@SETTINGS
@given(records)
def test_every_record_roundtrips(rec: Any) -> None:
    assert type(rec).from_value(rec.to_value()) == rec


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | st.binary(max_size=5),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=15,
)
FIELDS = ["stamp", "since", "op", "model_type", "source_url", "metadata", "manifest_hash", "size", "files", "model",
          "kind", "status", "bytes_done", "sources", "error", "claim", "source_id", "address", "version", "data_port",
          "disk", "total", "used", "free"]


@SETTINGS
@given(st.one_of(junk, st.dictionaries(st.sampled_from(FIELDS), junk, max_size=8)),
       st.sampled_from([RegRecord, LocRecord, CopyRecord, XferRecord, SrcRecord, NodeInfo, Storage]))
def test_any_value_is_a_record_or_one_error(raw: Any, cls: Any) -> None:
    """What a peer (or an older version) wrote is either a record or a
    RecordError: never a KeyError, TypeError or ValueError."""
    try:
        rec = cls.from_value(raw)
    except RecordError:
        return
    assert type(rec) is cls


def test_keys_parse_back() -> None:
    assert model_of_key(reg_key("acme/m")) == "acme/m"
    assert parse_loc_key(loc_key("acme/m", "n1:gpu0")) == ("acme/m", "n1:gpu0")
    assert parse_copy_key(copy_key("acme/m", "dram")) == ("acme/m", "dram")
    assert model_of_key(copy_key("m", "disk")) == "m" and model_of_key("node") is None
    assert model_of_key("loc/no-device") is None and parse_copy_key("copy/@disk") is None
    assert xfer_key("ab12").startswith("xfer/") and src_key("hf:x@1") == src_key("hf:x@1") != src_key("hf:x@2")


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ({"manifest_hash": "h", "size": -1}, "size"),
        ({"manifest_hash": "h", "size": True}, "size"),
        ({"manifest_hash": 5, "size": 1}, "manifest_hash"),
        ({"address": "a:1", "version": "1", "started_ms": 0, "data_port": 70000}, "data_port"),
        ({"model": "m", "kind": "disk", "status": "exploded"}, "status"),
    ],
)
def test_bad_values_say_which_field(raw: dict[str, Any], why: str) -> None:
    cls = {"size": CopyRecord, "manifest_hash": CopyRecord, "data_port": NodeInfo, "status": XferRecord}[why]
    with pytest.raises(RecordError, match=why):
        cls.from_value(raw)


def test_transfer_transitions() -> None:
    q, r, d, f = TransferStatus.QUEUED, TransferStatus.RUNNING, TransferStatus.DONE, TransferStatus.FAILED
    assert q.can_become(r) and r.can_become(d) and r.can_become(f) and r.can_become(q) and q.can_become(f)
    assert not d.can_become(r) and not f.can_become(q) and not q.can_become(d)
    assert set(TRANSITIONS) == set(TransferStatus)
    assert [s for s in TransferStatus if s.active] == [q, r] and [s for s in TransferStatus if s.finished] == [d, f]


def test_a_transfer_has_one_shape_whichever_node_shows_it() -> None:
    """The node running a transfer shows its live state; the others read its
    catalog record: the same keys, and no URL secret in either."""
    from meshnode.copies.transfer import Transfer
    from meshnode.copies.transfers import _from_catalog
    from protocol.actions import CopyOf, LocalPath, Web
    from protocol.keys import XFER_PREFIX, RecordError, XferRecord

    for src in (Web("https://user:pw@example.org/x.bin?sig=s3cret", revision="main"), CopyOf(), CopyOf("n2:disk"),
                LocalPath("/srv/models/m")):
        t = Transfer(model="org/m", kind="disk", source=src)
        t.banned.append("n9")
        t.fetched = {"revision": "abc", "model_type": "llama"}
        mine = t.public("n1")
        theirs = _from_catalog("n1", XFER_PREFIX + t.id, t.record().to_value())
        assert theirs is not None and sorted(mine) == sorted(theirs)
        for k in ("source", "options", "keep_source", "banned", "fetched", "model_name"):
            assert mine[k] == theirs[k], k
        assert "s3cret" not in str(mine) + str(theirs) and "pw@" not in str(mine) + str(theirs)
    # A record from an older peer (without the new fields) still reads.
    old = {"model": "m", "kind": "disk", "status": "running"}
    rec = XferRecord.from_value(old)
    assert rec.source is None and rec.keep_source is True and rec.banned == () and rec.options == {}
    for bad in ({"banned": "n1"}, {"keep_source": "yes"}, {"options": {"k": {"deep": 1}}},
                {"options": {f"k{i}": 1 for i in range(9)}}, {"fetched": [1]}):
        with pytest.raises(RecordError):
            XferRecord.from_value({**old, **bad})


def test_node_labels_round_trip_and_bad_ones_are_refused() -> None:
    from protocol.keys import NodeInfo, RecordError

    info = NodeInfo("a:7420", "0.1.0", 1, 7421, {"zone": "a"})
    assert NodeInfo.from_value(info.to_value()) == info
    old = {"address": "a:7420", "version": "0.1.0", "started_ms": 1, "data_port": 7421}  # an older peer's
    assert NodeInfo.from_value(old).labels == {}
    for bad in ("zone=a", {"zone": 1}, {"z one": "a"}, {f"k{i}": "v" for i in range(17)}):
        with pytest.raises(RecordError):
            NodeInfo.from_value({**old, "labels": bad})


@given(st.integers(0, 1 << 44), st.integers(0, 1 << 44), st.integers(-(1 << 33), 1 << 33))
def test_storage_is_news_only_when_it_moved_enough(total: int, free: int, delta: int) -> None:
    """A tier's drift within its slack (1% of its size, at most 1 GiB) is not
    gossiped again; past it, or a tier's size or set changing, always is."""
    free = min(free, total)
    was = Storage({"disk": TierUsage(total, total - free, free)})
    moved_free = max(0, min(total, free + delta))
    now = Storage({"disk": TierUsage(total, total - moved_free, moved_free)})
    slack = min(total * STORAGE_SLACK, STORAGE_SLACK_MAX)
    assert now.moved(was) == (abs(moved_free - free) > slack)
    assert now.moved(None)
    assert Storage({"disk": TierUsage(total + 1, total - free, free)}).moved(was)
    assert Storage({**was.tiers, "dram": TierUsage(1, 0, 1)}).moved(was)
