"""Sizes as people read them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from protocol.units import human_bytes


def test_sizes_read_as_rich_and_hf_print_them() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(25165953) == "24.0 MiB"
    assert human_bytes(int(1.2 * 2**30)) == "1.2 GiB"
    assert human_bytes(-7340161) == "-7.0 MiB"
    assert human_bytes(2**70) == "1024.0 EiB"


@given(st.integers(min_value=-(2**80), max_value=2**80))
def test_every_size_is_a_short_number_and_a_unit(n: int) -> None:
    value, unit = human_bytes(n).split(" ")
    assert unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    assert len(value.lstrip("-")) <= 7 or unit == "EiB"
