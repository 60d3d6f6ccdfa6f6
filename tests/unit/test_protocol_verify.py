"""The re-verify schedule (``protocol.verify``), by property: every chunk
once a round, a round in about one period, never past the rate, urgent
requests first and bounded, any saved cursor and any change of the copies
taken in stride."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.actions import VerifyCopy, decode_action, encode_action
from protocol.errors import LocalProtocolError
from protocol.manifest import CHUNK_BYTES_FLOOR, Manifest, ManifestBuilder
from protocol.registry import InvalidInput
from protocol.verify import BURST_S, Step, VerifySchedule

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)
CB = CHUNK_BYTES_FLOOR  # 64 KiB chunks


def manifest(sizes: list[int], salt: int = 0) -> Manifest:
    b = ManifestBuilder(CB)
    for i, size in enumerate(sizes):
        n = (size + CB - 1) // CB
        b.add_file(f"f{i}.bin", size, [bytes([salt % 256]) * 16] * n)
    return b.build()


sizes = st.lists(st.integers(0, 5 * CB + 7), min_size=1, max_size=4)
stores = st.dictionaries(st.sampled_from([f"{c * 32}@disk" for c in "abcdef"]), sizes, min_size=1, max_size=4).map(
    lambda d: {k: manifest(v, i) for i, (k, v) in enumerate(sorted(d.items()))})


def every_chunk(copies: dict[str, Manifest]) -> list[tuple[str, int]]:
    return [(k, i) for k, m in sorted(copies.items()) for i in range(m.n_chunks)]


def run(s: VerifySchedule, copies: dict[str, Manifest], now: float, reads: int,
        dts: list[float] | None = None) -> tuple[list[tuple[float, Step]], float]:
    """Take ``reads`` chunks' worth of steps, waiting as told (or ``dts`` between decisions)."""
    out: list[tuple[float, Step]] = []
    n, k = 0, 0
    for _ in range(100_000):
        if n >= reads:
            break
        d = s.decide(copies, now)
        if d.step is not None:
            out.append((now, d.step))
            n += d.step.count
        assert d.step is not None or d.wait_s > 0
        if dts is not None:
            now += dts[k % len(dts)]
            k += 1
        elif d.step is None:
            assert math.isfinite(d.wait_s)
            now += d.wait_s
    else:
        raise AssertionError("no progress")
    return out, now


@SETTINGS
@given(stores, st.floats(1.0, 1e6), st.floats(0.1, 1e9))
def test_a_round_reads_every_chunk_once_and_then_starts_again(
        copies: dict[str, Manifest], period_s: float, rate: float) -> None:
    s = VerifySchedule(period_s, rate)
    want = every_chunk(copies)
    steps, _ = run(s, copies, 0.0, 2 * len(want))
    read = [(st.key, i) for _, st in steps for i in st.chunks]
    assert read[: len(want)] == want  # in key order, chunk by chunk, each once
    assert read[len(want): 2 * len(want)] == want[: len(read) - len(want)]
    assert all(not st.urgent for _, st in steps)
    assert s.rounds >= (1 if want else 0)


@SETTINGS
@given(stores, st.floats(10.0, 1e5))
def test_a_round_takes_about_one_period_when_the_rate_allows(copies: dict[str, Manifest], period_s: float) -> None:
    total = sum(m.total_bytes for m in copies.values())
    if total == 0:
        return
    s = VerifySchedule(period_s, rate_bps=1e15)
    n = len(every_chunk(copies))
    steps, _ = run(s, copies, 0.0, n)
    last = steps[-1][0]  # when the round's last chunk was read
    pace = total / period_s
    # Never faster than the pace (one burst and one chunk ahead at most), never much slower.
    assert last >= period_s - BURST_S - CB / pace - 1e-6
    assert last <= period_s * 1.001 + len(steps) * 2e-3
    assert not s.behind


@SETTINGS
@given(stores, st.floats(1.0, 1e4), st.floats(1e3, 1e7),
       st.lists(st.floats(0.0, 3.0), min_size=1, max_size=20),
       st.lists(st.tuples(st.integers(0, 60), st.sampled_from(["a", "b", "c"]), st.integers(0, 40)), max_size=6))
