"""Real daemons on loopback, in one trio run: start, kill (no goodbye), stop (leave)."""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from meshnode.config import add_start_arguments, config_from_args
from meshnode.daemon import MeshNode
from tests.needs import unavailable

# Gossip fast; probe at a pace a loaded 2-core CI machine keeps up with.
FAST = ["--gossip-interval", "0.1", "--probe-interval", "0.4"]


@dataclass
class Handle:
    node: MeshNode
    scope: trio.CancelScope
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        assert self.node.url is not None
        return self.node.url

    @property
    def address(self) -> str:
        assert self.node.address is not None
        return self.node.address

    def kill(self) -> None:
        """Vanish without telling anyone, like kill -9 or a pulled cable."""
        self.scope.cancel()

    async def stop(self) -> None:
        """Leave the mesh cleanly, as on SIGTERM."""
        self.node.stop()
        await self.done.wait()


class Mesh:
    def __init__(self, nursery: trio.Nursery, root: Path) -> None:
        self.nursery = nursery
        self.root = root
        self.client = httpx.AsyncClient(timeout=10)

    async def start(self, node_id: str, *extra: str, join: list[Handle] | None = None, env: dict[str, str] | None = None,
                    data_dir: Path | None = None, confined: bool = False) -> Handle:
        """Start a node.  Unless ``confined``, it may ingest from anywhere in
        the test's directory and fetch from the test's servers on loopback
        (the defaults, <data-dir>/import and public hosts only, have tests of
        their own)."""
        p = argparse.ArgumentParser()
        add_start_arguments(p)
        # Every node's RAM tier inside the test's own directory, never the shared /dev/shm.
        dram = [] if "--dram-dir" in extra else ["--dram-dir", str(self.root / f"{node_id}-shm")]
        opened = [] if confined else ["--ingest-roots", str(self.root), "--allow-private-sources"]
        argv = ["--node-id", node_id, "--port", "0", "--data-dir", str(data_dir or self.root / node_id), *dram, *FAST, *opened, *extra]
        if join:
            argv += ["--join", ",".join(h.address for h in join)]
        cfg = config_from_args(p.parse_args(argv), env=env or {})
        node = MeshNode(cfg)
        scope = trio.CancelScope()
        handle = Handle(node, scope)

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await node.run(task_status=task_status)
            handle.done.set()

        await self.nursery.start(run)
        return handle


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async with trio.open_nursery() as nursery:
        m = Mesh(nursery, tmp_path)
        yield m
        await m.client.aclose()
        nursery.cancel_scope.cancel()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """``tmpfs(mib)`` mounts a tmpfs of that size (a small RAM tier that fills
    up); every mount is removed at the end.  Skips without the right to mount
    (fails as root: see ``tests.needs``)."""
    mounts: list[Path] = []

    def mount(mib: int) -> Path:
        mnt = tmp_path / f"tmpfs{len(mounts)}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            unavailable(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def wait_for(check: Callable[[], object], timeout_s: float = 15.0, what: str = "condition") -> None:
    """Poll ``check`` (sync or async) until it is truthy; fail after ``timeout_s``."""
    with trio.move_on_after(timeout_s):
        while True:
            r = check()
            if hasattr(r, "__await__"):
                r = await r  # type: ignore[misc]
            if r:
                return
            await trio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def raw_oversized_post(address: str, path: str, content_length: int) -> bytes:
    """Announce a body of ``content_length`` bytes, send a little of it, return the reply head."""
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        head = f"POST {path} HTTP/1.1\r\nhost: {address}\r\ncontent-length: {content_length}\r\n\r\n"
        await stream.send_all(head.encode() + b"x" * 1024)
        data = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
        return data


async def wait_transfer(mesh: Mesh, url: str, tid: str, timeout_s: float = 30) -> dict[str, Any]:
    """Poll ``GET /transfers/{tid}`` on ``url`` until it is done or failed; its last answer."""
    out: dict[str, Any] = {}

    async def finished() -> bool:
        out.update((await mesh.client.get(url + f"/transfers/{tid}")).json())
        return out.get("status") in ("done", "failed")

    await wait_for(finished, timeout_s, what=f"transfer {tid}")
    return out


async def all_alive(mesh: Mesh, handles: list[Handle]) -> None:
    """Wait until every one of ``handles`` sees all of them alive."""
    async def check() -> bool:
        for h in handles:
            nodes = (await mesh.client.get(h.url + "/nodes")).json()["nodes"]
            if [n["state"] for n in nodes] != ["alive"] * len(handles):
                return False
        return True

    await wait_for(check, what=f"{len(handles)} nodes alive")


async def run_pipeline(mesh: Mesh, h: Handle, doc: dict[str, Any], timeout_s: float = 60) -> dict[str, Any]:
    """Submit ``doc`` to ``h`` and wait until the job ends; the job as ``h`` shows it then."""
    r = await mesh.client.post(h.url + "/jobs", json=doc)
    assert r.status_code == 202, r.text
    jid = r.json()["job_id"]
    out: dict[str, Any] = {}

    async def ended() -> bool:
        nonlocal out
        out = (await mesh.client.get(h.url + f"/jobs/{jid}")).json()
        return out["status"] in ("completed", "failed", "cancelled")

    await wait_for(ended, timeout_s, what=f"pipeline {doc.get('name')}")
    return out
