"""The data plane on real loopback sockets: chunks, auth, limits, faults, TLS."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
import xxhash

from meshnode.copies.dataplane import (
    ChunkMismatch,
    DataClient,
    DataPlaneAuthError,
    DataPlaneError,
    DataServer,
    NotFound,
    PeerBusy,
)
from meshnode.ratelimit import TokenBucket

CHUNK = 64 * 1024
MANIFEST = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"


@dataclass(frozen=True)
class Chunk:
    path: str
    offset: int
    length: int
    digest: bytes


class FileResolver:
    """A model of several files cut into fixed-size chunks, the last of each file short."""

    def __init__(self, files: list[Path], chunk_bytes: int = CHUNK) -> None:
        self.chunks: list[Chunk] = []
        for path in files:
            data = path.read_bytes()
            for off in range(0, len(data), chunk_bytes):
                piece = data[off : off + chunk_bytes]
                self.chunks.append(
                    Chunk(str(path), off, len(piece), xxhash.xxh3_128(piece).digest())
                )
        # path -> another path to serve in its place (a corrupt copy)
        self.serve_from: dict[str, str] = {}

    def locate(self, manifest_hash_hex: str, index: int) -> tuple[str, int, int] | None:
        if manifest_hash_hex != MANIFEST or not 0 <= index < len(self.chunks):
            return None
        c = self.chunks[index]
        return self.serve_from.get(c.path, c.path), c.offset, c.length

    def have(self, manifest_hash_hex: str) -> bytes | None:
        if manifest_hash_hex != MANIFEST:
            return None
        bits = bytearray((len(self.chunks) + 7) // 8)
        for i in range(len(self.chunks)):
            bits[i // 8] |= 0x80 >> (i % 8)
        return bytes(bits)

    def expected(self, index: int) -> bytes:
        c = self.chunks[index]
        with open(c.path, "rb") as f:
            f.seek(c.offset)
            return f.read(c.length)


@pytest.fixture
def resolver(tmp_path: Path) -> FileResolver:
    a = tmp_path / "model-00001.safetensors"
    b = tmp_path / "model-00002.safetensors"
    a.write_bytes(os.urandom(5 * CHUNK + 1234))
    b.write_bytes(os.urandom(2 * CHUNK + 77))
    return FileResolver([a, b])


@pytest.fixture
def slow_autojump() -> trio.testing.MockClock:
    """Virtual time that jumps only after 20 ms of real idleness: safe with real sockets."""
    return trio.testing.MockClock(autojump_threshold=0.02)


async def start_server(nursery: trio.Nursery, server: DataServer) -> str:
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    return f"127.0.0.1:{port}"


async def fetch(client: DataClient, peer: str, r: FileResolver, index: int) -> bytes:
    c = r.chunks[index]
    buf = bytearray(CHUNK)
    view = await client.fetch_chunk(peer, MANIFEST, index, c.length, c.digest, buf)
    return bytes(view)


async def raw_auth(peer: str, secret: str = "s3cret") -> trio.SocketStream:
    """Handshake by hand, following the wire format in the module docstring."""
    host, port = peer.rsplit(":", 1)
    s = await trio.open_tcp_stream(host, int(port))
    cn = secrets.token_bytes(16)
    await s.send_all(b"MNDP\x02" + cn)
    hello = await recv_exact(s, 17)
    assert hello[0] == 2
    sn = hello[1:17]
    key = secret.encode()
    await s.send_all(hmac.new(key, b"cli" + cn + sn, hashlib.sha256).digest())
    assert await recv_exact(s, 1) == b"\x00"
    assert await recv_exact(s, 32) == hmac.new(key, b"srv" + cn + sn, hashlib.sha256).digest()
    return s


async def recv_exact(s: trio.abc.ReceiveStream, n: int) -> bytes:
    """Up to ``n`` bytes; fewer if the peer closes (or resets, having left our bytes unread)."""
    out = b""
    while len(out) < n:
        try:
            got = await s.receive_some(n - len(out))
        except trio.BrokenResourceError:
            break
        if not got:
            break
        out += got
    return out


@pytest.fixture
async def served(resolver: FileResolver) -> AsyncIterator[tuple[str, DataServer, DataClient]]:
    server = DataServer(resolver, ("s3cret",))
    client = DataClient(("s3cret",))
    async with trio.open_nursery() as nursery:
        peer = await start_server(nursery, server)
        yield peer, server, client
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_chunks_of_several_files_arrive_byte_identical_on_one_connection(
    served: tuple[str, DataServer, DataClient], resolver: FileResolver
) -> None:
    peer, server, client = served
    for _ in range(3):
        for i in range(len(resolver.chunks)):
            assert await fetch(client, peer, resolver, i) == resolver.expected(i)
    assert len(resolver.chunks) == 6 + 3
    assert client.statistics().connections_opened == 1
    assert server.statistics().connections_total == 1
    assert server.statistics().requests == 3 * len(resolver.chunks)


async def test_have_returns_the_bitfield(
    served: tuple[str, DataServer, DataClient], resolver: FileResolver
) -> None:
    peer, _, client = served
    assert await client.have(peer, MANIFEST) == resolver.have(MANIFEST)
    with pytest.raises(NotFound):
        await client.have(peer, OTHER)


async def test_concurrent_fetches_from_one_server(
    served: tuple[str, DataServer, DataClient], resolver: FileResolver
) -> None:
    peer, _, client = served
    results: dict[tuple[int, int], bytes] = {}

    async def worker(w: int) -> None:
        for i in range(len(resolver.chunks)):
            results[w, i] = await fetch(client, peer, resolver, (i + w) % len(resolver.chunks))

    async with trio.open_nursery() as nursery:
        for w in range(12):
            nursery.start_soon(worker, w)
    for (w, i), data in results.items():
        assert data == resolver.expected((i + w) % len(resolver.chunks))
    assert len(results) == 12 * len(resolver.chunks)
    assert 1 < client.statistics().connections_opened <= 12
    assert client.statistics().idle_connections <= 8


async def test_not_found_and_out_of_range_keep_the_connection(
    served: tuple[str, DataServer, DataClient], resolver: FileResolver
) -> None:
    peer, _, client = served
    buf = bytearray(CHUNK)
    with pytest.raises(NotFound):
        await client.fetch_chunk(peer, OTHER, 0, 10, bytes(16), buf)
    with pytest.raises(NotFound):
        await client.fetch_chunk(peer, MANIFEST, len(resolver.chunks), 10, bytes(16), buf)
    with pytest.raises(NotFound):
        await client.fetch_chunk(peer, MANIFEST, 2**32 - 1, 10, bytes(16), buf)
    with pytest.raises(ValueError, match="32 hex"):
        await client.fetch_chunk(peer, "not-a-hash", 0, 10, bytes(16), buf)
    assert await fetch(client, peer, resolver, 0) == resolver.expected(0)
    assert client.statistics().connections_opened == 1


async def test_wrong_secret_is_refused_by_the_client_with_a_log_line_on_the_server(
    resolver: FileResolver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshnode.copies.dataplane")
    server = DataServer(resolver, ("right-secret-abc",))
    client = DataClient(("wrong-secret-xyz",))
    async with trio.open_nursery() as nursery:
        peer = await start_server(nursery, server)
        with pytest.raises(DataPlaneAuthError, match="refused our cluster secret"):
            await fetch(client, peer, resolver, 0)
        await wait_for(lambda: server.statistics().auth_failures == 1)
        await client.aclose()
        nursery.cancel_scope.cancel()
    warnings = [
        r for r in caplog.records if r.name == "meshnode.copies.dataplane" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1
    assert "matches no accepted cluster secret" in warnings[0].getMessage()
    assert "secret-abc" not in caplog.text and "secret-xyz" not in caplog.text


async def test_wrong_proof_is_refused_by_the_server_which_keeps_serving(
    resolver: FileResolver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshnode.copies.dataplane")
    server = DataServer(resolver, ("s3cret",))
    client = DataClient(("s3cret",))
    async with trio.open_nursery() as nursery:
        peer = await start_server(nursery, server)
        host, port = peer.rsplit(":", 1)
        for _ in range(3):  # the same fault again: still one log line (rate-limited)
            s = await trio.open_tcp_stream(host, int(port))
            await s.send_all(b"MNDP\x02" + bytes(16))
            # The server's hello is its version and nonce: nothing made with the
            # secret, so a stranger has nothing to test guesses against offline.
            assert len(await recv_exact(s, 17)) == 17
            await s.send_all(hmac.new(b"guess", b"cli", hashlib.sha256).digest())
            assert await recv_exact(s, 1) == b"\x01"
            assert await recv_exact(s, 1) == b""  # and closed: it never proved anything
            await s.aclose()
        assert await fetch(client, peer, resolver, 1) == resolver.expected(1)
        await client.aclose()
        nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "matches no accepted cluster secret" in lines[0]
    assert "s3cret" not in caplog.text and "guess" not in caplog.text
    assert server.statistics().auth_failures == 3


async def test_wrong_magic_and_version_are_refused(
    resolver: FileResolver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshnode.copies.dataplane")
    server = DataServer(resolver, ("s3cret",))
    async with trio.open_nursery() as nursery:
        peer = await start_server(nursery, server)
        host, port = peer.rsplit(":", 1)
        s = await trio.open_tcp_stream(host, int(port))
        await s.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await recv_exact(s, 1) == b""
        await s.aclose()
        s = await trio.open_tcp_stream(host, int(port))
        await s.send_all(b"MNDP\x07" + bytes(16))
        assert await recv_exact(s, 2) == b"\x02"  # our version, then close
        await s.aclose()
        nursery.cancel_scope.cancel()
    text = caplog.text
    assert "bad magic" in text and "version 7" in text


async def test_client_refuses_a_server_of_another_version() -> None:
    async def old_server(stream: trio.SocketStream) -> None:
        await recv_exact(stream, 21)
        await stream.send_all(b"\x01")  # version 1: the server proved first

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, old_server, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        client = DataClient(("s3cret",))
        with pytest.raises(DataPlaneAuthError, match="version 1"):
            await client.have(f"127.0.0.1:{port}", MANIFEST)
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_client_refuses_a_server_that_cannot_prove_the_secret() -> None:
    """An impostor (an address in a forged record, a man in the middle) that
    takes any proof still has to prove the secret back, and cannot."""

    async def impostor(stream: trio.SocketStream) -> None:
        await recv_exact(stream, 21)
        await stream.send_all(b"\x02" + bytes(16))
        await recv_exact(stream, 32)
        await stream.send_all(b"\x00" + hmac.new(b"guess", b"srv", hashlib.sha256).digest())
        await recv_exact(stream, 1)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, impostor, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        client = DataClient(("s3cret",))
        with pytest.raises(DataPlaneAuthError, match="did not prove the cluster secret"):
            await client.have(f"127.0.0.1:{port}", MANIFEST)
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_secret_rotation(resolver: FileResolver) -> None:
    async with trio.open_nursery() as nursery:
        # Step 1: the new secret is accepted everywhere, the old one still first.
        step1 = await start_server(nursery, DataServer(resolver, ("old", "new")))
        # Step 2: the new one first; the old one still accepted.
        step2 = await start_server(nursery, DataServer(resolver, ("new", "old")))
        for peer in (step1, step2):
            for secrets_ in (("old", "new"), ("new", "old")):
                client = DataClient(secrets_)
                assert await fetch(client, peer, resolver, 0) == resolver.expected(0)
                await client.aclose()
        # Step 3: the old one dropped; a client on step 2 still talks to it.
        step3 = await start_server(nursery, DataServer(resolver, ("new",)))
        client = DataClient(("new", "old"))
        assert await fetch(client, step3, resolver, 0) == resolver.expected(0)
        await client.aclose()
        client = DataClient(("old",))
        with pytest.raises(DataPlaneAuthError):
            await fetch(client, step3, resolver, 0)
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_no_secret_means_the_empty_key(resolver: FileResolver) -> None:
    async with trio.open_nursery() as nursery:
        peer = await start_server(nursery, DataServer(resolver, ()))
        client = DataClient(())
        assert await fetch(client, peer, resolver, 2) == resolver.expected(2)
        await client.aclose()
        client = DataClient(("some-secret",))
        with pytest.raises(DataPlaneAuthError):
            await fetch(client, peer, resolver, 2)
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_garbage_and_truncated_requests_do_not_kill_the_server(
    resolver: FileResolver, slow_autojump: trio.testing.MockClock
) -> None:
    server = DataServer(resolver, ("s3cret",), request_timeout_s=2)
    client = DataClient(("s3cret",))
    async with trio.open_nursery() as nursery:
        peer = await start_server(nursery, server)
        assert await fetch(client, peer, resolver, 0) == resolver.expected(0)
        # An unknown request type: BAD_REQUEST, then the server closes.
        s = await raw_auth(peer)
        await s.send_all(b"\x63" + os.urandom(40))
        status, length = struct.unpack("!BQ", await recv_exact(s, 9))
        assert status == 2 and 0 < length <= 256
        await recv_exact(s, length)
        assert await recv_exact(s, 1) == b""
        await s.aclose()
        # A request cut short, then silence: dropped after the request timeout.
        s = await raw_auth(peer)
        await s.send_all(b"\x01" + bytes(5))
        assert await recv_exact(s, 1) == b""
        await s.aclose()
        # A request cut short by a hang-up, and a hello cut short by one.
        s = await raw_auth(peer)
        await s.send_all(b"\x02" + bytes(3))
        await s.aclose()
        s = await trio.open_tcp_stream("127.0.0.1", int(peer.rsplit(":", 1)[1]))
        await s.send_all(b"MND")
        await s.aclose()
        # Random bytes in place of a hello.
        for _ in range(5):
            s = await trio.open_tcp_stream("127.0.0.1", int(peer.rsplit(":", 1)[1]))
            await s.send_all(os.urandom(100))
            await recv_exact(s, 100)
            await s.aclose()
        # The pooled connection, and fresh ones, are still served.
        assert await fetch(client, peer, resolver, 3) == resolver.expected(3)
        other = DataClient(("s3cret",))
        assert await fetch(other, peer, resolver, 4) == resolver.expected(4)
        await other.aclose()
        await client.aclose()
        await wait_for(lambda: server.statistics().connections == 0)
        assert server.statistics().bad_requests == 1
        nursery.cancel_scope.cancel()


async def test_a_corrupt_copy_raises_chunk_mismatch_and_the_connection_is_dropped(
    served: tuple[str, DataServer, DataClient], resolver: FileResolver, tmp_path: Path
) -> None:
    peer, _, client = served
    original = resolver.chunks[1].path
    # One flipped bit in chunk 1.
    resolver.serve_from[original] = corrupt_copy(original, tmp_path / "corrupt", CHUNK + 100)
    assert await fetch(client, peer, resolver, 0) == resolver.expected(0)  # untouched chunk
    with pytest.raises(ChunkMismatch, match=r"\[1\]"):
        await fetch(client, peer, resolver, 1)
    assert client.statistics().mismatches == 1
    resolver.serve_from.clear()
    assert await fetch(client, peer, resolver, 1) == resolver.expected(1)
    assert client.statistics().connections_opened == 2  # the one that saw a bad chunk was dropped


async def test_a_wrong_length_is_a_mismatch(
    served: tuple[str, DataServer, DataClient], resolver: FileResolver
) -> None:
    peer, _, client = served
    c = resolver.chunks[0]
    with pytest.raises(ChunkMismatch, match="offered"):
        await client.fetch_chunk(peer, MANIFEST, 0, c.length - 1, c.digest, bytearray(CHUNK))


async def test_a_server_that_never_answers_times_out(slow_autojump: trio.testing.MockClock) -> None:
    async def mute(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, mute, 0, host="127.0.0.1"))
        peer = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        client = DataClient(("s3cret",), connect_timeout_s=5, read_timeout_s=30)
        start = trio.current_time()
        with pytest.raises(DataPlaneError, match="handshake"):
            await client.have(peer, MANIFEST)
        assert 4.9 <= trio.current_time() - start <= 30
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_server_that_stalls_mid_chunk_times_out(
    slow_autojump: trio.testing.MockClock,
) -> None:
    payload = os.urandom(1000)
    async with trio.open_nursery() as nursery:
        peer = await _stalling_server(nursery, payload, 400)
        client = DataClient(("k",), read_timeout_s=7)
        start = trio.current_time()
        with pytest.raises(DataPlaneError, match="no progress"):
            await client.fetch_chunk(
                peer, MANIFEST, 0, len(payload), xxhash.xxh3_128(payload).digest(), bytearray(1000)
            )
        assert 6.9 <= trio.current_time() - start <= 7.5
        assert client.statistics().idle_connections == 0
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_server_at_its_connection_limit_says_busy(resolver: FileResolver) -> None:
    server = DataServer(resolver, ("s3cret",), max_connections=1)
    first, second = DataClient(("s3cret",)), DataClient(("s3cret",))
    async with trio.open_nursery() as nursery:
        peer = await start_server(nursery, server)
        assert await fetch(first, peer, resolver, 0) == resolver.expected(0)  # holds its connection
        with pytest.raises(PeerBusy):
            await fetch(second, peer, resolver, 0)
        await first.aclose()
        await wait_for(lambda: server.statistics().connections == 0)
        assert await fetch(second, peer, resolver, 0) == resolver.expected(0)
        await second.aclose()
        nursery.cancel_scope.cancel()


async def test_one_client_address_cannot_take_every_data_connection(resolver: FileResolver) -> None:
    """Connections that never finish the handshake used to hold every slot
    for 10 s each; one client address now holds at most ``max_per_client``."""
    server = DataServer(resolver, ("s3cret",), max_per_client=2)
    async with trio.open_nursery() as nursery:
        peer = await start_server(nursery, server)
        host, port = peer.rsplit(":", 1)
        squatters = [await trio.open_tcp_stream(host, int(port)) for _ in range(2)]
        third = await trio.open_tcp_stream(host, int(port))
        assert await recv_exact(third, 2) == bytes([0])  # busy, then closed
        # Another client address (any 127.x is this host) is still served.
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.9", 0))
        await sock.connect((host, int(port)))
        other = trio.SocketStream(sock)
        await other.send_all(b"MNDP\x02" + bytes(16))
        assert (await recv_exact(other, 17))[0] == 2  # a server hello: admitted
        for s in [*squatters, third, other]:
            await s.aclose()
        nursery.cancel_scope.cancel()
    assert server.statistics().busy_replies == 1


async def test_a_peer_that_is_not_there() -> None:
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        client = DataClient(("s3cret",))
        with pytest.raises(DataPlaneError, match="cannot open"):
            await client.have(f"127.0.0.1:{port}", MANIFEST)
        await client.aclose()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_contexts(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


async def test_tls_path(resolver: FileResolver, ca: trustme.CA) -> None:
    server_ctx, client_ctx = tls_contexts(ca)
    server = DataServer(resolver, ("s3cret",), ssl_context=server_ctx)
    client = DataClient(("s3cret",), ssl_context=client_ctx)
    async with trio.open_nursery() as nursery:
        peer = await start_server(nursery, server)
        for i in range(len(resolver.chunks)):
            assert await fetch(client, peer, resolver, i) == resolver.expected(i)
        assert await client.have(peer, MANIFEST) == resolver.have(MANIFEST)
        with pytest.raises(NotFound):
            await client.have(peer, OTHER)
        assert client.statistics().connections_opened == 1
        # A client with the wrong secret over TLS, and one without TLS: refused cleanly.
        wrong = DataClient(("nope",), ssl_context=client_ctx)
        with pytest.raises(DataPlaneAuthError):
            await fetch(wrong, peer, resolver, 0)
        await wrong.aclose()
        plain = DataClient(("s3cret",), connect_timeout_s=2)
        with pytest.raises(DataPlaneError):
            await fetch(plain, peer, resolver, 0)
        await plain.aclose()
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_tls_corrupt_copy_raises_chunk_mismatch(
    resolver: FileResolver, ca: trustme.CA, tmp_path: Path
) -> None:
    server_ctx, client_ctx = tls_contexts(ca)
    original = resolver.chunks[0].path
    resolver.serve_from[original] = corrupt_copy(original, tmp_path / "bad", 7)
    client = DataClient(("s3cret",), ssl_context=client_ctx)
    async with trio.open_nursery() as nursery:
        peer = await start_server(
            nursery, DataServer(resolver, ("s3cret",), ssl_context=server_ctx)
        )
        with pytest.raises(ChunkMismatch):
            await fetch(client, peer, resolver, 0)
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_token_bucket_limits_throughput(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(1_000_000, 100_000)
    start = trio.current_time()
    for _ in range(50):
        await bucket.take(100_000)  # 5 MB at 1 MB/s; the first 100 kB is the burst
    assert trio.current_time() - start == pytest.approx(4.9, rel=1e-6)
    # Takes larger than the burst go into debt, which the next taker waits out.
    start = trio.current_time()
    await bucket.take(1_000_000)
    await bucket.take(1)
    assert trio.current_time() - start == pytest.approx(1.0, rel=1e-3)  # from empty: 1 MB at 1 MB/s
    # Unlimited: no waiting at all.
    for rate in (0, None):
        free = TokenBucket(rate, 1)
        start = trio.current_time()
        await free.take(10**12)
        assert trio.current_time() == start
    assert bucket.statistics().taken_bytes == 6_000_001
    # The rate can change while in use (an operator lifts or tightens the limit).
    bucket.set_rate(None)
    start = trio.current_time()
    await bucket.take(10**9)
    assert trio.current_time() == start
    bucket.set_rate(2_000_000)  # the bucket is empty: 1.1 MB at 2 MB/s
    await bucket.take(100_000)
    await bucket.take(1_000_000)
    await bucket.take(1)
    assert trio.current_time() - start == pytest.approx(0.55, rel=1e-3)


async def test_token_bucket_is_fair_between_concurrent_takers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(1_000_000, 10_000)
    done: dict[str, float] = {}

    async def taker(name: str) -> None:
        for _ in range(100):
            await bucket.take(10_000)
        done[name] = trio.current_time()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker, "a")
        nursery.start_soon(taker, "b")
    assert max(done.values()) - start == pytest.approx(1.99, rel=1e-3)
    assert abs(done["a"] - done["b"]) <= 0.02


async def test_egress_and_ingress_limits_hold_on_real_sockets(
    tmp_path: Path, slow_autojump: trio.testing.MockClock
) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(8 * 1024 * 1024))
    r = FileResolver([big], chunk_bytes=8 * 1024 * 1024)
    buf = bytearray(8 * 1024 * 1024)
    c = r.chunks[0]
    for egress, ingress in (
        (TokenBucket(4 * 2**20, 2**20), None),
        (None, TokenBucket(4 * 2**20, 2**20)),
    ):
        server = DataServer(r, ("s3cret",), egress=egress)
        client = DataClient(("s3cret",), ingress=ingress)
        async with trio.open_nursery() as nursery:
            peer = await start_server(nursery, server)
            await client.have(peer, MANIFEST)  # connect first: time only the transfer
            start = trio.current_time()
            view = await client.fetch_chunk(peer, MANIFEST, 0, c.length, c.digest, buf)
            elapsed = trio.current_time() - start
            assert bytes(view) == big.read_bytes()
            # 8 MiB at 4 MiB/s with a 1 MiB burst: 1.75 s of virtual time.
            assert 1.6 <= elapsed <= 2.1, elapsed
            await client.aclose()
            nursery.cancel_scope.cancel()


async def wait_for(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Let the server's tasks run until ``cond`` holds."""
    with trio.fail_after(timeout_s):
        while not cond():
            await trio.testing.wait_all_tasks_blocked(0.001)


