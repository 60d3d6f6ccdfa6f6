"""Once per mesh: which node fetches an outside source, decided with no head.

Theory of operation
-------------------
A source is named by a canonical *source id* (``hf:owner/name@<commit>``
plus the file patterns, or the URL itself).  A node asked to ingest it:

1. looks for a node that already holds a copy made from that source id: if
   one does, it copies from the mesh instead;
2. otherwise publishes a *claim* in its own catalog keys (the transfer's
   ``xfer/`` key with ``source_id`` and an HLC ``claim`` stamp), waits a
   settle time of a few gossip rounds so that concurrent claims meet, and
3. among the claims it can see from live nodes, the lowest
   ``(claim stamp, node id)`` fetches; every other claimant waits for the
   winner's copy and then pulls it peer to peer.  If the winner fails, dies
   or withdraws, the claimants decide again among the claims that remain.

Two nodes asked at the same moment see each other's claims after the settle
time (gossip converges in a few rounds), so one of them fetches.  Under a
partition each side may fetch once; that is the price of having no head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..hlc import Stamp
from ..keys import RecordError, SrcRecord, XferRecord

__all__ = ["Claim", "choose_fetcher", "live_claims", "mesh_copy", "source_id"]


def source_id(url: str, revision: str | None = None, allow: Sequence[str] | None = None,
              ignore: Sequence[str] | None = None) -> str:
    """A canonical name for "these bytes from that source"."""
    parts = [url.rstrip("/")]
    if revision:
        parts.append("@" + revision)
    if allow:
        parts.append("+" + ",".join(sorted(allow)))
    if ignore:
        parts.append("-" + ",".join(sorted(ignore)))
    return "".join(parts)


@dataclass(frozen=True, slots=True, order=True)
class Claim:
    stamp: Stamp
    node_id: str


def choose_fetcher(claims: Iterable[Claim]) -> str | None:
    """The node that fetches: the earliest claim, ties broken by node id."""
    best = min(claims, default=None)
    return None if best is None else best.node_id


def live_claims(xfer_items: Iterable[tuple[str, str, Any]], sid: str, me: str,
                reachable: Callable[[str], bool]) -> list[Claim]:
    """The claims on source ``sid`` that still count: of transfers queued or
    running, on this node or a reachable one."""
    out = []
    for nid, _key, value in xfer_items:
        try:
            x = XferRecord.from_value(value)
        except RecordError:
            continue
        if x.source_id != sid or not x.status.active or x.claim is None:
            continue
        if nid != me and not reachable(nid):
            continue
        out.append(Claim(x.claim, nid))
    return out


def mesh_copy(src_items: Iterable[tuple[str, str, Any]], sid: str, available: Callable[[str], bool]) -> str | None:
    """The manifest hash of a copy made from ``sid`` that ``available(hash)``
    says can be had (held here, or by a reachable holder), if any node made one."""
    for _nid, _key, value in src_items:
        try:
            s = SrcRecord.from_value(value)
        except RecordError:
            continue
        if s.source_id == sid and available(s.manifest_hash):
            return s.manifest_hash
    return None
