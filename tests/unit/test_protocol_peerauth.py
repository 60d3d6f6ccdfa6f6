"""Peer request signatures: what the MAC binds, freshness, replays, rotation,
the receiver (node id and generation) and the hint of a new generation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.peerauth import (
    WINDOW_MS,
    PeerAuthError,
    Recipient,
    ReplayGuard,
    nonce_of,
    parse_header,
    read_hint,
    sign,
    sign_hint,
    verify,
)

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)
NOW = 1_800_000_000_000
SECRET = "s" * 40
NONCE = bytes(range(16))
ME = Recipient("n0", NOW - 5_000)  # the receiver: started 5 s ago


def _check(header: str, method: str = "POST", target: bytes = b"/mesh/v1/msg", body: bytes = b"m",
           secrets: tuple[str, ...] = (SECRET,), guard: ReplayGuard | None = None, now: int = NOW,
           me: Recipient = ME, unbound_ok: bool = True) -> str:
    return verify(parse_header(header, now), secrets, method, target, body, ReplayGuard() if guard is None else guard,
                  me=me, unbound_ok=unbound_ok)


def test_roundtrip_and_the_secret_is_not_in_the_header() -> None:
    h = sign(SECRET, "n1", "POST", b"/mesh/v1/msg", b"m", NOW, NONCE)
    assert SECRET not in h and h.startswith("v2 sender=n1 to=* gen=* ")
    assert _check(h) == "n1"
    bound = sign(SECRET, "n1", "POST", b"/mesh/v1/actions", b"m", NOW, NONCE, to=ME)
    assert bound.startswith(f"v2 sender=n1 to=n0 gen={ME.generation} ")
    assert _check(bound, target=b"/mesh/v1/actions", unbound_ok=False) == "n1"
    assert parse_header(bound, NOW).to == ME and nonce_of(bound) == NONCE.hex()


@SETTINGS
@given(
    field=st.sampled_from(["method", "target", "body", "sender", "ts", "nonce", "secret", "to", "gen", "unbind"]),
    body=st.binary(max_size=64),
)
def test_changing_anything_the_mac_covers_is_refused(field: str, body: bytes) -> None:
    h = sign(SECRET, "n1", "POST", b"/mesh/v1/actions?x=1", body, NOW, NONCE, to=ME)
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
    elif field == "to":
        h = h.replace("to=n0", "to=n2")
    elif field == "gen":
        h = h.replace(f"gen={ME.generation}", f"gen={ME.generation + 1}")
    elif field == "unbind":
        h = h.replace(f"to=n0 gen={ME.generation}", "to=* gen=*")
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
     "v2 sender=n1 to=n0 gen=* ts=1 nonce=" + "0" * 32 + " mac=" + "0" * 64,  # both or neither
     "v2 sender=n1 to=* gen=5 ts=1 nonce=" + "0" * 32 + " mac=" + "0" * 64,
     "v2 sender=n1 to=n0 gen=05 ts=1 nonce=" + "0" * 32 + " mac=" + "0" * 64,  # one spelling per number
     "v2 sender=n1 to=n0 gen=9999999999999999999 ts=1 nonce=" + "0" * 32 + " mac=" + "0" * 64,
     "v2 sender=n1 to=a/b gen=5 ts=1 nonce=" + "0" * 32 + " mac=" + "0" * 64,
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


# -- the receiver: its node id, its generation, its start ------------------------------------

ids = st.sampled_from(["n0", "n1", "node-2", "a.b_c"])
gens = st.integers(1, 2**63 - 1)


@SETTINGS
@given(to_id=ids, to_gen=gens, me_id=ids, me_gen=gens, target=st.sampled_from([b"/mesh/v1/actions", b"/mesh/v1/msg"]))
def test_a_request_is_good_only_at_the_node_and_generation_it_was_signed_for(
    to_id: str, to_gen: int, me_id: str, me_gen: int, target: bytes
) -> None:
    """Captured on its way to one node, a request does nothing at another, nor
    at the same node's next run (a new generation); the refusal spends nothing."""
    to, me = Recipient(to_id, to_gen), Recipient(me_id, me_gen)
    h = sign(SECRET, "s1", "POST", target, b"m", NOW, NONCE, to=to)
    guard = ReplayGuard(started_ms=NOW - 1)
    if to == me:
        assert _check(h, target=target, guard=guard, me=me, unbound_ok=False) == "s1"
        return
    with pytest.raises(PeerAuthError, match="node" if to_id != me_id else "generation") as e:
        _check(h, target=target, guard=guard, me=me)
    assert (e.value.hint is not None) == (to_id == me_id)  # only our own new generation is told
    assert len(guard) == 0