def corrupt_copy(src: str, dst: Path, offset: int) -> str:
    """A copy of ``src`` with one bit flipped at ``offset``."""
    data = bytearray(Path(src).read_bytes())
    data[offset] ^= 0x10
    dst.write_bytes(bytes(data))
    return str(dst)


async def test_idle_connections_to_a_peer_never_asked_again_are_closed(
    resolver: FileResolver, autojump_clock: trio.testing.MockClock
) -> None:
    one, two = DataServer(resolver, ("s3cret",)), DataServer(resolver, ("s3cret",))
    client = DataClient(("s3cret",), idle_timeout_s=5)
    async with trio.open_nursery() as nursery:
        peer_one = await start_server(nursery, one)
        peer_two = await start_server(nursery, two)
        await client.have(peer_one, MANIFEST)
        assert client.statistics().idle_connections == 1
        await trio.sleep(10)  # peer_one is never asked again (it left, say)
        await client.have(peer_two, MANIFEST)
        assert client.statistics().idle_connections == 1  # two's only: one's was swept
        await wait_for(lambda: one.statistics().connections == 0)
        await client.aclose()
        nursery.cancel_scope.cancel()


async def _stalling_server(
    nursery: trio.Nursery, payload: bytes, sent: int, ctx: ssl.SSLContext | None = None
) -> str:
    """A data server (over TLS with ``ctx``) that proves the secret "k", then
    sends the first ``sent`` bytes of a chunk and stalls."""

    async def stalls(stream: trio.SocketStream) -> None:
        s: trio.abc.Stream = stream if ctx is None else trio.SSLStream(stream, ctx, server_side=True)
        hello = await recv_exact(s, 21)
        cn, sn = hello[5:], bytes(16)
        await s.send_all(b"\x02" + sn)
        await recv_exact(s, 32)
        await s.send_all(b"\x00" + hmac.new(b"k", b"srv" + cn + sn, hashlib.sha256).digest())
        await recv_exact(s, 21)
        await s.send_all(struct.pack("!BQ", 0, len(payload)) + payload[:sent])
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, stalls, 0, host="127.0.0.1"))
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def test_a_tls_chunk_stalled_mid_way_times_out_and_a_cancel_returns_at_once(ca: trustme.CA) -> None:
    """Over TLS a chunk is decrypted in a worker thread: a stall still ends
    after the read timeout, and a cancel (a stall reassignment, an endgame
    twin that won) returns at once, the thread stopped and the connection
    dropped, not after the thread's own timeout."""
    payload = os.urandom(1_000_000)
    digest = xxhash.xxh3_128(payload).digest()
    server_ctx, client_ctx = tls_contexts(ca)
    async with trio.open_nursery() as nursery:
        peer = await _stalling_server(nursery, payload, 100_000, server_ctx)
        client = DataClient(("k",), ssl_context=client_ctx, read_timeout_s=1)
        start = time.monotonic()
        with pytest.raises(DataPlaneError, match="no progress"):
            await client.fetch_chunk(peer, MANIFEST, 0, len(payload), digest, bytearray(len(payload)))
        assert time.monotonic() - start >= 0.9  # it waited for the read timeout
        slow = DataClient(("k",), ssl_context=client_ctx, read_timeout_s=60)
        buf = bytearray(len(payload))
        with trio.fail_after(30):  # the thread alone would wait 60 s
            with trio.move_on_after(0.5) as cancelled:
                await slow.fetch_chunk(peer, MANIFEST, 0, len(payload), digest, buf)
        assert cancelled.cancelled_caught
        snapshot = bytes(buf)
        await trio.sleep(0.2)
        assert bytes(buf) == snapshot  # nothing writes into the buffer once the call returned
        assert slow.statistics().idle_connections == 0  # a connection cut mid-chunk is never reused
        for c in (client, slow):
            await c.aclose()
        nursery.cancel_scope.cancel()
