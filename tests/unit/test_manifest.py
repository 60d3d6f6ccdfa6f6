"""Manifests: chunk layout, canonical encoding and hash, path rules, and a
decoder that turns any input into a ``Manifest`` or a ``RemoteProtocolError``."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import InvalidName, LocalProtocolError, RemoteProtocolError
from protocol.manifest import (
    CHUNK_BYTES_CEIL,
    CHUNK_BYTES_FLOOR,
    CHUNK_MAX_BYTES,
    CHUNK_MIN_BYTES,
    DIGEST_BYTES,
    MANIFEST_MAX_CHUNKS,
    PATH_MAX_CHARS,
    PATH_MAX_SEGMENTS,
    ChunkIndexError,
    ChunkRef,
    FileEntry,
    Manifest,
    ManifestBuilder,
    UnknownFile,
    choose_chunk_bytes,
    chunk_digest,
    file_digests,
    manifest_from_bytes,
    validate_rel_path,
)

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

CB = CHUNK_BYTES_FLOOR  # 64 KiB: the smallest chunk a manifest may declare


def _blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _sample() -> tuple[dict[str, bytes], Manifest]:
    files = {
        "config.json": b'{"a": 1}',
        "model-00001.safetensors": _blob(2 * CB + 100, 1),
        "empty.txt": b"",
        "sub/dir/weights.bin": _blob(CB, 2),
        "tokenizer.model": _blob(3 * CB, 3),
    }
    return files, manifest_from_bytes(files, CB)


# -- layout -----------------------------------------------------------------


def test_layout_files_start_on_chunk_boundaries() -> None:
    files, m = _sample()
    assert [f.path for f in m.files] == sorted(files)
    assert m.chunk_bytes == CB
    assert m.total_bytes == sum(len(d) for d in files.values())
    # config 1, empty 0, model 3, sub 1, tokenizer 3
    assert m.n_chunks == 1 + 0 + 3 + 1 + 3
    assert m.file_chunks("config.json") == range(0, 1)
    assert m.file_chunks("empty.txt") == range(1, 1)
    assert m.file_chunks("model-00001.safetensors") == range(1, 4)
    assert m.file_chunks("sub/dir/weights.bin") == range(4, 5)
    assert m.file_chunks("tokenizer.model") == range(5, 8)
    refs = list(m.chunks())
    assert [r.index for r in refs] == list(range(m.n_chunks))
    for r in refs:
        assert m.chunk(r.index) == r
        data = files[r.path][r.offset : r.offset + r.length]
        assert len(data) == r.length > 0
        assert r.offset % CB == 0
        assert r.digest == chunk_digest(data)
        assert m.verify(r.index, data)
        assert not m.verify(r.index, data + b"x")
    assert m.chunk(3) == ChunkRef(
        3,
        "model-00001.safetensors",
        2 * CB,
        100,
        chunk_digest(files["model-00001.safetensors"][2 * CB :]),
    )
    assert m.chunk(0).path == "config.json"
    assert m.chunk(1).path == "model-00001.safetensors"  # the empty file owns no chunk


@given(
    sizes=st.lists(st.integers(0, 4 * CB + 3), min_size=1, max_size=8),
    data=st.data(),
)
@SETTINGS
def test_chunk_lookup_matches_linear_scan(sizes: list[int], data: st.DataObject) -> None:
    b = ManifestBuilder(CB)
    for i, size in enumerate(sizes):
        n = -(-size // CB)
        b.add_file(f"f{i:02d}", size, [bytes([i, j % 256]) * 8 for j in range(n)])
    m = b.build()
    linear = []
    for f in m.files:
        for j in range(len(f.digests)):
            off = j * CB
            linear.append((f.path, off, min(CB, f.size - off), f.digests[j]))
    assert m.n_chunks == len(linear)
    for i, (path, off, length, digest) in enumerate(linear):
        assert m.chunk(i) == ChunkRef(i, path, off, length, digest)
    assert [(r.path, r.offset, r.length, r.digest) for r in m.chunks()] == linear
    if linear:
        i = data.draw(st.integers(0, len(linear) - 1))
        assert m.chunk(i).index == i


def test_empty_files_and_empty_manifest() -> None:
    m = manifest_from_bytes({"a": b"", "b": b"", "c/d": b""}, CB)
    assert m.n_chunks == 0 and m.total_bytes == 0
    assert list(m.chunks()) == []
    assert m.file_chunks("b") == range(0, 0)
    with pytest.raises(ChunkIndexError):
        m.chunk(0)
    assert Manifest.decode(m.encode()) == m
    nothing = ManifestBuilder(CB).build()
    assert nothing.n_chunks == 0 and nothing.files == ()
    assert Manifest.decode(nothing.encode()).hash == nothing.hash


def test_chunk_index_out_of_range() -> None:
    _, m = _sample()
    for bad in (-1, m.n_chunks, m.n_chunks + 10, 2**70):
        with pytest.raises(ChunkIndexError) as exc:
            m.chunk(bad)
        assert isinstance(exc.value, LocalProtocolError)
        assert isinstance(exc.value, IndexError)
    with pytest.raises(LocalProtocolError):
        m.chunk(True)
    with pytest.raises(UnknownFile):
        m.file_chunks("nope")
    with pytest.raises(UnknownFile):
        m.file("sub/dir")


# -- canonical encoding and hash --------------------------------------------


def test_roundtrip_and_stable_hash() -> None:
    files, m = _sample()
    enc = m.encode()
    m2 = Manifest.decode(enc)
    assert m2 == m
    assert m2.hash == m.hash
    assert m2.encode() == enc
    assert len(m.hash) == 32 and int(m.hash, 16) >= 0
    # insertion order does not matter: the manifest is canonical
    again = manifest_from_bytes(dict(reversed(list(files.items()))), CB)
    assert again.encode() == enc and again.hash == m.hash
    # the hash is pinned to the wire format; changing it changes every identity
    assert Manifest.decode(enc, expected_hash=m.hash) == m
    wire = m.to_wire()
    assert set(wire) == {"v", "chunk_bytes", "files"}
    assert wire["files"][0] == ["config.json", 8, chunk_digest(files["config.json"])]


def test_hash_changes_with_any_content_byte() -> None:
    files, m = _sample()
    seen = {m.hash}
    for path, data in files.items():
        if not data:
            continue
        for pos in (0, len(data) // 2, len(data) - 1):
            changed = dict(files)
            changed[path] = data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1 :]
            seen.add(manifest_from_bytes(changed, CB).hash)
    renamed = dict(files)
    renamed["config2.json"] = renamed.pop("config.json")
    seen.add(manifest_from_bytes(renamed, CB).hash)
    grown = dict(files)
    grown["empty.txt"] = b"x"
    seen.add(manifest_from_bytes(grown, CB).hash)
    seen.add(manifest_from_bytes(files, 2 * CB).hash)
    assert len(seen) == 1 + 3 * 4 + 3


def test_hash_changes_with_any_encoded_byte() -> None:
    _, m = _sample()
    enc = m.encode()
    for pos in range(len(enc)):
        mutated = bytearray(enc)
        mutated[pos] ^= 0x01
        try:
            other = Manifest.decode(bytes(mutated))
        except RemoteProtocolError:
            continue
        assert other.hash != m.hash
        with pytest.raises(RemoteProtocolError):
            Manifest.decode(bytes(mutated), expected_hash=m.hash)


def test_expected_hash_mismatch_rejected() -> None:
    _, m = _sample()
    other = manifest_from_bytes({"x": b"1"}, CB)
    with pytest.raises(RemoteProtocolError, match="hash"):
        Manifest.decode(m.encode(), expected_hash=other.hash)
    with pytest.raises(RemoteProtocolError):
        Manifest.decode(m.encode(), expected_hash=m.hash.upper())
    with pytest.raises(RemoteProtocolError):
        Manifest.decode(m.encode(), expected_hash="")


def test_decode_size_limit() -> None:
    _, m = _sample()
    enc = m.encode()
    assert Manifest.decode(enc, max_bytes=len(enc)) == m
    with pytest.raises(RemoteProtocolError, match="limit"):
        Manifest.decode(enc, max_bytes=len(enc) - 1)


# -- path rules -------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "a",
        "model.safetensors",
        "sub/dir/file.bin",
        ".hidden",
        "..x",
        "x..",
        "a.b/c..d",
        "snake_case-1.2/ü.txt",
        "x" * 255,
        "/".join(["s"] * PATH_MAX_SEGMENTS),
        "/".join(["y" * 100] * 10)[:PATH_MAX_CHARS],
    ],
)
def test_valid_paths(path: str) -> None:
    assert validate_rel_path(path) == path


@pytest.mark.parametrize(
    "path",
    [
        "",
        ".",
        "..",
        "../x",
        "x/..",
        "a/../b",
        "./a",
        "a/./b",
        "/x",
        "/",
        "a//b",
        "a/",
        "a\\b",
        "..\\x",
        "a\x00b",
        "a\nb",
        "a\x7fb",
        "a\x85b",
        "a\ud800b",
        "x" * 256,
        "é" * 128,  # 256 UTF-8 bytes
        "/".join(["s"] * (PATH_MAX_SEGMENTS + 1)),
        "y/" * 600 + "y",
    ],
)
def test_invalid_paths(path: str) -> None:
    with pytest.raises(InvalidName):
        validate_rel_path(path)


def test_invalid_path_types() -> None:
    with pytest.raises(InvalidName):
        validate_rel_path(b"abc")  # type: ignore[arg-type]
    with pytest.raises(InvalidName):
        validate_rel_path(None)  # type: ignore[arg-type]


def test_layout_rules() -> None:
    d = chunk_digest(b"x")
    with pytest.raises(LocalProtocolError, match="added twice"):
        b = ManifestBuilder(CB)
        b.add_file("a", 1, [d])
        b.add_file("a", 1, [d])
    b = ManifestBuilder(CB)
    b.add_file("a", 1, [d])
    b.add_file("a/b", 1, [d])
    with pytest.raises(LocalProtocolError, match="directory"):
        b.build()
    with pytest.raises(LocalProtocolError, match="digests"):
        ManifestBuilder(CB).add_file("a", CB + 1, [d])
    with pytest.raises(LocalProtocolError, match="digests"):
        ManifestBuilder(CB).add_file("a", 0, [d])
    with pytest.raises(LocalProtocolError):
        ManifestBuilder(CB).add_file("a", 1, [b"short"])
    with pytest.raises(LocalProtocolError):
        ManifestBuilder(CB).add_file("a", -1, [])
    with pytest.raises(InvalidName):
        ManifestBuilder(CB).add_file("../a", 1, [d])
    with pytest.raises(LocalProtocolError, match="order"):
        Manifest(CB, (FileEntry("b", 1, (d,)), FileEntry("a", 1, (d,))))
    with pytest.raises(LocalProtocolError):
        Manifest(CB, (FileEntry("a", CB + 1, (d,)),))
    for bad_cb in (0, CB - 1, CB + 1, CB // 2, 3 * CB, 2 * CHUNK_BYTES_CEIL):
        with pytest.raises(LocalProtocolError):
            ManifestBuilder(bad_cb)
    # "a-b" sorts before "a/b" ('-' < '/'), and "a" is still a directory of "a/b"
    b = ManifestBuilder(CB)
    for p in ("a", "a-b", "a/b"):
        b.add_file(p, 1, [d])
    with pytest.raises(LocalProtocolError, match="directory"):
        b.build()
    ok = ManifestBuilder(CB)
    for p in ("ab", "a/b", "a-b"):
        ok.add_file(p, 1, [d])
    assert [f.path for f in ok.build().files] == ["a-b", "a/b", "ab"]


# -- chunk size -------------------------------------------------------------


def test_choose_chunk_bytes_examples() -> None:
    assert choose_chunk_bytes(0) == CHUNK_MIN_BYTES
    assert choose_chunk_bytes(1) == CHUNK_MIN_BYTES
    assert choose_chunk_bytes(256 * CHUNK_MIN_BYTES) == CHUNK_MIN_BYTES
    assert choose_chunk_bytes(256 * CHUNK_MIN_BYTES + 1) == 2 * CHUNK_MIN_BYTES
    assert choose_chunk_bytes(256 * 16 * 2**20) == 16 * 2**20  # 4 GiB -> 16 MiB
    assert choose_chunk_bytes(2**50) == CHUNK_MAX_BYTES
    with pytest.raises(LocalProtocolError):
        choose_chunk_bytes(-1)


@given(a=st.integers(0, 2**50), b=st.integers(0, 2**50))
@SETTINGS
def test_choose_chunk_bytes_properties(a: int, b: int) -> None:
    ca, cb = choose_chunk_bytes(a), choose_chunk_bytes(b)
    for total, c in ((a, ca), (b, cb)):
        assert c & (c - 1) == 0
        assert CHUNK_MIN_BYTES <= c <= CHUNK_MAX_BYTES
        if CHUNK_MIN_BYTES < c < CHUNK_MAX_BYTES:
            n = -(-total // c)
            assert 128 < n <= 256  # about 256 chunks when not clamped
    if a <= b:
        assert ca <= cb


# -- the decoder never raises anything but RemoteProtocolError --------------


def _decode_or_remote_error(data: bytes) -> Manifest | None:
    try:
        m = Manifest.decode(data)
    except RemoteProtocolError:
        return None
    # whatever decodes is a valid, canonical value
    assert Manifest.decode(m.encode()) == m
    return m


@given(st.binary(max_size=300))
@SETTINGS
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_or_remote_error(data)


_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=64),
    st.sampled_from([1, 0, CB, 2 * CB, 1024, -CB, 2**50, "v", "files", "chunk_bytes", "a/b"]),
)
_values = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)


def _file_item() -> st.SearchStrategy[Any]:
    return st.lists(
        st.one_of(
            st.sampled_from(["a", "a/b", "b", "../x", "", "a//b", "/abs", "a\\b"]),
            st.integers(-1, 3 * CB),
            st.binary(max_size=48),
            _values,
        ),
        min_size=0,
        max_size=4,
    )


_manifest_like = st.fixed_dictionaries(
    {
        "v": st.one_of(st.just(1), _leaf),
        "chunk_bytes": st.one_of(st.sampled_from([CB, 2 * CB, CB + 1, 0, 2**40]), _leaf),
        "files": st.one_of(st.lists(_file_item(), max_size=4), _values),
    },
    optional={"extra": _values},
)


@given(st.one_of(_values, _manifest_like))
@SETTINGS
def test_fuzz_msgpack_structures(value: Any) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    _decode_or_remote_error(data)


@given(st.data())
@SETTINGS
def test_fuzz_mutated_valid_encodings(data: st.DataObject) -> None:
    _, m = _sample()
    enc = bytearray(m.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        if not enc:
            break
        pos = data.draw(st.integers(0, len(enc) - 1))
        if op == "flip":
            enc[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            enc[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del enc[pos:]
        elif op == "insert":
            enc[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del enc[pos : pos + data.draw(st.integers(1, 8))]
    _decode_or_remote_error(bytes(enc))


def _wire(files: list[list[Any]], chunk_bytes: Any = CB, v: Any = 1) -> bytes:
    data: bytes = msgpack.packb(
        {"v": v, "chunk_bytes": chunk_bytes, "files": files}, use_bin_type=True
    )
    return data


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "undecodable"),
        (b"\xc1", "undecodable"),
        (msgpack.packb([1, 2, 3]), "map"),
        (_wire([], v=2), "version"),
        (_wire([], v=True), "version"),
        (_wire([], chunk_bytes=CB + 1), "power of two"),
        (_wire([], chunk_bytes=CB // 2), "power of two"),
        (_wire([], chunk_bytes=2 * CHUNK_BYTES_CEIL), "power of two"),
        (_wire([], chunk_bytes=float(CB)), "power of two"),
        (_wire([["a", 1, b"x" * 16]]) + b"\x00", "undecodable"),
        (_wire([["a", 1]]), "entry"),
        (_wire([["a", 1, [b"x" * 16]]]), "binary"),
        (_wire([[b"a", 1, b"x" * 16]]), "string"),
        (_wire([["a", -1, b""]]), "size"),
        (_wire([["a", 2**50, b""]]), "size"),
        (_wire([["a", True, b"x" * 16]]), "size"),
        (_wire([["a", 1, b"x" * 15]]), "digests"),
        (_wire([["a", 1, b"x" * 32]]), "digests"),
        (_wire([["a", 0, b"x" * 16]]), "digests"),
        (_wire([["../a", 1, b"x" * 16]]), "invalid"),
        (_wire([["a//b", 1, b"x" * 16]]), "invalid"),
        (_wire([["b", 1, b"x" * 16], ["a", 1, b"x" * 16]]), "order"),
        (_wire([["a", 1, b"x" * 16], ["a", 1, b"x" * 16]]), "twice"),
        (_wire([["a", 1, b"x" * 16], ["a/b", 1, b"x" * 16]]), "directory"),
        (_wire([["a", (MANIFEST_MAX_CHUNKS + 1) * CB, b""]]), "digests"),
        (msgpack.packb({"v": 1, "chunk_bytes": CB}), "keys"),
        (msgpack.packb({"v": 1, "chunk_bytes": CB, "files": [], "x": 1}), "keys"),
        (msgpack.packb({1: 1}), "undecodable"),  # strict_map_key
    ],
)
def test_decode_rejects(data: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        Manifest.decode(data)


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(RemoteProtocolError):
        Manifest.decode("text")  # type: ignore[arg-type]


def test_total_chunk_bound() -> None:
    # Two files whose chunk counts are each fine but sum past the bound.
    half = MANIFEST_MAX_CHUNKS // 2 + 1
    digests = b"\x00" * DIGEST_BYTES * half
    data = _wire([["a", half * CB, digests], ["b", half * CB, digests]])
    with pytest.raises(RemoteProtocolError, match="chunks"):
        Manifest.decode(data, max_bytes=len(data))


def test_decode_accepts_bytearray_and_memoryview() -> None:
    _, m = _sample()
    enc = m.encode()
    assert Manifest.decode(bytearray(enc)) == m
    assert Manifest.decode(memoryview(enc)) == m


def test_file_digests_and_builder() -> None:
    data = _blob(2 * CB + 1, 7)
    ds = file_digests(data, CB)
    assert ds == (
        chunk_digest(data[:CB]),
        chunk_digest(data[CB : 2 * CB]),
        chunk_digest(data[2 * CB :]),
    )
    assert all(len(d) == DIGEST_BYTES for d in ds)
    assert file_digests(b"", CB) == ()
    b = ManifestBuilder(CB)
    entry = b.add_file("w.bin", len(data), iter(ds))
    assert entry == FileEntry("w.bin", len(data), ds)
    assert len(b) == 1 and b.chunk_bytes == CB
    m = b.build()
    assert m == manifest_from_bytes({"w.bin": data}, CB)
    assert m.file("w.bin") == entry
