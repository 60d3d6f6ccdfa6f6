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
- :func:`fetch_source` picks one of them from a URL.

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
from pathlib import Path

import httpx

from .common import (
    DEFAULT_RETRY,
    HF_HOSTS,
    SOURCE_ERROR_CODES,
    Progress,
    RetryPolicy,
    SourceError,
    SourceResult,
    is_hf_source,
    safe_url,
)
from .guard import PublicOnlyTransport
from .hf import fetch_hf
from .http import fetch_url
from .s3 import fetch_s3, is_s3_source

__all__ = [
    "DEFAULT_RETRY",
    "HF_HOSTS",
    "SOURCE_ERROR_CODES",
    "Progress",
    "RetryPolicy",
    "SourceError",
    "SourceResult",
    "fetch_source",
    "is_hf_source",
    "is_s3_source",
]


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
    """Download ``url`` into ``dest_dir``: a Hugging Face repository (``hf://``
    or a hub URL) with :func:`~meshnode.copies.sources.hf.fetch_hf`, any other
    ``http(s)://`` URL as one file with :func:`~meshnode.copies.sources.http.fetch_url`,
    from public addresses only unless ``allow_private`` (see ``guard``); an
    ``s3://`` URL with :func:`~meshnode.copies.sources.s3.fetch_s3`.  Each
    calls ``reserve(total bytes)`` once it knows them and before it fetches
    a byte (S3 and the hub from their listing, a URL from its response's
    length; a URL answered without a length, chunked, reserves nothing)."""
    if is_s3_source(url):
        return await fetch_s3(url, dest_dir, progress=progress, retries=retries, allow_private=allow_private,
                              endpoint_url=s3_endpoint, reserve=reserve)
    if is_hf_source(url):
        return await fetch_hf(
            url,
            dest_dir,
            revision=revision,
            allow_patterns=allow_patterns,
            ignore_patterns=ignore_patterns,
            token=token,
            endpoint=endpoint,
            progress=progress,
            retries=retries,
            reserve=reserve,
        )
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("http", "https"):
        raise SourceError("INVALID_REQUEST", f"unsupported source URL {safe_url(url)!r}: use http(s)://, hf://, s3:// or a hub URL")
    if allow_private:
        return await fetch_url(url, dest_dir, progress=progress, retries=retries, reserve=reserve)
    policy = retries or DEFAULT_RETRY
    async with httpx.AsyncClient(transport=PublicOnlyTransport(), follow_redirects=True, timeout=policy.timeout()) as c:
        return await fetch_url(url, dest_dir, progress=progress, retries=retries, client=c, reserve=reserve)
