from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from protocol.hlc import Stamp
from protocol.transfer.claims import Claim, choose_fetcher, source_id

claims = st.lists(
    st.builds(lambda w, lg, n: Claim(Stamp(w, lg, n), n), st.integers(0, 10), st.integers(0, 3), st.sampled_from("abcde")),
    max_size=8,
)


@given(claims, st.randoms())
def test_every_node_picks_the_same_fetcher_whatever_order_it_saw_claims(cs: list[Claim], rnd) -> None:  # type: ignore[no-untyped-def]
    shuffled = list(cs)
    rnd.shuffle(shuffled)
    assert choose_fetcher(cs) == choose_fetcher(shuffled)


def test_the_earliest_claim_fetches_and_the_node_id_breaks_ties() -> None:
    early, late = Stamp(100, 0, "z"), Stamp(100, 1, "a")
    assert choose_fetcher([Claim(late, "a"), Claim(early, "z")]) == "z"  # the stamp first, not the name
    assert choose_fetcher([Claim(Stamp(200, 0, "b"), "b"), Claim(Stamp(200, 0, "a"), "a")]) == "a"
    assert choose_fetcher([Claim(Stamp(99, 5, "q"), "q"), Claim(early, "z")]) == "q"  # wall time before logical
    assert choose_fetcher([]) is None


def test_source_id_is_canonical() -> None:
    assert source_id("hf:o/m", "abc", ["*.json", "*.safetensors"]) == source_id("hf:o/m/", "abc", ["*.safetensors", "*.json"])
    assert source_id("hf:o/m", "abc") != source_id("hf:o/m", "abd")
    # What is left out changes the bytes too, and its order does not.
    assert source_id("hf:o/m", "abc", ignore=["*.bin", "*.pt"]) == source_id("hf:o/m", "abc", ignore=["*.pt", "*.bin"])
    assert source_id("hf:o/m", "abc", ignore=["*.bin"]) != source_id("hf:o/m", "abc")
    assert source_id("hf:o/m", "abc", allow=["*.bin"]) != source_id("hf:o/m", "abc", ignore=["*.bin"])
