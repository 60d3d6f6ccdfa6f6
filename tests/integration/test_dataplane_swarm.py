"""The data plane's swarm requests on real loopback sockets (issue 26):
HAVE_WAIT (neighbours hear of new chunks at once), cut-through (a chunk
passed on as it arrives, never whole if it fails its hash here), and upload
slots (a holder's sends beyond them wait their turn)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing
import xxhash

from meshnode.copies.dataplane import (
    HOLD_BYTES,
    Arriving,
    DataClient,
    DataPlaneError,
    DataServer,
    NotFound,
    RequestRefused,
)
from meshnode.copies.dataplane.common import RECV_LOWAT_BYTES
from meshnode.ratelimit import TokenBucket

from .test_dataplane import CHUNK, MANIFEST, OTHER, FileResolver, start_server

# Chunks larger than what a holder keeps back until it verified one, and than what a reader
# waits for before it is woken.
BIG = RECV_LOWAT_BYTES + 4 * HOLD_BYTES


class SwarmFake(FileResolver):
    """A holder building the copy: a version that moves, and chunks arriving."""

    def __init__(self, files: list[Path]) -> None:
        super().__init__(files, BIG)
        self.version = 1
        self.changed = trio.Event()
        self.held = {0}
        self.incoming: dict[int, Arriving] = {}

    def bump(self) -> None:
        self.version += 1
        event, self.changed = self.changed, trio.Event()
        event.set()

    def bits(self) -> bytes:
        out = bytearray((len(self.chunks) + 7) // 8)
        for i in self.held | set(self.incoming):
            out[i // 8] |= 0x80 >> (i % 8)
        return bytes(out)

    def locate(self, manifest_hash_hex: str, index: int) -> tuple[str, int, int] | None:
        return super().locate(manifest_hash_hex, index) if index in self.held else None

    async def wait_have(self, manifest_hash_hex: str, known: int, timeout_s: float) -> tuple[int, bytes] | None:
        if manifest_hash_hex != MANIFEST:
            return None
        if known == self.version:
            with trio.move_on_after(timeout_s):
                await self.changed.wait()
        return self.version, self.bits()

    def arriving(self, manifest_hash_hex: str, index: int) -> Arriving | None:
        return self.incoming.get(index) if manifest_hash_hex == MANIFEST else None


@pytest.fixture
def fake(tmp_path: Path) -> SwarmFake:
    a = tmp_path / "model.safetensors"
    a.write_bytes(os.urandom(4 * BIG + 99))
    return SwarmFake([a])


async def test_have_wait_answers_at_once_when_news_is_there_and_when_news_comes(
    fake: SwarmFake, autojump_clock: trio.testing.MockClock
) -> None:
    client = DataClient(("s3cret",))
    async with trio.open_nursery() as nursery:
        peer = await start_server(nursery, DataServer(fake, ("s3cret",)))
        version, bits = await client.have_wait(peer, MANIFEST, 0, 5.0)  # it knows nothing: at once
        assert (version, bits) == (1, fake.bits()) and bits[0] == 0x80

        async def later() -> None:
            await trio.sleep(1.0)
            fake.held.add(2)
            fake.bump()

        nursery.start_soon(later)
        t0 = trio.current_time()
        version, bits = await client.have_wait(peer, MANIFEST, 1, 5.0)  # nothing new yet: it waits for the news
        assert 1.0 <= trio.current_time() - t0 < 1.5
        assert version == 2 and bits[0] == 0x80 | 0x20
        t0 = trio.current_time()
        assert await client.have_wait(peer, MANIFEST, 2, 3.0) == (2, bits)  # no news: the same after the wait
        assert trio.current_time() - t0 >= 3.0
        with pytest.raises(NotFound):
            await client.have_wait(peer, OTHER, 0, 1.0)
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_node_that_predates_have_wait_refuses_it_and_keeps_serving(tmp_path: Path) -> None:
    a = tmp_path / "m"
    a.write_bytes(os.urandom(2 * CHUNK))
    old = FileResolver([a])  # no wait_have: as a node before issue 26
    client = DataClient(("s3cret",))
    async with trio.open_nursery() as nursery:
        peer = await start_server(nursery, DataServer(old, ("s3cret",)))
        with pytest.raises(RequestRefused):
            await client.have_wait(peer, MANIFEST, 0, 1.0)
        assert await client.have(peer, MANIFEST) == old.have(MANIFEST)  # so the asker falls back to HAVE
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_chunk_is_passed_on_as_it_arrives_and_its_last_bytes_once_verified(fake: SwarmFake) -> None:
    c = fake.chunks[1]
    data = fake.expected(1)
    buf = bytearray(BIG)
    incoming = fake.incoming[1] = Arriving(buf, c.length)
    client = DataClient(("s3cret",))
    got: list[int] = []
    async with trio.open_nursery() as nursery:
        server = DataServer(fake, ("s3cret",))
        peer = await start_server(nursery, server)
        done = trio.Event()

        async def receive() -> None:
            out = bytearray(BIG)
            view = await client.fetch_chunk(peer, MANIFEST, 1, c.length, c.digest, out, progress=got.append)
            assert bytes(view) == data
            done.set()

        nursery.start_soon(receive)
        for end in range(8192, c.length + 1, 8192):  # the chunk arrives here in steps
            buf[end - 8192 : end] = data[end - 8192 : end]
            incoming.progress(end)
            await trio.sleep(0.01)
        with trio.move_on_after(0.5):
            await done.wait()
        assert not done.is_set()  # every byte is here, but not verified: the last ones wait
        assert got and got[-1] <= c.length - HOLD_BYTES  # and all the others went on
        incoming.done(True)
        with trio.fail_after(5):
            await done.wait()
        assert server.statistics().passed_on == 1
        with trio.fail_after(5):  # the same connection again: its reader is woken for a short answer too
            c0 = fake.chunks[0]
            assert bytes(await client.fetch_chunk(peer, MANIFEST, 0, c0.length, c0.digest, bytearray(BIG))) \
                == fake.expected(0)
        assert client.statistics().connections_opened == 1
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_chunk_that_fails_its_hash_here_is_never_passed_on_whole(fake: SwarmFake) -> None:
    c = fake.chunks[1]
    buf = bytearray(os.urandom(BIG))
    incoming = fake.incoming[1] = Arriving(buf, c.length)
    incoming.progress(c.length)  # every byte arrived, and they are wrong
    client = DataClient(("s3cret",))
    got: list[int] = []
    async with trio.open_nursery() as nursery:
        peer = await start_server(nursery, DataServer(fake, ("s3cret",)))

        async def fail_soon() -> None:
            await trio.sleep(0.3)
            incoming.done(False)

        nursery.start_soon(fail_soon)
        with pytest.raises(DataPlaneError) as e, trio.fail_after(5):
            await client.fetch_chunk(peer, MANIFEST, 1, c.length, c.digest, bytearray(BIG), progress=got.append)
        assert "mismatch" not in str(e.value).lower()  # not the holder's fault: no strike
        assert got[-1] <= c.length - HOLD_BYTES
        # The server goes on serving: the verified chunk comes whole.
        out = await client.fetch_chunk(peer, MANIFEST, 0, fake.chunks[0].length, fake.chunks[0].digest,
                                       bytearray(BIG))
        assert bytes(out) == fake.expected(0)
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_sends_beyond_the_upload_slots_wait_their_turn(tmp_path: Path) -> None:
    a = tmp_path / "m"
    a.write_bytes(os.urandom(6 * CHUNK))
    r = FileResolver([a])
    server = DataServer(r, ("s3cret",), upload_slots=2, egress=TokenBucket(8 * CHUNK, CHUNK))
    client = DataClient(("s3cret",))
    most = 0
    async with trio.open_nursery() as nursery:
        peer = await start_server(nursery, server)

        async def one(i: int) -> None:
            c = r.chunks[i]
            view = await client.fetch_chunk(peer, MANIFEST, i, c.length, c.digest, bytearray(CHUNK))
            assert xxhash.xxh3_128(view).digest() == c.digest

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, server.statistics().sending)
                await trio.sleep(0.005)

        nursery.start_soon(watch)
        async with trio.open_nursery() as fetches:
            for i in range(6):
                fetches.start_soon(one, i)
        assert most == 2  # six asked at once, two sent at a time, all six served
        await client.aclose()
        nursery.cancel_scope.cancel()