def test_every_read_stays_under_the_rate_urgent_ones_too(
        copies: dict[str, Manifest], period_s: float, rate: float, dts: list[float],
        urgent: list[tuple[int, str, int]]) -> None:
    s = VerifySchedule(period_s, rate, urgent_every_s=5.0)
    keys = sorted(copies)
    now, log = 0.0, []
    asks = sorted(urgent)
    for i in range(300):
        while asks and asks[0][0] <= i:
            _, which, chunk = asks.pop(0)
            s.urgent(keys[ord(which) % len(keys)], chunk, now)
        d = s.decide(copies, now)
        if d.step is not None:
            log.append((now, d.step.nbytes))
            assert d.step.key in copies and 0 <= d.step.first and d.step.first + d.step.count <= copies[d.step.key].n_chunks
        now += dts[i % len(dts)]
    slack = rate * BURST_S + CB
    for i, (t0, _) in enumerate(log):
        spent = 0
        for t1, nbytes in log[i:]:
            spent += nbytes
            assert spent <= rate * (t1 - t0) + slack + 1e-6


@SETTINGS
@given(stores, st.floats(1.0, 100.0))
def test_a_store_too_large_for_its_period_is_read_at_the_rate_and_says_so(
        copies: dict[str, Manifest], rate: float) -> None:
    total = sum(m.total_bytes for m in copies.values())
    if total == 0:
        return
    s = VerifySchedule(1.0, rate)
    s.decide(copies, 0.0)
    assert s.behind == (total > rate)


@SETTINGS
@given(stores, st.data())
def test_an_urgent_request_goes_first_from_its_chunk_and_reads_the_copy_once(
        copies: dict[str, Manifest], data: st.DataObject) -> None:
    keys = [k for k, m in copies.items() if m.n_chunks]
    if not keys:
        return
    key = data.draw(st.sampled_from(keys))
    m = copies[key]
    chunk = data.draw(st.integers(0, m.n_chunks - 1))
    s = VerifySchedule(0, 1e12)  # no round robin: only what is asked
    assert s.decide(copies, 0.0).step is None
    assert s.urgent(key, chunk, 1.0)
    assert not s.urgent(key, 0, 2.0)  # once per urgent_every_s
    steps, _ = run(s, copies, 1.0, m.n_chunks)
    read = [i for _, st in steps for i in st.chunks]
    assert all(st.urgent and st.key == key for _, st in steps)
    assert read == [*range(chunk, m.n_chunks), *range(chunk)]
    assert s.decide(copies, 10.0).step is None  # done: nothing more
    assert not s.urgent(key, 0, 1.0 + s.urgent_every_s - 1)
    assert s.urgent(key, 0, 1.0 + s.urgent_every_s)  # and again, once the while has passed


def test_urgent_requests_are_bounded_and_a_gone_copy_is_dropped() -> None:
    m = manifest([3 * CB])
    copies = {f"{i:032x}@disk": m for i in range(40)}
    s = VerifySchedule(0, 1e12, urgent_max=4)
    assert [s.urgent(k, 0, 0.0) for k in sorted(copies)[:6]] == [True] * 4 + [False] * 2
    first = sorted(copies)[0]
    del copies[first]
    d = s.decide(copies, 0.0)
    assert d.step is not None and d.step.key == sorted(copies)[0]  # the gone one skipped
    with pytest.raises(LocalProtocolError):
        s.urgent("", 0, 0.0)
    with pytest.raises(LocalProtocolError):
        VerifySchedule(1.0, 0.0)
    with pytest.raises(LocalProtocolError):
        VerifySchedule(-1.0, 1.0)


def test_period_zero_reads_nothing_unasked() -> None:
    copies = {"a@disk": manifest([5 * CB])}
    s = VerifySchedule(0, 1e9)
    d = s.decide(copies, 0.0)
    assert d.step is None and d.wait_s == math.inf


@SETTINGS
@given(stores, st.one_of(st.none(), st.integers(-5, 50), st.text(max_size=3), st.floats()),
       st.one_of(st.text(max_size=40), st.integers(), st.none()))
