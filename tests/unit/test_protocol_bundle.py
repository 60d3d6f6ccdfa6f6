"""Bundles (protocol/bundle.py): what the writer's functions make is a tar that
tar reads, and the parser takes it back whole however the bytes are cut;
anything else is a ``BadBundle`` (a truncation a ``BundleTruncated``), never
another exception; the nearest holder is chosen alike everywhere."""

from __future__ import annotations

import hashlib
import io
import tarfile
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.bundle import (
    END_OF_ARCHIVE,
    HEADER_NAME,
    BadBundle,
    BundleHeader,
    BundleModel,
    BundleParser,
    BundleTruncated,
    Chunk,
    End,
    Header,
    Sums,
    bundle_bytes,
    export_sources,
    file_header,
    header_entry,
    padding,
    sums_entry,
    tar_header,
)
from protocol.errors import LocalProtocolError
from protocol.manifest import manifest_from_bytes

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CB = 64 * 1024
LONG = "deep/" + "d" * 120 + "/" + "ü" * 30 + ".bin"  # past ustar's fields, and not ASCII: a pax record
FILES = {"config.json": b'{"a": 1}', "w.bin": bytes(range(256)) * 700, "empty": b"", LONG: b"x" * (CB + 3)}
REG = {"model_type": "llm", "source_url": "hf://acme/tiny", "metadata": {"description": "d"}}


def build(models: dict[str, dict[str, bytes]], regs: dict[str, Any] | None = None, mtime: int = 1700000000) -> bytes:
    ms = {name: manifest_from_bytes(files, CB) for name, files in models.items()}
    header = BundleHeader(tuple(BundleModel(n, m, (regs or {}).get(n)) for n, m in ms.items()), "n1", 5)
    out = bytearray(header_entry(header, mtime))
    for name, files in models.items():
        m = ms[name]
        for f in m.files:
            out += file_header(name, m.hash, f.path, f.size, mtime) + files[f.path] + padding(f.size)
        out += sums_entry(name, m, {p: hashlib.sha256(d).hexdigest() for p, d in files.items()}, mtime)
    out += END_OF_ARCHIVE
    assert len(out) == bundle_bytes(header, mtime)
    return bytes(out)


BUNDLE = build({"acme/tiny": FILES, "other": {"a": b"a" * 10}}, {"acme/tiny": REG})


def parse(data: bytes, cuts: list[int] | None = None) -> list[Any]:
    p = BundleParser()
    events: list[Any] = []
    at = 0
    for cut in sorted(cuts or []):
        events += p.feed(data[at:cut])
        at = cut
    events += p.feed(data[at:])
    return events + p.close()


def test_tar_reads_it_and_sha256sum_would_too() -> None:
    with tarfile.open(fileobj=io.BytesIO(BUNDLE)) as tf:
        names = tf.getnames()
        assert names[0] == HEADER_NAME
        m = manifest_from_bytes(FILES, CB)
        for path, data in FILES.items():
            got = tf.extractfile(f"models/acme/tiny/@{m.hash}/{path}")
            assert got is not None and got.read() == data
        sums = tf.extractfile(f"models/acme/tiny/@{m.hash}.sha256")
        assert sums is not None
        assert f"{hashlib.sha256(FILES[LONG]).hexdigest()}  {LONG}\n".encode() in sums.read()


@SETTINGS
@given(st.lists(st.integers(0, len(BUNDLE)), max_size=12))
def test_the_parser_takes_it_back_whole_however_it_is_cut(cuts: list[int]) -> None:
    events = parse(BUNDLE, cuts)
    assert isinstance(events[0], Header) and isinstance(events[-1], End)
    header = events[0].header
    assert [m.name for m in header.models] == ["acme/tiny", "other"]
    assert header.models[0].registration == REG and header.models[1].registration is None
    m = header.models[0].manifest
    chunks = [e for e in events if isinstance(e, Chunk) and e.model == 0]
    assert [c.index for c in chunks] == list(range(m.n_chunks))
    assert all(m.verify(c.index, c.data) for c in chunks)
    sums = [e for e in events if isinstance(e, Sums)]
    assert [s.model for s in sums] == [0, 1]
    assert sums[0].sums == {p: hashlib.sha256(d).hexdigest() for p, d in FILES.items()}


