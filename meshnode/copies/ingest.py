"""Ingest from outside (Hugging Face Hub, HTTP(S), S3: ``sources.FETCHERS``), once per mesh.

The decision of who fetches is ``protocol.transfer.claims`` (earliest claim
wins); this module does the waiting, the fetching into a staging directory on
the target tier's filesystem, and hands the result to the store, which hashes
it into a manifest once and renames the files into the copy (the tier needs
room for one copy, not two).  From then on the mesh moves the copy peer to
peer.

A node that holds a copy made from a source advertises it in its own
``src/<source id digest>`` record (``SrcRecord``), so later requests anywhere
copy from the mesh.
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections import Counter
from collections.abc import Callable

import trio

from protocol import HLC
from protocol.actions import Web
from protocol.keys import COPY_PREFIX, REG_PREFIX, SRC_PREFIX, XFER_PREFIX, SrcRecord, src_key
from protocol.registry import purged_models
from protocol.sources import SourceKind
from protocol.transfer.claims import choose_fetcher, live_claims, mesh_copy, source_id
from protocol.transfer.sources import fetch_conflict

from ..errors import only
from ..mesh import Mesh, wall_ms
from ..persist import make_dirs
from .catalog import conflict_error, one_content
from .puller import MakeRoom, Puller, no_eviction
from .sources import SourceError, SourceResult, fetch_source, fetcher_for, hub_hosts, source_url
from .sources.hf import parse_hf_ref, resolve_hf_commit
from .store import Copy, Store
from .transfer import Transfer

__all__ = ["WebIngest", "hf_repo"]

log = logging.getLogger("meshnode.copies.ingest")

SETTLE_ROUNDS = 4  # gossip intervals a claim waits for concurrent claims to meet
WAIT_MAX_S = 24 * 3600.0  # a claimant waits at most this long for the winner


def hf_repo(url: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``url`` names a Hugging Face repo (on the
    hub or on the ``HF_ENDPOINT`` mirror), else None; parsed as the fetcher
    parses it, so both agree on what is fetched."""
    try:
        if source_url(url, hub_hosts()).kind is not SourceKind.HUB:
            return None
        repo, rev, _origin = parse_hf_ref(url)
    except SourceError:
        return None
    return repo, rev


class WebIngest:
    def __init__(
        self,
        mesh: Mesh,
        hlc: HLC,
        store: Store,
        puller: Puller,
        publish: Callable[[Transfer], None],
        *,
        settle_s: float,
        allow_private: bool,
        s3_endpoint: str | None = None,
    ) -> None:
        self.s3_endpoint = s3_endpoint
        self.make_room: MakeRoom = no_eviction  # the evictor's, once the node has one
        self.mesh = mesh
        self.hlc = hlc
        self.store = store
        self.puller = puller
        self.publish = publish  # a transfer's progress into the catalog
        self.settle_s = settle_s
        self.allow_private = allow_private
        self.fetched_bytes: Counter[str] = Counter()  # from outside the mesh since start: hf, http, s3

    def _mesh_copy(self, sid: str) -> str | None:
        """The manifest hash of a copy made from ``sid`` that we can have."""
        return mesh_copy(self.mesh.items(SRC_PREFIX), sid,
                         lambda h: self.store.find(h) is not None or bool(self.puller.holders(h)[0]))

    async def ingest(self, t: Transfer, web: Web) -> Copy | None:
        """Bring ``web`` into the mesh for ``t``.  Returns the copy if this node
        fetched it; None when ``t.manifest_hash`` now names a mesh copy to pull
        instead."""
        url = web.url
        hf = hf_repo(url)
        revision = web.revision or (hf[1] if hf else None)
        if hf is not None:
            # The same source means the same commit: resolve the branch or tag first
            # (one metadata request), and fetch exactly that commit if we fetch.
            repo, revision = await resolve_hf_commit(f"hf://{hf[0]}", revision=revision)
            hf = (repo, revision)
        sid = source_id(f"hf:{hf[0]}" if hf else url, revision, web.allow_patterns, web.ignore_patterns)
        t.source_id = sid
        h = self._mesh_copy(sid)
        if h is not None:
            t.manifest_hash, t.note = h, "already in the mesh: copying it from there"
            return None
        other = fetch_conflict(self.mesh.items(COPY_PREFIX), self.mesh.items(SRC_PREFIX), t.model, sid,
                               purged=t.model in purged_models(self.mesh.items(REG_PREFIX)),
                               reachable=lambda nid: nid == self.mesh.id or self.mesh.reachable(nid))
        if other is not None:  # it could only end in CONTENT_CONFLICT: refused before a byte is fetched
            raise conflict_error(t.model, other)
        if t.claim is None:  # a resumed transfer keeps its place in the queue
            t.claim = self.hlc.now(wall_ms())
        self.publish(t)
        await trio.sleep(self.settle_s)
        deadline = trio.current_time() + WAIT_MAX_S
        me = self.mesh.id
        while trio.current_time() < deadline:
            h = self._mesh_copy(sid)
            if h is not None:
                t.manifest_hash, t.note = h, "fetched by another node: copying it from the mesh"
                return None
            winner = choose_fetcher(live_claims(self.mesh.items(XFER_PREFIX), sid, me, self.mesh.reachable))
            if winner in (None, me):
                return await self._fetch(t, web, hf, revision, sid)
            if t.note != f"waiting for {winner}, which is fetching it":
                t.note = f"waiting for {winner}, which is fetching it"
                log.info("transfer %s: %s", t.id, t.note)
                self.publish(t)
            await trio.sleep(0.5)
        raise SourceError("UNAVAILABLE", f"gave up waiting for another node to fetch {url}")

    async def _fetch(self, t: Transfer, web: Web, hf: tuple[str, str | None] | None, revision: str | None,
                     sid: str) -> Copy:
        staging = self.store.staging_dir(t.kind, f"ingest-{t.id}")
        make_dirs(staging)
        t.note = "fetching from the source"
        url = f"hf://{hf[0]}" if hf is not None else web.url
        kind = fetcher_for(url).label  # as fetch_source will fetch it

        def progress(done: int, total: int | None, files_done: int, files_total: int | None) -> None:
            if done > t.bytes_done:
                self.fetched_bytes[kind] += done - t.bytes_done
            t.bytes_done, t.bytes_total = done, total or t.bytes_total
            t.files_done, t.files_total = files_done, files_total or t.files_total

        try:
            result: SourceResult = await fetch_source(
                url, staging, progress=progress, revision=revision,
                allow_patterns=web.allow_patterns, ignore_patterns=web.ignore_patterns,
                allow_private=self.allow_private, s3_endpoint=self.s3_endpoint,
                reserve=functools.partial(self.make_room, t.kind, t.model),
            )
            copy = await trio.to_thread.run_sync(functools.partial(
                self.store.ingest_path, t.kind, t.model, staging, adopt=True, accept=one_content(self.mesh, t.model)))
        except BaseException as e:
            if not only(e, trio.Cancelled):  # a crash or stop keeps the partial files for the resume
                await trio.to_thread.run_sync(shutil.rmtree, staging, True)
            raise
        await trio.to_thread.run_sync(shutil.rmtree, staging, True)
        t.manifest_hash = copy.manifest_hash
        self.mesh.set(src_key(sid), SrcRecord(sid, copy.manifest_hash, t.model, result.revision).to_value())
        t.note = f"fetched {len(result.files)} files" + (f" at {result.revision}" if result.revision else "")
        t.fetched = {"revision": result.revision, "model_type": result.model_type}
        return copy
