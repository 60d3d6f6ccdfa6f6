"""The S3 source's URL and key checks and its resume record (the fetch itself: tests/integration/test_s3.py)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from meshnode.copies.sources import SourceError
from meshnode.copies.sources.s3 import (
    LEDGER,
    S3Location,
    _check_claims,
    _check_range,
    _Ledger,
    _Object,
    _plan_ranges,
    _safe_rel,
    parse_s3_url,
)


def test_urls() -> None:
    assert parse_s3_url("s3://models/llama") == S3Location("models", "llama")
    assert parse_s3_url("s3://models/") == S3Location("models", "")
    assert parse_s3_url("s3://models/a%20b/c?endpoint_url=https://nyc3.digitaloceanspaces.com&region=nyc3") == \
        S3Location("models", "a b/c", "https://nyc3.digitaloceanspaces.com", "nyc3")
    for bad in ("s3://Models/x", "s3://ab/x", "s3://key:secret@models/x", "s3://models/x?X-Amz-Credential=a",
                "s3://models/x?endpoint_url=http://u:p@h", "s3://models/x?region=US East", "http://models/x",
                "s3://models/x?endpoint_url=file:///etc"):
        with pytest.raises(SourceError) as e:
            parse_s3_url(bad)
        assert e.value.code == "INVALID_REQUEST" and "secret" not in e.value.message, bad


def test_keys_become_safe_file_names_or_are_refused() -> None:
    assert _safe_rel("llama/sub/w.bin", "llama/") == "sub/w.bin"
    assert _safe_rel("llama/w.bin", "llama/w.bin") == "w.bin"
    assert _safe_rel("w.bin", "") == "w.bin"
    for hostile in ("llama/../../etc/passwd", "llama//abs", "llama/a/./b"):
        with pytest.raises(SourceError) as e:
            _safe_rel(hostile, "llama/")
        assert e.value.code == "INVALID_REQUEST"


def test_a_resume_record_is_believed_only_where_the_bytes_bear_it_out(tmp_path: Path) -> None:
    """The record is read as hostile: entries for another ETag, size or range
    plan, bad indexes and malformed digests count for nothing; what it claims
    is re-hashed from the file, and a range whose bytes changed is fetched again."""
    data = os.urandom(3000)
    o = _Object("k", "k", 3000, "e" * 32)
    _plan_ranges(o, 1000)
    md5 = [hashlib.md5(data[i:i + 1000], usedforsecurity=False).hexdigest() for i in (0, 1000, 2000)]
    prefix = hashlib.md5(data[2000:2400], usedforsecurity=False).hexdigest()
    ledger = _Ledger(tmp_path / LEDGER)
    ledger.path.write_text(json.dumps({"k": {
        "etag": o.etag, "size": 3000, "ranges": [[0, 1000], [1000, 1000], [2000, 1000]],
        "done": {"0": md5[0], "1": md5[1], "7": md5[0], "x": md5[0], "2": "not-a-digest"},
        "part": {"2": [400, prefix], "0": [5, prefix], "1": ["a", prefix]}}, "other": "junk"}))
    ledger.load()
    done, part = ledger.claims(o)
    assert done == {0: md5[0], 1: md5[1]} and part == {2: (400, prefix)}
    changed = _Object("k", "k", 3000, "f" * 32)
    _plan_ranges(changed, 1000)
    assert ledger.claims(changed) == ({}, {})  # the object changed: start over

    f = tmp_path / "k.part"
    f.write_bytes(data[:1000] + b"\0" * 1000 + data[2000:2400] + b"\0" * 600)  # range 1 lost (a crash)
    ok_done, ok_part = _check_claims(f, o, done, part)
    assert ok_done == {0: bytes.fromhex(md5[0])} and list(ok_part) == [2] and ok_part[2][0] == 400
    assert ok_part[2][1].hexdigest() == prefix
    f.write_bytes(data[:100])  # the wrong size: nothing is believed
    assert _check_claims(f, o, done, part) == ({}, {})


def test_a_hostile_resume_record_is_ignored_not_a_crash(tmp_path: Path) -> None:
    o = _Object("k", "k", 3000, "e" * 32)
    _plan_ranges(o, 1000)
    entry = {"etag": o.etag, "size": 3000, "ranges": [[0, 1000], [1000, 1000], [2000, 1000]]}
    for bad in ({**entry, "done": ["0"], "part": "x"}, {**entry, "done": {"²": "a" * 32, "9" * 5000: "a" * 32}},
                {**entry, "part": {"0": [True, "a" * 32], "1": [10 ** 30, "a" * 32]}}, {**entry, "ranges": "x"}):
        ledger = _Ledger(tmp_path / LEDGER)
        ledger.entries = {"k": bad}
        assert ledger.claims(o) == ({}, {}), bad
    ledger = _Ledger(tmp_path / LEDGER)
    ledger.path.write_text("[" * 100_000 + "]" * 100_000)  # deeper than the parser goes
    ledger.load()
    assert ledger.entries == {}
    left = tmp_path / f".{LEDGER}.tmp-4242"  # a write a kill cut short
    left.write_text("{")
    ledger.load()
    assert not left.exists()  # it must not become a file of the model
    left.write_text("{")
    ledger.remove()
    assert not left.exists() and not ledger.path.exists()


def test_a_range_answered_as_another_range_is_refused() -> None:
    _check_range({"ContentRange": "bytes 100-199/1000"}, 100, 199, 1000, "x")
    _check_range({"ContentLength": 1000}, 0, 999, 1000, "x")  # the whole object, answered whole
    for resp in ({"ContentLength": 1000}, {"ContentRange": "bytes 0-99/1000"}, {}):
        with pytest.raises(SourceError) as e:
            _check_range(resp, 100, 199, 1000, "x")
        assert e.value.code == "BAD_CONTENT"
