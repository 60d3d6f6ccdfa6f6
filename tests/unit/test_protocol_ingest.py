from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from protocol.hlc import Stamp
from protocol.ingest import Claim, choose_fetcher, source_id

claims = st.lists(
    st.builds(lambda w, lg, n: Claim(Stamp(w, lg, n), n), st.integers(0, 10), st.integers(0, 3), st.sampled_from("abcde")),
    max_size=8,
)


@given(claims, st.randoms())
def test_every_node_picks_the_same_fetcher_whatever_order_it_saw_claims(cs: list[Claim], rnd) -> None:  # type: ignore[no-untyped-def]
    shuffled = list(cs)
    rnd.shuffle(shuffled)
    assert choose_fetcher(cs) == choose_fetcher(shuffled)
    if cs:
        assert choose_fetcher(cs) == min(cs).node_id


def test_source_id_is_canonical() -> None:
    assert source_id("hf:o/m", "abc", ["*.json", "*.safetensors"]) == source_id("hf:o/m/", "abc", ["*.safetensors", "*.json"])
    assert source_id("hf:o/m", "abc") != source_id("hf:o/m", "abd")
    assert choose_fetcher([]) is None
