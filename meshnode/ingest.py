"""Ingest from outside (Hugging Face Hub, HTTP(S)), once per mesh.

The decision of who fetches is ``protocol.ingest`` (earliest claim wins);
this module does the waiting, the fetching into a staging directory on the
target tier's filesystem, and hands the result to the store, which hashes it
into a manifest once and renames the files into the copy (the tier needs room
for one copy, not two).  From then on the mesh moves the copy peer to peer.

A node that holds a copy made from a source advertises it in its own
catalog key ``src/<source id digest>`` -> ``{"source_id", "manifest_hash",
"model", "revision"}``, so later requests anywhere copy from the mesh.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import trio
import xxhash

from protocol.hlc import Stamp
from protocol.ingest import Claim, choose_fetcher, source_id

from .persist import make_dirs
from .sources import SourceError, SourceResult, fetch_source, is_hf_source
from .sources.hf import parse_hf_ref, resolve_hf_commit
from .transfer import XFER_PREFIX, _only_cancelled

if TYPE_CHECKING:
    from .store import Copy
    from .transfer import Transfer, Transfers

__all__ = ["SRC_PREFIX", "hf_repo", "ingest_web", "src_key"]

log = logging.getLogger("meshnode.ingest")

SRC_PREFIX = "src/"
SETTLE_ROUNDS = 4  # gossip intervals a claim waits for concurrent claims to meet
WAIT_MAX_S = 24 * 3600.0  # a claimant waits at most this long for the winner


def src_key(sid: str) -> str:
    return SRC_PREFIX + xxhash.xxh3_64_hexdigest(sid.encode())


def hf_repo(url: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``url`` names a Hugging Face repo (on the
    hub or on the ``HF_ENDPOINT`` mirror), else None; parsed as the fetcher
    parses it, so both agree on what is fetched."""
    endpoint_host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    if not (is_hf_source(url) or (url.startswith(("http://", "https://")) and urlparse(url).hostname == endpoint_host)):
        return None
    try:
        repo, rev, _origin = parse_hf_ref(url)
    except SourceError:
        return None
    return repo, rev


def _claims(transfers: Transfers, sid: str) -> list[Claim]:
    node = transfers.node
    g = node.gossip
    assert g is not None
    out = []
    for nid, _key, value in g.catalog.items(XFER_PREFIX):
        if not isinstance(value, dict) or value.get("source_id") != sid:
            continue
        if value.get("status") not in ("queued", "running"):
            continue
        m = g.members.get(nid)
        if nid != node.cfg.node_id and (m is None or not m.state.reachable):
            continue
        try:
            out.append(Claim(Stamp.from_wire(value.get("claim")), nid))
        except Exception:
            continue
    return out


def _mesh_copy(transfers: Transfers, sid: str) -> str | None:
    """The manifest hash of a live copy made from ``sid``, if any node has one."""
    g = transfers.node.gossip
    assert g is not None
    for _nid, _key, value in g.catalog.items(SRC_PREFIX):
        if isinstance(value, dict) and value.get("source_id") == sid:
            h = value.get("manifest_hash")
            if isinstance(h, str) and (transfers.node.store.find(h) or transfers.holders(h)):
                return h
    return None


async def ingest_web(transfers: Transfers, t: Transfer, url: str, options: dict[str, Any]) -> Copy | None:
    """Bring ``url`` into the mesh for ``t``.  Returns the copy if this node fetched
    it; None when ``t.manifest_hash`` now names a mesh copy to pull instead."""
    node = transfers.node
    g = node.gossip
    assert g is not None
    hf = hf_repo(url)
    revision = options.get("revision") or (hf[1] if hf else None)
    if hf is not None:
        # The same source means the same commit: resolve the branch or tag first
        # (one metadata request), and fetch exactly that commit if we fetch.
        repo, revision = await resolve_hf_commit(f"hf://{hf[0]}", revision=revision)
        hf = (repo, revision)
    sid = source_id(f"hf:{hf[0]}" if hf else url, revision,
                    options.get("allow_patterns"), options.get("ignore_patterns"))
    t.source_id = sid
    h = _mesh_copy(transfers, sid)
    if h is not None:
        t.manifest_hash, t.note = h, "already in the mesh: copying it from there"
        return None
    if t.claim is None:  # a resumed transfer keeps its place in the queue
        t.claim = node.hlc.now(int(time.time() * 1000)).to_wire()
    transfers._publish_progress(t)
    await trio.sleep(SETTLE_ROUNDS * node.cfg.gossip.gossip_interval_s)
    deadline = trio.current_time() + WAIT_MAX_S
    while trio.current_time() < deadline:
        h = _mesh_copy(transfers, sid)
        if h is not None:
            t.manifest_hash, t.note = h, "fetched by another node: copying it from the mesh"
            return None
        winner = choose_fetcher(_claims(transfers, sid))
        if winner in (None, node.cfg.node_id):
            return await _fetch(transfers, t, url, hf, revision, sid, options)
        if t.note != f"waiting for {winner}, which is fetching it":
            t.note = f"waiting for {winner}, which is fetching it"
            log.info("transfer %s: %s", t.id, t.note)
            transfers._publish_progress(t)
        await trio.sleep(0.5)
    raise SourceError("UNAVAILABLE", f"gave up waiting for another node to fetch {url}")


async def _fetch(transfers: Transfers, t: Transfer, url: str, hf: tuple[str, str | None] | None,
                 revision: str | None, sid: str, options: dict[str, Any]) -> Copy:
    node = transfers.node
    g = node.gossip
    assert g is not None
    staging = node.store.staging_dir(t.kind, f"ingest-{t.id}")
    make_dirs(staging)
    t.note = "fetching from the source"

    def progress(done: int, total: int | None, files_done: int, files_total: int | None) -> None:
        t.bytes_done, t.bytes_total = done, total or t.bytes_total
        t.files_done, t.files_total = files_done, files_total or t.files_total

    try:
        result: SourceResult = await fetch_source(
            f"hf://{hf[0]}" if hf is not None else url, staging, progress=progress, revision=revision,
            allow_patterns=options.get("allow_patterns"), ignore_patterns=options.get("ignore_patterns"),
            allow_private=node.cfg.allow_private_sources,
        )
        copy = await trio.to_thread.run_sync(functools.partial(node.store.ingest_path, t.kind, t.model, staging, adopt=True))
    except BaseException as e:
        if not _only_cancelled(e):  # a crash or stop keeps the partial files for the resume
            await trio.to_thread.run_sync(shutil.rmtree, staging, True)
        raise
    await trio.to_thread.run_sync(shutil.rmtree, staging, True)
    t.manifest_hash = copy.manifest_hash
    g.set(src_key(sid), {"source_id": sid, "manifest_hash": copy.manifest_hash, "model": t.model,
                         "revision": result.revision}, trio.current_time())
    t.note = f"fetched {len(result.files)} files" + (f" at {result.revision}" if result.revision else "")
    t.fetched = {"revision": result.revision, "model_type": result.model_type}
    return copy