@SETTINGS
@given(st.binary(max_size=3000), st.integers(0, len(BUNDLE)), st.integers(0, 255))
def test_any_other_bytes_are_a_bad_bundle_never_a_crash(junk: bytes, at: int, xor: int) -> None:
    for data in (junk, BUNDLE[:at] + junk, BUNDLE[:at] + bytes([BUNDLE[at] ^ xor]) + BUNDLE[at + 1:]
                 if at < len(BUNDLE) else junk):
        try:
            parse(data)
        except BadBundle:
            pass


def test_what_a_bad_bundle_is_told() -> None:
    with pytest.raises(BundleTruncated, match="stops after"):
        parse(BUNDLE[: len(BUNDLE) // 2])
    with pytest.raises(BadBundle, match="checksum"):
        parse(BUNDLE[:100] + b"\x01" + BUNDLE[101:])
    with pytest.raises(BadBundle, match="bytes follow the end"):
        parse(BUNDLE + b"\0" * 512 + b"x")
    parse(BUNDLE + b"\0" * 9216)  # tar's padding to its record size is taken
    swapped = build({"other": {"a": b"a" * 10}, "acme/tiny": FILES})
    ours = len(header_entry(_header(BUNDLE), 1700000000))
    theirs = len(header_entry(_header(swapped), 1700000000))
    with pytest.raises(BadBundle, match="expected"):  # entries where the header does not put them
        parse(BUNDLE[:ours] + swapped[theirs:])
    with pytest.raises(BadBundle, match="starts with"):
        parse(tar_header("x", 0, 0) + END_OF_ARCHIVE)
    p = BundleParser()
    with pytest.raises(BadBundle):
        p.feed(b"\xff" * 512)
    with pytest.raises(BadBundle):  # spent: the same error again
        p.feed(b"")


def _header(data: bytes) -> BundleHeader:
    events = BundleParser().feed(data[:200_000])
    assert isinstance(events[0], Header)
    return events[0].header


def test_a_file_of_8_gib_or_more_gets_its_size_in_a_pax_record() -> None:
    h = tar_header("models/m/@ab/big.bin", 10 * 2**30, 0)
    assert len(h) > 512 and b"size=10737418240" in h
    tf = tarfile.open(fileobj=io.BytesIO(h + b"\0" * 1024), mode="r|")
    info = tf.next()  # the header alone: the 10 GiB are not there
    assert info is not None and info.size == 10 * 2**30 and info.name == "models/m/@ab/big.bin"


def test_the_header_says_what_it_must() -> None:
    m = manifest_from_bytes(FILES, CB)
    with pytest.raises(LocalProtocolError):
        BundleHeader(())
    with pytest.raises(LocalProtocolError):
        BundleHeader((BundleModel("a", m), BundleModel("a", m)))
    good = BundleHeader((BundleModel("a", m),)).encode()
    assert BundleHeader.decode(good).models[0].manifest == m
    for bad in (b"{", b"[]", good.replace(b'"v":1', b'"v":2'), good.replace(m.hash.encode(), b"0" * 32),
                good.replace(b'"name":"a"', b'"name":"../a"'),
                BundleHeader((BundleModel("a", m, {"replicas": {"min": 1}}),)).encode(),
                BundleHeader((BundleModel("a", m, {"model_type": "x" * 100}),)).encode()):
        with pytest.raises(BadBundle):
            BundleHeader.decode(bad)


def test_the_nearest_holder_first() -> None:
    found = {"c": True, "b": False, "a": True, "d": True}
    labels = {"a": {"zone": "z2"}, "c": {"zone": "z1", "rack": "r1"}, "d": {"zone": "z1"}}
    assert export_sources(found, labels, {"zone": "z1", "rack": "r1"}) == ["c", "d", "a", "b"]
    assert export_sources(found, {}, {}) == ["a", "c", "d", "b"]
