"""GPU records: their codec refuses what is out of shape, and the publish rule
keeps every peer's view within a threshold of the truth while writing seldom."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.gpus import (
    MAX_GPUS,
    GpuProcess,
    GpuReading,
    GpusRecord,
    Thresholds,
    parse_fake_gpus,
    publish_reason,
    readings_within,
)
from protocol.keys import RecordError

GiB = 2**30
MiB = 2**20
TH = Thresholds()


def gpu(index: int = 0, used: int = 0, total: int = 24 * GiB, **kw: Any) -> GpuReading:
    return GpuReading(index, f"GPU-{index:04d}", "Fake 24G", total, used, total - used, **kw)


def rec(*gpus: GpuReading, **kw: Any) -> GpusRecord:
    return GpusRecord(tuple(gpus), 1_000, "fake", **kw)


readings = st.builds(
    lambda i, total, used_frac, util, temp, power, pids: GpuReading(
        i, f"GPU-{i}", "Fake", total, int(total * used_frac), total - int(total * used_frac), util, util, temp,
        power, 300_000, tuple(GpuProcess(p, MiB * p) for p in sorted(pids)), len(pids)),
    st.integers(0, MAX_GPUS - 1), st.integers(MiB, 2**40), st.floats(0, 1), st.none() | st.integers(0, 100),
    st.none() | st.integers(0, 120), st.none() | st.integers(0, 10**6), st.sets(st.integers(1, 2**20), max_size=4),
)


@given(st.lists(readings, max_size=8, unique_by=lambda g: g.index), st.booleans())
def test_records_round_trip(gpus: list[GpuReading], stale: bool) -> None:
    r = GpusRecord(tuple(gpus), 123, "nvml", stale, "boom" if stale else None)
    assert GpusRecord.from_value(r.to_value()) == r


@pytest.mark.parametrize("bad", [
    None, [], {"gpus": "x", "read_ms": 1, "source": "fake"},
    {"gpus": [{}], "read_ms": 1, "source": "fake"},
    {"gpus": [gpu().to_value() | {"used_bytes": 25 * GiB}], "read_ms": 1, "source": "fake"},  # used > total
    {"gpus": [gpu().to_value() | {"index": MAX_GPUS}], "read_ms": 1, "source": "fake"},
    {"gpus": [gpu().to_value() | {"util_pct": 101}], "read_ms": 1, "source": "fake"},
    {"gpus": [gpu().to_value() | {"util_pct": True}], "read_ms": 1, "source": "fake"},
    {"gpus": [gpu().to_value() | {"name": "x" * 201}], "read_ms": 1, "source": "fake"},
    {"gpus": [gpu().to_value() | {"processes": [[1, 2]] * 65}], "read_ms": 1, "source": "fake"},
    {"gpus": [gpu().to_value() | {"processes": [[1]]}], "read_ms": 1, "source": "fake"},
    {"gpus": [gpu().to_value(), gpu().to_value()], "read_ms": 1, "source": "fake"},  # one index twice
    {"gpus": [gpu(i).to_value() for i in range(MAX_GPUS + 1)], "read_ms": 1, "source": "fake"},
    {"gpus": [], "read_ms": -1, "source": "fake"},
    {"gpus": [], "read_ms": 1, "source": "fake", "stale": "yes"},
])
def test_hostile_values_are_refused(bad: Any) -> None:
    with pytest.raises(RecordError):
        GpusRecord.from_value(bad)


def test_what_is_news() -> None:
    base = rec(gpu(0), gpu(1))
    assert publish_reason(None, 0, base, 0) == "first reading"
    assert publish_reason(base, 0, base, 59) is None
    assert publish_reason(base, 0, base, 60) == "heartbeat"
    small = rec(gpu(0, used=200 * MiB), gpu(1))  # below max(256 MiB, 2% of 24 GiB = 491 MiB)
    assert publish_reason(base, 0, small, 1) is None
    assert publish_reason(base, 0, rec(gpu(0, used=GiB), gpu(1)), 1) == "gpu0 memory moved"
    assert publish_reason(base, 0, rec(gpu(0)), 1) == "the set of GPUs changed"
    assert publish_reason(base, 0, rec(gpu(0), gpu(1, processes=(GpuProcess(7, None),), processes_total=1)), 1) \
        == "gpu1 processes changed"
    assert publish_reason(rec(gpu(0, util_pct=10)), 0, rec(gpu(0, util_pct=29)), 1) is None
    assert publish_reason(rec(gpu(0, util_pct=10)), 0, rec(gpu(0, util_pct=30)), 1) == "gpu0 utilisation moved"
    assert publish_reason(rec(gpu(0, temperature_c=40)), 0, rec(gpu(0, temperature_c=49)), 1) is None
    assert publish_reason(rec(gpu(0, temperature_c=40)), 0, rec(gpu(0, temperature_c=50)), 1) == "gpu0 temperature moved"
    assert publish_reason(rec(gpu(0, power_mw=100_000, power_limit_mw=300_000)), 0,
                          rec(gpu(0, power_mw=159_000, power_limit_mw=300_000)), 1) is None
    assert publish_reason(rec(gpu(0, power_mw=100_000, power_limit_mw=300_000)), 0,
                          rec(gpu(0, power_mw=160_000, power_limit_mw=300_000)), 1) == "gpu0 power moved"
    assert publish_reason(base, 0, base.marked_stale("NVML: GPU is lost", 2_000), 1) == "read failed"
    assert publish_reason(base.marked_stale("x", 2_000), 0, base, 1) == "read recovered"


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(-3 * GiB, 3 * GiB), st.integers(-30, 30), st.integers(-8, 8)),
                min_size=1, max_size=60))
def test_peers_never_see_figures_further_than_a_threshold_from_the_truth(steps: list[tuple[int, int, int]]) -> None:
    """A random walk of readings, published by the rule: after every reading the
    published record is within every threshold of it (drift cannot add up), and
    a reading within the thresholds of the published one is never written."""
    total = 80 * GiB
    used, util, temp = 10 * GiB, 50, 50
    cur = rec(gpu(0, used, total, util_pct=util, temperature_c=temp))
    published, at, writes = cur, 0.0, 1
    for t, (du, dutil, dtemp) in enumerate(steps, 1):
        used = min(max(used + du, 0), total)
        util = min(max(util + dutil, 0), 100)
        temp = min(max(temp + dtemp, 0), 120)
        cur = rec(gpu(0, used, total, util_pct=util, temperature_c=temp))
        why = publish_reason(published, at, cur, float(t), TH)
        if why is None:
            assert readings_within(published.gpus, cur.gpus, TH)
        else:
            published, at, writes = cur, float(t), writes + 1
        assert readings_within(published.gpus, cur.gpus, TH)
    assert writes <= len(steps) + 1


def test_a_steady_gpu_is_written_only_on_its_heartbeat() -> None:
    th = Thresholds()
    published, at, writes = rec(gpu(0, 5 * GiB, util_pct=40)), 0.0, 0
    for t in range(1, 601):  # ten minutes of 1 s reads, wobbling under the thresholds
        cur = rec(gpu(0, 5 * GiB + (t % 7) * 30 * MiB, util_pct=40 + t % 5))
        if publish_reason(published, at, cur, float(t), th):
            published, at, writes = cur, float(t), writes + 1
    assert writes == 10  # one a minute


@pytest.mark.parametrize(("spec", "totals"), [
    ("2x24GiB", (24 * GiB, 24 * GiB)),
    ("24GiB,80GiB", (24 * GiB, 80 * GiB)),
    ("1x80G", (80 * GiB,)),
    ("512MiB", (512 * MiB,)),
    ("2 x 0.5GiB", (GiB // 2, GiB // 2)),
    ("1X1TiB", (2**40,)),
])
def test_fake_gpu_specs(spec: str, totals: tuple[int, ...]) -> None:
    assert parse_fake_gpus(spec) == totals


@pytest.mark.parametrize(("spec", "why"), [
    ("", "not COUNTxSIZE"), ("twox24GiB", "not COUNTxSIZE"), ("2x24GiB,", "not COUNTxSIZE"),
    ("2x24PB", "unknown unit"), ("0x24GiB", "at least one GPU"), ("2x0GiB", "at least one GPU"),
    ("65x1GiB", "at most 64"), ("100x1GiB,1GiB", "at most 64"), ("1x17TiB", "16 TiB"),
])
def test_bad_fake_gpu_specs_say_what_is_wrong(spec: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_fake_gpus(spec)


def test_stale_keeps_the_last_figures() -> None:
    good = rec(gpu(0, 3 * GiB), gpu(1))
    s = good.marked_stale("NVML: Unknown Error " + "x" * 500, 9_000)
    assert s.gpus == good.gpus and s.stale and s.read_ms == 9_000 and s.error is not None and len(s.error) == 200
    assert GpusRecord.from_value(s.to_value()) == s
    assert good.storage_view() == {"gpu0": {"total": 24 * GiB, "used": 3 * GiB, "free": 21 * GiB},
                                   "gpu1": {"total": 24 * GiB, "used": 0, "free": 24 * GiB}}
    assert replace(good, source="nvml") != good
