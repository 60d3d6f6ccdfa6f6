"""Leases and ensure's decision (protocol/leases.py): a lease keeps its copy
until it ends, renewed in place, released, bounded; the book survives its
own encoding and drops what does not parse; ensure does the one step the
state calls for, and says why when there is none."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.leases import (
    LEASE_DEFAULT_S,
    LEASE_MAX_S,
    EnsureStep,
    InvalidLease,
    Lease,
    LeaseBook,
    plan_ensure,
    validate_holder,
)

WEB = ("hf://", "http://", "https://", "s3://", "file://")


def test_a_lease_keeps_its_copy_until_it_ends_and_is_renewed_in_place() -> None:
    book = LeaseBook()
    book.grant("acme/m", "disk", "pod-a", 10, now_ms=1000)
    assert book.keep_reason("acme/m", "disk", 5000) is not None and "pod-a" in book.keep_reason("acme/m", "disk", 5000)
    assert book.keep_reason("acme/m", "dram", 5000) is None and book.keep_reason("acme/x", "disk", 5000) is None
    assert book.keep_reason("acme/m", "disk", 11_000) is None  # ended on its own
    book.grant("acme/m", "disk", "pod-a", 10, now_ms=9000)  # renewed: the same holder, one lease
    assert len(book) == 1 and book.keep_reason("acme/m", "disk", 15_000) is not None
    book.grant("acme/m", "disk", "pod-b", None, now_ms=9000)
    assert "and 1 more" in (book.keep_reason("acme/m", "disk", 10_000) or "")
    assert [x.holder for x in book.release("acme/m", "disk", "pod-a")] == ["pod-a"]
    assert book.keep_reason("acme/m", "disk", 10_000) is not None  # pod-b's still holds
    assert book.holding("acme/m", "disk", 10_000)[0].until_ms == 9000 + int(LEASE_DEFAULT_S * 1000)
    assert [x.holder for x in book.release("acme/m", "disk", None)] == ["pod-b"]
    assert book.keep_reason("acme/m", "disk", 10_000) is None


def test_what_a_lease_may_be() -> None:
    book = LeaseBook(leases_max=2)
    for bad in ({"lease_s": 0}, {"lease_s": LEASE_MAX_S + 1}, {"lease_s": True}, {"lease_s": "60"},
                {"holder": "-x"}, {"holder": "a" * 129}, {"holder": "a b"}, {"tier": "gpu0"}):
        kw: dict[str, Any] = {"model": "m", "tier": "disk", "holder": "h", "lease_s": 60, **bad}
        with pytest.raises(InvalidLease):
            book.grant(kw["model"], kw["tier"], kw["holder"], kw["lease_s"], 0)
    book.grant("m1", "disk", "h", 1, 0)
    book.grant("m2", "disk", "h", 60, 0)
    with pytest.raises(InvalidLease) as e:
        book.grant("m3", "disk", "h", 60, 0)
    assert e.value.code == "TOO_MANY_LEASES"
    book.grant("m3", "disk", "h", 60, 5000)  # the ended one made room
    assert sorted(x.model for x in book.active(5000)) == ["m2", "m3"]
    assert validate_holder("vllm-7f9c8d-x2v:0") == "vllm-7f9c8d-x2v:0"


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=10), kids, max_size=5),
                    max_leaves=10))
def test_the_book_survives_its_encoding_and_drops_what_does_not_parse(junk: Any) -> None:
    book = LeaseBook()
    book.grant("acme/m", "disk", "pod-a", 60, 1000)
    book.grant("n", "dram", "pod-b", 30, 2000)
    again = LeaseBook.from_value(book.to_value())
    assert again.active(2000) == book.active(2000)
    mixed = book.to_value()
    mixed["leases"].append(junk)
    assert LeaseBook.from_value(mixed).active(2000) == book.active(2000)
    LeaseBook.from_value(junk)  # never raises
    assert Lease.from_value(book.active(0)[0].to_value()) == book.active(0)[0]


def plan(**kw: Any) -> Any:
    args: dict[str, Any] = {"here": False, "making": False, "holders": [], "registered": True, "source_url": None,
                            "web_schemes": WEB, "down_holders": {}}
    args.update(kw)
    return plan_ensure("acme/m", "n2:disk", **args)


def test_ensure_does_the_one_step_the_state_calls_for() -> None:
    assert plan(here=True, making=True, holders=["n1"]).step is EnsureStep.READY
    assert plan(making=True, holders=["n1"]).step is EnsureStep.WAIT
    p = plan(holders=["n3", "n1"], source_url="hf://acme/m")
    assert p.step is EnsureStep.COPY and "n1, n3" in p.why  # the mesh before the internet
    assert plan(source_url="hf://acme/m").step is EnsureStep.FETCH
    assert plan(source_url="file:///srv/m").step is EnsureStep.FETCH
    for p, says in ((plan(registered=False), "not registered"), (plan(), "names no source"),
                    (plan(source_url="ftp://x"), "names no source"),
                    (plan(down_holders={"n1": "dead"}), "n1 (dead)")):
        assert p.step is EnsureStep.NO_SOURCE and says in p.why and "n2:disk" in p.why, p.why