def test_a_saved_cursor_is_taken_up_and_a_hostile_one_is_harmless(
        copies: dict[str, Manifest], chunk: object, key: object) -> None:
    want = every_chunk(copies)
    if not want:
        return
    s = VerifySchedule(1.0, 1e15)
    ok = s.restore(key, chunk)
    assert ok == (isinstance(key, str) and type(chunk) is int and chunk >= 0)
    steps, _ = run(s, copies, 0.0, len(want))
    read = [(st.key, i) for _, st in steps for i in st.chunks]
    if ok and key in copies and isinstance(chunk, int) and chunk < copies[key].n_chunks:
        assert read[0] == (key, chunk)  # goes on where it was
    assert set(read) <= set(want)
    # A cursor it saved itself goes on where it stopped.
    t = VerifySchedule(1.0, 1e15)
    assert s.cursor is not None and t.restore(*s.cursor)
    more, _ = run(t, copies, 0.0, 1)
    nxt = (more[0][1].key, more[0][1].first)
    k, i = s.cursor
    assert nxt == (k, i) or (i >= copies[k].n_chunks and nxt[1] == 0)


ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.sampled_from("abcdefgh"), sizes),
    st.tuples(st.just("drop"), st.sampled_from("abcdefgh"), st.just([])),
    st.tuples(st.just("urgent"), st.sampled_from("abcdefgh"), st.lists(st.integers(-3, 99), min_size=1, max_size=1)),
    st.tuples(st.just("wait"), st.just(""), st.lists(st.floats(0, 1e4), min_size=1, max_size=1)),
), max_size=60)


@SETTINGS
@given(ops, st.floats(0, 1e5).filter(lambda p: p == 0 or p >= 1e-3), st.floats(1.0, 1e9))
def test_copies_coming_and_going_never_break_it(program: list[tuple[str, str, list[Any]]], period_s: float,
                                                rate: float) -> None:
    s = VerifySchedule(period_s, rate)
    copies: dict[str, Manifest] = {}
    now = 0.0
    for op, name, arg in program:
        key = name * 32 + "@disk"
        if op == "add":
            copies[key] = manifest(arg, len(copies))
        elif op == "drop":
            copies.pop(key, None)
        elif op == "urgent":
            s.urgent(key, arg[0], now)
        else:
            now += arg[0]
        d = s.decide(copies, now)
        assert d.wait_s >= 0
        if d.step is not None:
            m = copies[d.step.key]
            assert d.step.count >= 1 and 0 <= d.step.first < d.step.first + d.step.count <= m.n_chunks
            assert d.step.nbytes == sum(m.chunk(i).length for i in d.step.chunks)
    assert len(s.pending_urgent()) <= s.urgent_max


# -- the peer action a puller sends a holder it banned ------------------------------------------


@SETTINGS
@given(st.sampled_from(["m", "acme/m"]), st.text("0123456789abcdef", min_size=32, max_size=32),
       st.integers(0, 2**31 - 1))
def test_verify_copy_crosses_the_peer_route_unchanged(model: str, digest: str, chunk: int) -> None:
    a = VerifyCopy(model, digest, chunk)
    assert decode_action(encode_action(a)) == a


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"op": "verify_copy", "model": "m", "manifest_hash": "ab" * 16, "chunk": -1}, "chunk"),
        ({"op": "verify_copy", "model": "m", "manifest_hash": "ab" * 16, "chunk": True}, "chunk"),
        ({"op": "verify_copy", "model": "m", "manifest_hash": "ab" * 16, "chunk": 2**40}, "chunk"),
        ({"op": "verify_copy", "model": "m", "manifest_hash": "ab" * 16}, "chunk"),
        ({"op": "verify_copy", "model": "m", "manifest_hash": "XY" * 16, "chunk": 0}, "manifest_hash"),
        ({"op": "verify_copy", "model": "m", "chunk": 0}, "manifest_hash"),
        ({"op": "verify_copy", "model": "../m", "manifest_hash": "ab" * 16, "chunk": 0}, "relative segment"),
        ({"op": "verify_copy", "model": "m", "manifest_hash": "ab" * 16, "chunk": 0, "kind": "disk"}, "unknown fields"),
    ],
)
def test_a_bad_verify_copy_is_refused_with_a_reason(raw: Any, needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        decode_action(raw)
