"""Peer request signatures: what the MAC binds, freshness, replays, rotation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.peerauth import WINDOW_MS, PeerAuthError, ReplayGuard, parse_header, sign, verify

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)
NOW = 1_800_000_000_000
SECRET = "s" * 40
NONCE = bytes(range(16))


def _check(header: str, method: str = "POST", target: bytes = b"/mesh/v1/msg", body: bytes = b"m",
           secrets: tuple[str, ...] = (SECRET,), guard: ReplayGuard | None = None, now: int = NOW) -> str:
    return verify(parse_header(header, now), secrets, method, target, body, ReplayGuard() if guard is None else guard)


def test_roundtrip_and_the_secret_is_not_in_the_header() -> None:
    h = sign(SECRET, "n1", "POST", b"/mesh/v1/msg", b"m", NOW, NONCE)
    assert SECRET not in h and h.startswith("v1 sender=n1 ")
    assert _check(h) == "n1"


@SETTINGS
@given(
    field=st.sampled_from(["method", "target", "body", "sender", "ts", "nonce", "secret"]),
    body=st.binary(max_size=64),
)
def test_changing_anything_the_mac_covers_is_refused(field: str, body: bytes) -> None:
    h = sign(SECRET, "n1", "POST", b"/mesh/v1/actions?x=1", body, NOW, NONCE)
    assert _check(h, target=b"/mesh/v1/actions?x=1", body=body) == "n1"
    kw: dict[str, object] = {"target": b"/mesh/v1/actions?x=1", "body": body}
    if field == "method":
        kw["method"] = "GET"
    elif field == "target":
        kw["target"] = b"/mesh/v1/actions?x=2"
    elif field == "body":
        kw["body"] = body + b"!"
    elif field == "secret":
        kw["secrets"] = ("other" * 8,)
    elif field == "sender":
        h = h.replace("sender=n1", "sender=n2")
    elif field == "ts":
        h = h.replace(f"ts={NOW}", f"ts={NOW + 1}")
    else:
        h = h.replace(NONCE.hex(), bytes(16).hex())
    with pytest.raises(PeerAuthError, match="does not match"):
        _check(h, **kw)  # type: ignore[arg-type]


def test_rotation_accepts_any_of_the_secrets() -> None:
    h = sign("new" * 10, "n1", "POST", b"/p", b"", NOW, NONCE)
    assert _check(h, target=b"/p", body=b"", secrets=("old" * 10, "new" * 10)) == "n1"
    with pytest.raises(PeerAuthError):
        _check(h, target=b"/p", body=b"", secrets=("old" * 10,))


def test_a_replay_is_refused() -> None:
    guard = ReplayGuard()
    h = sign(SECRET, "n1", "POST", b"/mesh/v1/msg", b"m", NOW, NONCE)
    assert _check(h, guard=guard) == "n1"
    with pytest.raises(PeerAuthError, match="replayed"):
        _check(h, guard=guard)


def test_a_forged_mac_does_not_spend_the_nonce() -> None:
    guard = ReplayGuard()
    h = sign(SECRET, "n1", "POST", b"/mesh/v1/msg", b"m", NOW, NONCE)
    with pytest.raises(PeerAuthError, match="does not match"):
        _check(h, body=b"forged", guard=guard)
    assert _check(h, guard=guard) == "n1"  # the genuine request still goes through


@pytest.mark.parametrize("skew_ms", [-WINDOW_MS - 1, WINDOW_MS + 1, -10**9, 10**12])
def test_stale_or_future_requests_are_refused_with_the_skew(skew_ms: int) -> None:
    h = sign(SECRET, "n1", "POST", b"/p", b"", NOW + skew_ms, NONCE)
    with pytest.raises(PeerAuthError, match="NTP") as e:
        parse_header(h, NOW)
    assert e.value.skew_ms == skew_ms
    parse_header(sign(SECRET, "n1", "POST", b"/p", b"", NOW + WINDOW_MS, NONCE), NOW)  # the edge is in


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer x", "v1 sender=n1", "v2 sender=n1 ts=1 nonce=" + "0" * 32 + " mac=" + "0" * 64,
     "v1 sender=a/b ts=1 nonce=" + "0" * 32 + " mac=" + "0" * 64,
     "v1 sender=n1 ts=-1 nonce=" + "0" * 32 + " mac=" + "0" * 64,
     "v1 sender=n1 ts=1 nonce=" + "0" * 31 + " mac=" + "0" * 64,
     "v1 sender=n1 ts=1 nonce=" + "0" * 32 + " mac=" + "0" * 64 + " extra",
     "v1 sender=" + "n" * 65 + " ts=1 nonce=" + "0" * 32 + " mac=" + "0" * 64],
)
def test_malformed_credentials_are_refused(header: str | None) -> None:
    with pytest.raises(PeerAuthError):
        parse_header(header, 1)


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, WINDOW_MS)), max_size=200), st.integers(1, 20))
def test_the_guard_is_bounded_and_never_accepts_a_nonce_twice(spends: list[tuple[int, int]], bound: int) -> None:
    """Whatever the order and however full: memory stays under the bound, and
    one request (a nonce with its stamp: a replay repeats both, as the MAC
    covers both) is accepted at most once."""
    guard = ReplayGuard(max_nonces=bound)
    accepted: set[tuple[str, int]] = set()
    for n, offset in spends:
        request = (f"{n:032x}", NOW + offset)
        if guard.spend(*request):
            assert request not in accepted
            accepted.add(request)
        assert len(guard) <= bound


def test_the_guard_forgets_what_the_window_refuses_anyway() -> None:
    guard = ReplayGuard(max_nonces=10)
    for i in range(5):
        assert guard.spend(f"{i:032x}", NOW)
    assert guard.spend(f"{99:032x}", NOW + 3 * WINDOW_MS)
    assert len(guard) == 1 and guard.floor_ms == -1  # expired, not forgotten under pressure
