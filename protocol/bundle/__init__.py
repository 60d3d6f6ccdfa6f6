"""Bundles: model copies as one tar stream, for clusters the internet does not reach.

Theory of operation
-------------------
A bundle is a POSIX tar stream (ustar, with pax records for long or
non-ASCII names and for files of 8 GiB and more), so ``tar tf`` lists it
and ``tar xf`` unpacks it.  Its entries come in one fixed order::

    meshnode-bundle.json                          the header: every model, first
    models/<model>/@<manifest hash>/<path>        every file of the first model, in manifest order
    models/<model>/@<manifest hash>.sha256        its files' sha256, as sha256sum prints them
    ...                                           the next model's files, then its sums
    (two zero blocks)                             the end of the archive

The header (JSON) names each model, its manifest (the canonical msgpack
encoding, base64: every file's path and size and the xxh3-128 of every
chunk), the manifest's hash, and the registration it had (model type,
source URL, metadata).  Because the manifest comes first, a reader verifies
every chunk as it arrives, before it is written; a file's sha256 cannot be
known before its bytes are read, so the sums follow the files (in
``sha256sum`` format: ``cd models/<model>/@<hash> && sha256sum -c
../@<hash>.sha256`` checks an unpacked bundle with no meshnode at all).
The paths mirror the store's layout (``<model>/@<hash>/...``): ``@`` is
in no model name, so no model's files can land inside another's.

``BundleParser`` is the reader, a sans-IO state machine (h11's shape): the
I/O layer feeds it the bytes as they arrive, in pieces of any size, and
gets events back: the ``Header``, each ``Chunk`` of each model once its
bytes are all there (the caller verifies and writes it), each model's
``Sums``, and ``End``.  It checks every structural rule as it goes (the
entry names and sizes the header implies, each tar header's checksum, the
sums' exact size and form, nothing but zeros after the end) and bounds
everything it holds: one chunk, the header (``HEADER_MAX_BYTES``), one
sums entry (its exact size, known from the manifest).  A problem is a
``BadBundle`` (a ``RemoteProtocolError``: the bytes came from outside);
input that stops before the end is ``BundleTruncated`` from ``close()``.

The writer is a handful of pure functions that return the bytes of each
entry's tar header and padding; ``bundle_bytes`` says how long the whole
stream will be before a byte is read, so a sender can announce it.
Nothing here reads a file or a clock: the caller passes ``mtime_s``.

Modules: ``header`` (the header, entry names, sums), ``tar`` (ustar and pax
blocks), ``writer`` (each entry's bytes, the stream's length), ``parser``
(``BundleParser`` and its events).  Import from here.
"""

from __future__ import annotations

from .header import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    HEADER_MAX_BYTES,
    HEADER_NAME,
    MODELS_MAX,
    MODELS_PREFIX,
    REGISTRATION_KEYS,
    BadBundle,
    BundleHeader,
    BundleModel,
    BundleTruncated,
    file_entry_name,
    parse_sums,
    sums_bytes,
    sums_entry_name,
    sums_text,
)
from .parser import TRAILER_MAX_BYTES, BundleParser, Chunk, End, Event, Header, Sums
from .tar import BLOCK, END_OF_ARCHIVE, padding, tar_header
from .writer import bundle_bytes, export_sources, file_header, header_entry, sums_entry

__all__ = [
    "BLOCK",
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "END_OF_ARCHIVE",
    "HEADER_MAX_BYTES",
    "HEADER_NAME",
    "MODELS_MAX",
    "MODELS_PREFIX",
    "REGISTRATION_KEYS",
    "TRAILER_MAX_BYTES",
    "BadBundle",
    "BundleHeader",
    "BundleModel",
    "BundleParser",
    "BundleTruncated",
    "Chunk",
    "End",
    "Event",
    "Header",
    "Sums",
    "bundle_bytes",
    "export_sources",
    "file_entry_name",
    "file_header",
    "header_entry",
    "padding",
    "parse_sums",
    "sums_bytes",
    "sums_entry",
    "sums_entry_name",
    "sums_text",
    "tar_header",
]
