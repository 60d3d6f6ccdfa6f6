"""Where weights come from outside the mesh: one ``classify(url)`` for every caller.

A source URL is one of:

* ``hf://owner/name[@rev]``, or an ``https://`` URL on a Hugging Face hub
  host (``huggingface.co``, or the ``HF_ENDPOINT`` the node was given):
  the hub (``SourceKind.HUB``);
* any other ``http(s)://`` URL: one file (``SourceKind.HTTP``);
* ``s3://bucket/prefix``: an S3 or S3-compatible store (``SourceKind.S3``);
* ``file:///path`` or an absolute path: files on the target node itself
  (``SourceKind.LOCAL``; the node checks the path against its ingest roots).

The API, a pipeline's validation, the peer actions and the daemon's table of
fetchers (``meshnode.copies.sources.FETCHERS``) all ask ``classify``; adding
a kind (``gs://``) is a member of ``SourceKind`` and a line in ``SCHEMES``
here, a fetcher and its line in that table, and the docs
(``docs/architecture.md`` walks through it).  Pure: the caller passes the
hub hosts it knows.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

__all__ = ["HUB_HOSTS", "SCHEMES", "URL_MAX", "InvalidSource", "SourceKind", "SourceUrl", "classify", "is_outside"]

URL_MAX = 2048
HUB_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")  # the fetchers add the node's HF_ENDPOINT


class SourceKind(enum.Enum):
    HUB = "hub"
    HTTP = "http"
    S3 = "s3"
    LOCAL = "local"

    @property
    def outside(self) -> bool:
        """Fetched over the network (once per mesh), not read on the node."""
        return self is not SourceKind.LOCAL


SCHEMES: dict[str, SourceKind] = {"hf": SourceKind.HUB, "https": SourceKind.HTTP, "http": SourceKind.HTTP,
                                  "s3": SourceKind.S3, "file": SourceKind.LOCAL}


class InvalidSource(ValueError):
    """Not a source URL this mesh can fetch; the message says what would be."""


@dataclass(frozen=True, slots=True)
class SourceUrl:
    kind: SourceKind
    url: str  # as given
    path: str | None = None  # LOCAL: the absolute path on the target node


def classify(url: str, hub_hosts: tuple[str, ...] = HUB_HOSTS) -> SourceUrl:
    """The kind of source ``url`` names, or ``InvalidSource``."""
    if not isinstance(url, str) or not url or len(url) > URL_MAX or "\x00" in url:
        raise InvalidSource(f"a source is a URL of 1 to {URL_MAX} characters")
    if url.startswith("/"):
        return SourceUrl(SourceKind.LOCAL, url, url)
    try:
        parts = urlsplit(url)
    except ValueError:
        raise InvalidSource("not a URL") from None
    kind = SCHEMES.get(parts.scheme.lower())
    if kind is None:
        raise InvalidSource(f"cannot fetch {parts.scheme or 'this'} URLs: use "
                            + ", ".join(f"{s}://" for s in SCHEMES) + " or a node:device source")
    if kind is SourceKind.LOCAL:
        if parts.netloc not in ("", "localhost"):
            raise InvalidSource("file:// URLs name a path on the target node: file:///path")
        path = unquote(parts.path)
        if not path.startswith("/") or "\x00" in path:
            raise InvalidSource("ingest needs an absolute path")
        return SourceUrl(kind, url, path)
    if kind is SourceKind.HTTP and (parts.hostname or "").lower() in hub_hosts:
        kind = SourceKind.HUB
    return SourceUrl(kind, url)


def is_outside(url: object, hub_hosts: tuple[str, ...] = HUB_HOSTS) -> bool:
    """``url`` is a source outside the mesh (fetched once per mesh): a kind
    ``classify`` knows that is not files on the node."""
    try:
        return isinstance(url, str) and classify(url, hub_hosts).kind.outside
    except InvalidSource:
        return False
