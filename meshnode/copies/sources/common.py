"""What the sources share: the error, the result, the retry policy, URL helpers.

Partial files: every fetcher writes a file as ``<name>`` + :data:`PART_SUFFIX`
until it is complete, so that a staging directory with no ``.part`` left
holds exactly the result's files.  The three writers of partial files differ
for a reason and so stay three: ``http._StreamPart`` appends one response
body in order (resumed with ``Range``, validated by a sidecar with the
ETag, hashed as it goes); ``s3._RangedPart`` is preallocated and written at
offsets by several ranges at once (resumed from the S3 ledger, checked
against the ETag at the end); ``store.Partial`` assembles a copy of a known
manifest chunk by chunk, each chunk verified before it is written.
:class:`Transient` (a failure worth a retry) is one class for every source.

Which fetcher a URL goes to is ``protocol.sources.classify``; this module
only adds the node's own hub mirror (``HF_ENDPOINT``) to the hub's hosts
(:func:`hub_hosts`).
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from protocol.sources import HUB_HOSTS, InvalidSource, SourceKind, SourceUrl, classify

from ...errors import MeshError

__all__ = [
    "DEFAULT_RETRY",
    "HF_HOSTS",
    "PART_SUFFIX",
    "SOURCE_ERROR_CODES",
    "Progress",
    "RetryPolicy",
    "SourceError",
    "SourceResult",
    "Transient",
    "hub_hosts",
    "is_hf_source",
    "parse_retry_after",
    "redact",
    "safe_url",
    "source_url",
]

log = logging.getLogger("meshnode.copies.sources")

SOURCE_ERROR_CODES = frozenset(
    {"UNAUTHORIZED", "NOT_FOUND", "NO_SPACE", "BAD_CONTENT", "UNAVAILABLE", "INVALID_REQUEST",
     "PATH_NOT_ALLOWED", "PRIVATE_SOURCE"}
)

#: ``progress(bytes_done, bytes_total, files_done, files_total)``; called from the trio thread.
Progress = Callable[[int, int | None, int, int | None], None]


class SourceError(MeshError):
    """A download from a source failed.

    ``code`` is one of :data:`SOURCE_ERROR_CODES`: ``UNAUTHORIZED`` (401/403:
    a bad or missing token, or a gated repository), ``NOT_FOUND`` (no such
    repository, revision, file or URL), ``NO_SPACE`` (the staging filesystem
    is full), ``BAD_CONTENT`` (checksum or length mismatch after a retry),
    ``UNAVAILABLE`` (transient errors after the retry budget, or a local I/O
    error), ``INVALID_REQUEST`` (a bad URL, repository id, pattern or path),
    ``PATH_NOT_ALLOWED`` (a local path outside the ingest roots) and
    ``PRIVATE_SOURCE`` (a host on a private range; see ``guard``).
    The message never holds a token.
    """


class Transient(Exception):
    """A failure worth retrying (after ``retry_after`` seconds when the server said)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


PART_SUFFIX = ".part"  # a file being fetched, before it is complete (and checked)


@dataclass
class SourceResult:
    """What a source put in the staging directory."""

    files: list[str]  # relative POSIX paths, sorted
    total_bytes: int
    revision: str | None  # the resolved commit (Hugging Face), else None
    model_type: str | None  # config.json "model_type", else the hub's pipeline tag or library
    metadata: dict[str, Any] = field(default_factory=dict)
    #: per file: True when its bytes were checked against a digest the source
    #: published (sha256 for LFS files, the git blob id for the others)
    verified: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: exponential backoff with jitter, bounded, for transient errors.

    ``attempts`` counts tries in a row that made no progress; an attempt that
    received bytes before failing resets the count (a resumed download moves
    forward).  401, 403 and 404 are never retried.  A 429 or 503 with
    ``Retry-After`` waits that long, at most ``retry_after_max_s``.
    """

    attempts: int = 5
    base_s: float = 0.5
    max_s: float = 10.0
    retry_after_max_s: float = 60.0
    connect_timeout_s: float = 15.0
    read_timeout_s: float = 60.0  # also the longest a stalled body may stay silent
    api_timeout_s: float = 30.0  # one metadata request (Hugging Face API)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.base_s < 0 or self.max_s < 0 or self.retry_after_max_s < 0:
            raise ValueError("delays must not be negative")

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (1-based)."""
        exp = min(self.max_s, self.base_s * (2.0 ** max(0, failures - 1)))
        d = exp * random.uniform(0.5, 1.0)
        if retry_after is not None:
            d = max(d, min(retry_after, self.retry_after_max_s))
        return d

    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(
            connect=self.connect_timeout_s,
            read=self.read_timeout_s,
            write=self.read_timeout_s,
            pool=self.connect_timeout_s,
        )


DEFAULT_RETRY = RetryPolicy()


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with every secret replaced (belt and braces: messages are built without them)."""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def safe_url(url: str) -> str:
    """A URL fit for logs and messages: no user info, no query (signed URLs carry secrets)."""
    try:
        p = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    host = p.hostname or ""
    if p.port is not None:
        host = f"{host}:{p.port}"
    return f"{p.scheme}://{host}{p.path}" if p.scheme else p.path


HF_HOSTS = HUB_HOSTS  # the hub's own hosts: one list, in protocol.sources


def hub_hosts() -> tuple[str, ...]:
    """The hub's hosts and the host of this node's ``HF_ENDPOINT`` (a mirror or
    a private hub): a repository URL on any of them is fetched from the hub."""
    endpoint = os.environ.get("HF_ENDPOINT")
    if not endpoint:
        return HUB_HOSTS
    try:
        host = (urlsplit(endpoint).hostname or "").lower()
    except ValueError:
        return HUB_HOSTS
    return HUB_HOSTS if not host or host in HUB_HOSTS else (*HUB_HOSTS, host)


def source_url(url: str, hosts: tuple[str, ...] = HUB_HOSTS) -> SourceUrl:
    """``protocol.sources.classify`` of ``url`` (``hosts``: the hub's), or
    ``SourceError("INVALID_REQUEST")`` saying what can be fetched."""
    try:
        return classify(url, hosts)
    except InvalidSource as e:
        raise SourceError("INVALID_REQUEST", f"{safe_url(url) if isinstance(url, str) else 'source'}: {e}") from None


def is_hf_source(url: str) -> bool:
    """True for ``hf://owner/name[@rev]`` and ``https://huggingface.co/owner/name[/tree/rev]``."""
    try:
        return source_url(url).kind is SourceKind.HUB
    except SourceError:
        return False