def test_unbound_requests_pass_only_where_the_route_allows_them() -> None:
    h = sign(SECRET, "s1", "POST", b"/mesh/v1/actions", b"m", NOW, NONCE)
    with pytest.raises(PeerAuthError, match="must name its receiver"):
        _check(h, target=b"/mesh/v1/actions", unbound_ok=False)
    assert _check(h, target=b"/mesh/v1/actions", unbound_ok=True) == "s1"


def test_a_starting_node_takes_no_bound_request() -> None:
    """Generation 0: the node does not know its own yet (a signer never names 0
    knowingly, and nothing signed for 0 must pass once it does)."""
    h = sign(SECRET, "s1", "POST", b"/p", b"m", NOW, NONCE, to=Recipient("n0", 0))
    with pytest.raises(PeerAuthError, match="starting") as e:
        _check(h, target=b"/p", me=Recipient("n0", 0))
    assert e.value.hint is None


@SETTINGS
@given(before_ms=st.integers(1, WINDOW_MS), bound=st.booleans())
def test_nothing_stamped_before_the_start_is_taken(before_ms: int, bound: bool) -> None:
    """The nonces of the previous run are gone: a kill -9 and restart within the
    window must not make its requests new again."""
    guard = ReplayGuard(started_ms=NOW)
    old = sign(SECRET, "s1", "POST", b"/mesh/v1/msg", b"m", NOW - before_ms, NONCE, to=ME if bound else None)
    with pytest.raises(PeerAuthError, match="before this node started"):
        _check(old, guard=guard)
    assert len(guard) == 0
    assert _check(sign(SECRET, "s1", "POST", b"/mesh/v1/msg", b"m", NOW, NONCE, to=ME if bound else None),
                  guard=guard) == "s1"  # the edge is in


@SETTINGS
@given(ahead_ms=st.integers(0, WINDOW_MS), gen_step=st.integers(1, 10**6))
def test_a_restart_does_not_reopen_the_window(ahead_ms: int, gen_step: int) -> None:
    """Run 1 took a request; run 2 (new guard, later start, higher generation)
    refuses it, even from a sender whose clock runs ahead of ours (its stamp
    is then after our new start: the generation refuses it)."""
    run1 = Recipient("n0", NOW - 30_000)
    h = sign(SECRET, "s1", "POST", b"/mesh/v1/actions", b"m", NOW + ahead_ms, NONCE, to=run1)
    assert _check(h, target=b"/mesh/v1/actions", guard=ReplayGuard(started_ms=run1.generation), me=run1,
                  now=NOW + ahead_ms) == "s1"
    run2 = Recipient("n0", run1.generation + gen_step)
    restart_ms = NOW + 1
    with pytest.raises(PeerAuthError):
        _check(h, target=b"/mesh/v1/actions", guard=ReplayGuard(started_ms=restart_ms), me=run2, now=restart_ms)


@SETTINGS
@given(
    told=gens,
    other=st.sampled_from(["nonce", "node", "secret", "gen", "mac", "none"]),
)
def test_the_generation_hint_is_for_that_request_and_node_only(told: int, other: str) -> None:
    me = Recipient("n0", told)
    stale = Recipient("n0", told - 1 if told > 1 else told + 1)
    h = sign(SECRET, "s1", "POST", b"/mesh/v1/actions", b"m", NOW, NONCE, to=stale)
    with pytest.raises(PeerAuthError, match="generation") as e:
        _check(h, target=b"/mesh/v1/actions", me=me, secrets=("old" * 10, SECRET))
    hint = e.value.hint
    assert hint is not None and e.value.headers == {"x-mesh-peer": hint}
    assert read_hint(hint, (SECRET,), NONCE.hex(), "n0") == me  # signed with the secret that matched
    nonce, node, secrets = NONCE.hex(), "n0", (SECRET,)
    if other == "nonce":
        nonce = bytes(16).hex()  # a hint for another request
    elif other == "node":
        node = "n1"
    elif other == "secret":
        secrets = ("x" * 40,)
    elif other == "gen":
        hint = hint.replace(f"gen={told} ", f"gen={told + 1} ")
    elif other == "mac":
        hint = hint[:-1] + ("0" if hint[-1] != "0" else "1")
    else:
        hint = ""
    assert read_hint(hint, secrets, nonce, node) is None


def test_no_hint_without_a_matching_mac() -> None:
    h = sign("x" * 40, "s1", "POST", b"/p", b"m", NOW, NONCE, to=Recipient("n0", 1))
    with pytest.raises(PeerAuthError, match="does not match") as e:
        _check(h, target=b"/p")
    assert e.value.hint is None and e.value.headers == {}
    assert read_hint(sign_hint(SECRET, ME, NONCE.hex()), (SECRET,), NONCE.hex(), "n0") == ME
