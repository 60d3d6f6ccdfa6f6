"""Real daemons pulling one copy at once (issue 26): neighbours hear of each
other's chunks with HAVE_WAIT, pass chunks on as they arrive, and the seed
sends each chunk about once; a rack label reaches the policy."""

from __future__ import annotations

from pathlib import Path

from meshnode.copies.puller import bitfield_mask, bitfield_of_mask

from .conftest import Mesh, wait_for, wait_transfer
from .test_transfer import MiB, copy_dir, ingest, make_model, start, tree_digest, until_copies


async def test_three_receivers_pass_chunks_on_as_they_arrive(mesh: Mesh, tmp_path: Path) -> None:
    src = make_model(tmp_path, 16 * MiB)
    # The seed's upload is what every chunk goes through once (6 MB/s), and each receiver takes
    # at most as much: a chunk takes a while to arrive, and a star would take three times as long.
    seed = await start(mesh, "seed", "--max-egress", "6M")
    rs = [await start(mesh, f"r{i}", "--max-ingress", "6M", join=[seed]) for i in range(3)]
    await ingest(mesh, seed, "m", src)
    for r in rs:
        await until_copies(mesh, r.url, "m", 1)
    sent_before = seed.node.data_server_stats()["bytes_sent"]
    tids = []
    for r in rs:
        resp = await mesh.client.post(r.url + "/models/m/copy", json={"to_device": f"{r.node.cfg.node_id}:disk"})
        assert resp.status_code == 202, resp.text
        tids.append(resp.json()["transfer_id"])
    for r, tid in zip(rs, tids, strict=True):
        t = await wait_transfer(mesh, r.url, tid, timeout_s=60)
        assert t["status"] == "done", t
        assert tree_digest(copy_dir(r, "disk", "m")) == tree_digest(src)
    stats = [r.node.data_server_stats() for r in rs]
    assert sum(s["passed_on"] for s in stats) > 0, stats  # chunks went on before they were whole here
    assert sum(s["have_waits"] for s in stats) > 0, stats  # and the receivers told each other of them
    seed_sent = seed.node.data_server_stats()["bytes_sent"] - sent_before
    assert seed_sent < 2 * 16 * MiB, seed_sent  # a star sends three copies


async def test_a_rack_label_reaches_the_puller(mesh: Mesh, tmp_path: Path) -> None:
    a = await start(mesh, "a", "--labels", "rack=r1")
    b = await start(mesh, "b", "--labels", "rack=r2,zone=z", join=[a])
    c = await start(mesh, "c", join=[a])

    await wait_for(lambda: c.node.puller._racks({"a": "", "b": ""}) == {"a": "r1", "b": "r2"}, what="racks heard")
    assert b.node.puller._racks({}) == {"b": "r2"}


def test_bitfields_and_chunk_masks_convert_both_ways() -> None:
    for n in (1, 7, 8, 9, 256, 1001):
        mask = bytes((i * 7 + 3) % 5 == 0 for i in range(n))
        bits = bitfield_of_mask(mask)
        assert len(bits) == (n + 7) // 8
        assert bitfield_mask(bits, n) == mask
    assert bitfield_mask(b"\xa0", 3) == b"\x01\x00\x01"
    assert bitfield_mask(b"", 4) == bytes(4)  # a short bitfield: nothing held beyond it
