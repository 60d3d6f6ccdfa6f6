"""``Transfers.wait``: one wait for a transfer's end, for the job steps and the
serving pull alike (issue 28)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from meshnode.copies.transfer import Transfer
from meshnode.errors import MeshError
from protocol.actions import CopyOf, StartTransfer
from protocol.transfer import TransferStatus

from .conftest import Mesh

MiB = 1024 * 1024


async def test_wait_returns_the_finished_transfer(mesh: Mesh, tmp_path: Path) -> None:
    src = tmp_path / "src-model"
    src.mkdir()
    (src / "model.safetensors").write_bytes(os.urandom(3 * MiB + 5))
    a = await mesh.start("a")
    transfers = a.node.transfers
    assert transfers is not None
    r = await mesh.client.post(a.url + "/models/org/model/download",
                               json={"source_url": src.as_uri(), "target_device": "a:disk"})
    assert r.status_code == 202, r.text
    tid = r.json()["transfer_id"]

    # Several waiters of one transfer: each gets it, done, once it is.
    got: list[Transfer] = []

    async def waiter() -> None:
        got.append(await transfers.wait(tid, timeout_s=30))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(waiter)
    assert [t.id for t in got] == [tid] * 3
    assert got[0].status is TransferStatus.DONE and got[0].error is None
    assert got[0].bytes_done == got[0].bytes_total == 3 * MiB + 5
    assert transfers._finished == {}  # dropped once set: nothing kept a transfer

    # A finished one answers at once; an unknown one is not found.
    assert (await transfers.wait(tid, timeout_s=0)).status is TransferStatus.DONE
    with pytest.raises(MeshError) as e:
        await transfers.wait("0123456789abcdef")
    assert e.value.code == "TRANSFER_NOT_FOUND"


async def test_wait_times_out_then_sees_the_failure(mesh: Mesh) -> None:
    a = await mesh.start("a")
    transfers = a.node.transfers
    assert transfers is not None
    # Nobody holds it: the transfer looks for a source for a few seconds, then fails.
    t = transfers.start(StartTransfer("org/nowhere", "disk", CopyOf(None)))
    with pytest.raises(trio.TooSlowError):
        await transfers.wait(t.id, timeout_s=0.2)
    assert t.status.active
    done = await transfers.wait(t.id, timeout_s=30)
    assert done is t and done.status is TransferStatus.FAILED
    assert done.error is not None and done.error.code == "NO_SOURCE"


async def test_wait_sees_a_cancel(mesh: Mesh) -> None:
    a = await mesh.start("a")
    transfers = a.node.transfers
    assert transfers is not None
    t = transfers.start(StartTransfer("org/nowhere", "disk", CopyOf(None)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transfers.stop, t.id, "the test cancels it")
        done = await transfers.wait(t.id, timeout_s=30)
    assert done.status is TransferStatus.FAILED
    assert done.error is not None and done.error.code == "CANCELLED"
