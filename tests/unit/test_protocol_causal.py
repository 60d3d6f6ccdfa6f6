"""The causality token of a write, and whether a catalog has seen it."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.catalog import Catalog
from protocol.causal import After, seen
from protocol.errors import LocalProtocolError


@given(st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True), st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1))
def test_a_token_reads_back(node: str, gen: int, ver: int) -> None:
    a = After(node, gen, ver)
    assert After.parse(a.text()) == a


@pytest.mark.parametrize("text", ["", "a:1", "a:1:2:3", "a:x:1", "a:-1:2", "a b:1:2", "a:1:" + "9" * 30, "é:1:2"])
def test_a_bad_token_is_refused(text: str) -> None:
    with pytest.raises(LocalProtocolError):
        After.parse(text)


def test_a_catalog_has_seen_a_write_once_it_holds_it_or_later() -> None:
    writer = Catalog("w", 5)
    writer.set("k0", 0, 0.0)
    early = After.of(writer)
    writer.set("k1", 1, 0.0)
    token = After.of(writer)
    assert token == After("w", 5, writer.own.max_version) and token.version > early.version
    assert seen(writer, token)
    reader = Catalog("r", 1)
    assert not seen(reader, early)  # never heard of w
    for d in writer.delta_for(reader.digest(), 1 << 20, random.Random(0)):
        reader.apply_delta(d, 0.0)
    assert seen(reader, early) and seen(reader, token)
    assert not seen(reader, After("w", 5, token.version + 1))  # a later write of w
    assert seen(reader, After("w", 4, 10**9))  # an older generation of w: superseded
    assert not seen(reader, After("w", 6, 0))  # w restarted since: not yet heard
