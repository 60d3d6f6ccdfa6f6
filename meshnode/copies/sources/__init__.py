"""Where a model comes from before it is a copy: the web and the Hugging Face hub.

A source downloads files into a staging directory the caller gives (on the
same filesystem as the store, e.g. ``<tier>/.partial/ingest-<id>``), reports
progress through a callback and returns a :class:`SourceResult`; the caller
then turns the directory into a copy with ``Store.ingest_path``.

- :func:`meshnode.copies.sources.http.fetch_url`: one file over HTTP(S), resumed with
  ``Range``/``If-Range``.
- :func:`meshnode.copies.sources.hf.fetch_hf`: a Hugging Face repository at one
  resolved commit, every LFS file checked against its sha256 and every other
  file against its git blob id.
- :func:`meshnode.copies.sources.s3.fetch_s3`: objects of an S3 or S3-compatible
  store (``s3://bucket/prefix``), fetched in parallel ranges, every file
  checked against its size and ETag.
- :func:`fetch_source` picks one of them from a URL: ``protocol.sources.classify``
  names its kind, :data:`FETCHERS` (kind -> :class:`Fetcher`) the fetcher.
  A new kind (``gs://``) is a fetcher module here and one line in that
  table (and its kind in ``protocol.sources``); no caller changes.

While a file downloads it lives as ``<name>.part`` with a ``<name>.part.json``
sidecar (the ETag and length seen first); it gets its final name only once it
is complete (and verified), so a staging directory with no ``.part`` files
left holds exactly the result's files.  A call with the same staging directory
after a failure (or a crash) resumes: complete files are checked and kept,
partial ones continue from what is on disk.

Every failure is a :class:`SourceError` with a stable code.  Tokens never
appear in logs or in error messages.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from protocol.sources import HUB_HOSTS, SourceKind

from .common import (
    DEFAULT_RETRY,
    HF_HOSTS,
    SOURCE_ERROR_CODES,
    Progress,
    RetryPolicy,
    SourceError,
    SourceResult,
    hub_hosts,
    is_hf_source,
    safe_url,
    source_url,
)
from .guard import PublicOnlyTransport, resolve_public
from .hf import fetch_hf
from .http import fetch_url
from .s3 import fetch_s3, parse_s3_url

__all__ = [
    "DEFAULT_RETRY",
    "FETCHERS",
    "HF_HOSTS",
    "SOURCE_ERROR_CODES",
    "FetchOptions",
    "Fetcher",
    "Progress",
    "RetryPolicy",
    "SourceError",
    "SourceResult",
    "check_source",
    "fetch_source",
    "fetcher_for",
    "hub_hosts",
    "is_hf_source",
    "source_url",
]


@dataclass(frozen=True, slots=True)
class FetchOptions:
    """What a fetch may be told besides its URL and staging directory (each
    fetcher takes what applies to it)."""

    progress: Progress | None = None
    token: str | None = None  # the hub's
    revision: str | None = None  # the hub's
    allow_patterns: Sequence[str] | str | None = None  # the hub's
    ignore_patterns: Sequence[str] | str | None = None  # the hub's
    endpoint: str | None = None  # the hub's (None: HF_ENDPOINT)
    retries: RetryPolicy | None = None
    allow_private: bool = False  # hosts on private ranges may be fetched from
    s3_endpoint: str | None = None  # the node's --s3-endpoint-url
    reserve: Callable[[int], Awaitable[None]] | None = None  # (total bytes), once known, before a byte


@dataclass(frozen=True, slots=True)
class Fetcher:
    """How one kind of source is fetched."""

    label: str  # its name in metrics (``meshnode_source_fetched_bytes_total{source=...}``)
    fetch: Callable[[str, Path, FetchOptions], Awaitable[SourceResult]]
    #: an early, cheap refusal on the target node before the transfer is
    #: claimed (``url``, ``allow_private``); the fetch checks again
    check: Callable[[str, bool], Awaitable[None]]


async def _no_check(url: str, allow_private: bool) -> None:
    return None


async def _resolve_public(url: str) -> None:
    try:
        u = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise SourceError("INVALID_REQUEST", f"bad source_url: {e}") from None
    await resolve_public(u.host, u.port or (443 if u.scheme == "https" else 80))


async def _fetch_hub(url: str, dest_dir: Path, o: FetchOptions) -> SourceResult:
    return await fetch_hf(url, dest_dir, revision=o.revision, allow_patterns=o.allow_patterns,
                          ignore_patterns=o.ignore_patterns, token=o.token, endpoint=o.endpoint, progress=o.progress,
                          retries=o.retries, reserve=o.reserve)


async def _fetch_http(url: str, dest_dir: Path, o: FetchOptions) -> SourceResult:
    """From public addresses only unless ``allow_private`` (see ``guard``)."""
    if o.allow_private:
        return await fetch_url(url, dest_dir, progress=o.progress, retries=o.retries, reserve=o.reserve)
    policy = o.retries or DEFAULT_RETRY
    async with httpx.AsyncClient(transport=PublicOnlyTransport(), follow_redirects=True, timeout=policy.timeout()) as c:
        return await fetch_url(url, dest_dir, progress=o.progress, retries=o.retries, client=c, reserve=o.reserve)


async def _check_http(url: str, allow_private: bool) -> None:
    if not allow_private:  # a clear refusal now; the download checks every hop again
        await _resolve_public(url)


async def _fetch_s3(url: str, dest_dir: Path, o: FetchOptions) -> SourceResult:
    return await fetch_s3(url, dest_dir, progress=o.progress, retries=o.retries, allow_private=o.allow_private,
                          endpoint_url=o.s3_endpoint, reserve=o.reserve)


async def _check_s3(url: str, allow_private: bool) -> None:
    loc = parse_s3_url(url)  # a bad one is refused now, not after the claim
    if loc.endpoint_url is not None and not allow_private:
        await _resolve_public(loc.endpoint_url)


#: kind (``protocol.sources.classify``) -> its fetcher.  ``SourceKind.LOCAL``
#: is not fetched: the target node reads the files (``Store.ingest_path``).
FETCHERS: dict[SourceKind, Fetcher] = {
    SourceKind.HUB: Fetcher("hf", _fetch_hub, _no_check),
    SourceKind.HTTP: Fetcher("http", _fetch_http, _check_http),
    SourceKind.S3: Fetcher("s3", _fetch_s3, _check_s3),
}


def fetcher_for(url: str, hosts: tuple[str, ...] = HUB_HOSTS) -> Fetcher:
    """The fetcher of ``url``'s kind (``hosts``: the hub's), or ``SourceError("INVALID_REQUEST")``."""
    kind = source_url(url, hosts).kind
    f = FETCHERS.get(kind)
    if f is None:
        raise SourceError("INVALID_REQUEST", f"{safe_url(url)!r} names files on the node: they are ingested, not "
                                             "fetched (use " + ", ".join(k.value for k in FETCHERS) + " sources)")
    return f


async def check_source(url: str, allow_private: bool) -> None:
    """Refuse now what the fetch of ``url`` would refuse once claimed (a bad
    URL, a host on a private range unless ``allow_private``); a URL on this
    node's hub mirror is the hub's."""
    await fetcher_for(url, hub_hosts()).check(url, allow_private)


async def fetch_source(
    url: str,
    dest_dir: Path,
    *,
    progress: Progress | None = None,
    token: str | None = None,
    revision: str | None = None,
    allow_patterns: Sequence[str] | str | None = None,
    ignore_patterns: Sequence[str] | str | None = None,
    endpoint: str | None = None,
    retries: RetryPolicy | None = None,
    allow_private: bool = False,
    s3_endpoint: str | None = None,
    reserve: Callable[[int], Awaitable[None]] | None = None,
) -> SourceResult:
    """Download ``url`` into ``dest_dir`` with the fetcher of its kind
    (:data:`FETCHERS`): a Hugging Face repository (``hf://`` or a hub URL)
    with :func:`~meshnode.copies.sources.hf.fetch_hf`, any other
    ``http(s)://`` URL as one file with :func:`~meshnode.copies.sources.http.fetch_url`,
    from public addresses only unless ``allow_private`` (see ``guard``); an
    ``s3://`` URL with :func:`~meshnode.copies.sources.s3.fetch_s3`.  Each
    calls ``reserve(total bytes)`` once it knows them and before it fetches
    a byte (S3 and the hub from their listing, a URL from its response's
    length; a URL answered without a length, chunked, reserves nothing)."""
    options = FetchOptions(progress, token, revision, allow_patterns, ignore_patterns, endpoint, retries,
                           allow_private, s3_endpoint, reserve)
    return await fetcher_for(url).fetch(url, dest_dir, options)
