"""The HAVE bitfield the store builds is read back the way the data plane orders bits."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshnode.copies.puller import bits_of, full_bitfield


@given(st.integers(min_value=0, max_value=200))
def test_full_bitfield_has_exactly_n_chunks(n: int) -> None:
    assert bits_of(full_bitfield(n), n) == set(range(n))
    assert bits_of(full_bitfield(n), n + 8) == set(range(n))


def test_bit_order_is_msb_first() -> None:
    assert full_bitfield(3) == bytes([0b1110_0000])
    assert bits_of(bytes([0x80, 0x01]), 16) == {0, 15}
