"""Where a copy comes from: the holders of a manifest, which of them a
transfer may pull from (``usable_sources``: never one it banned), and which
copy to fetch.

The lookups read the catalog's ``copy/`` and ``xfer/`` records (``keys``) of every
node, with ``reachable(node_id)`` saying which nodes are worth asking.  The
manifest hash is a copy's identity, so a holder may hold it under any model
name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..keys import (
    COPY_PREFIX,
    XFER_PREFIX,
    CopyRecord,
    RecordError,
    SrcRecord,
    XferRecord,
    parse_copy_key,
)
from .states import TransferStatus

__all__ = [
    "Holders",
    "Usable",
    "banned_reason",
    "content_conflict",
    "fetch_conflict",
    "holders",
    "source_manifest_hash",
    "usable_sources",
]

Items = Iterable[tuple[str, str, Any]]  # (node_id, key, value) from the catalog


@dataclass(frozen=True, slots=True)
class Holders:
    nodes: frozenset[str]  # can serve chunks of the manifest now
    complete: frozenset[str]  # of those, hold it whole (the others are fetching it)


def holders(items: Items, manifest_hash: str, me: str, reachable: Callable[[str], bool]) -> Holders:
    """The reachable nodes other than ``me`` that hold ``manifest_hash``:
    complete copies, and transfers of it that are running."""
    nodes: set[str] = set()
    complete: set[str] = set()
    for nid, key, value in items:
        if nid == me or nid in complete:
            continue
        try:
            if key.startswith(COPY_PREFIX):
                if CopyRecord.from_value(value).manifest_hash != manifest_hash:
                    continue
                whole = True
            elif key.startswith(XFER_PREFIX):
                x = XferRecord.from_value(value)
                if x.manifest_hash != manifest_hash or x.status is not TransferStatus.RUNNING:
                    continue
                whole = False
            else:
                continue
        except RecordError:
            continue
        if not reachable(nid):
            continue
        nodes.add(nid)
        if whole:
            complete.add(nid)
    return Holders(frozenset(nodes), frozenset(complete))


@dataclass(frozen=True, slots=True)
class Usable:
    nodes: frozenset[str]  # the holders a transfer may pull from
    complete: frozenset[str]  # of those, hold it whole
    banned: frozenset[str]  # holders found, but banned for this transfer: no source


def usable_sources(found: Iterable[str], complete: Iterable[str], banned: Iterable[str]) -> Usable:
    """Which of the holders ``found`` (``complete`` of them whole) a transfer
    may pull from: all but the ones its chunk plan ``banned`` (they served
    bytes that failed their hash).  A banned holder is never a source: a
    transfer whose only holders are banned has no source, waits for one as
    for a holder that is gone, and fails ``NO_SOURCE`` at the same bound."""
    found_set, bad = frozenset(found), frozenset(banned)
    nodes = found_set - bad
    return Usable(nodes, nodes & frozenset(complete), found_set & bad)


BANS_NAMED = 4  # banned holders a reason names, then how many more


def banned_reason(bad_chunks: Mapping[str, int | None]) -> str:
    """Why banned holders serve nothing, for a transfer's note and its
    ``NO_SOURCE`` error: node id -> the chunk that failed its hash (None:
    not known).  "node a's copy is banned (chunk 3 failed its hash)"."""
    said = []
    for nid in sorted(bad_chunks)[:BANS_NAMED]:
        chunk = bad_chunks[nid]
        why = "a chunk failed its hash" if chunk is None else f"chunk {chunk} failed its hash"
        said.append(f"node {nid}'s copy is banned ({why})")
    more = len(bad_chunks) - BANS_NAMED
    if more > 0:
        said.append(f"{more} more banned")
    return "; ".join(said)


def source_manifest_hash(
    copy_items: Items, model: str, source: str | None, me: str, reachable: Callable[[str], bool]
) -> str | None:
    """The manifest hash of the copy of ``model`` to fetch: the one on the
    ``source`` device (``node:kind``) if named, else the copy most reachable
    nodes hold, the newest among equals.  None: no such copy."""
    votes: dict[str, tuple[int, int]] = {}  # hash -> (reachable holders, newest published_ms)
    for nid, key, value in copy_items:
        parsed = parse_copy_key(key)
        if parsed is None or parsed[0] != model:
            continue
        try:
            c = CopyRecord.from_value(value)
        except RecordError:
            continue
        if source is not None:
            if f"{nid}:{parsed[1]}" == source:
                return c.manifest_hash
            continue
        if nid == me or reachable(nid):
            n, newest = votes.get(c.manifest_hash, (0, 0))
            votes[c.manifest_hash] = (n + 1, max(newest, c.published_ms))
    return max(votes, key=lambda h: votes[h]) if votes else None


def content_conflict(copy_items: Items, model: str, manifest_hash: str) -> str | None:
    """One model, one content: a device (``node:kind``) that holds a copy of
    ``model`` with other bytes than ``manifest_hash``, if any.  A new copy
    made from outside (a path, the web) with different bytes is refused
    while one exists, rather than leaving the model with two manifests."""
    for nid, key, value in copy_items:
        parsed = parse_copy_key(key)
        if parsed is None or parsed[0] != model:
            continue
        try:
            if CopyRecord.from_value(value).manifest_hash != manifest_hash:
                return f"{nid}:{parsed[1]}"
        except RecordError:
            continue
    return None


def fetch_conflict(copy_items: Items, src_items: Items, model: str, source_id: str, *, purged: bool,
                   reachable: Callable[[str], bool]) -> str | None:
    """Before fetching from outside: a device holding a copy of ``model`` whose
    bytes no node made from ``source_id`` (its ``src/`` records), if any.  Such
    a fetch could only end in ``content_conflict``, so it is refused before a
    byte is fetched.  A copy some node made from this same source is no
    conflict, even while its holders are unreachable; nor, when the model was
    unregistered with purge, a copy whose reachable holder is deleting it."""
    made: set[str] = set()
    for _nid, _key, value in src_items:
        try:
            rec = SrcRecord.from_value(value)
        except RecordError:
            continue
        if rec.source_id == source_id:
            made.add(rec.manifest_hash)
    for nid, key, value in copy_items:
        parsed = parse_copy_key(key)
        if parsed is None or parsed[0] != model or (purged and reachable(nid)):
            continue
        try:
            if CopyRecord.from_value(value).manifest_hash not in made:
                return f"{nid}:{parsed[1]}"
        except RecordError:
            continue
    return None
