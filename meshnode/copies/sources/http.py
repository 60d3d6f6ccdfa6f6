"""One file over HTTP(S), resumable; also the download engine ``hf.py`` uses.

A file downloads to ``<name>.part``; the first response's ETag, Last-Modified
and length go to ``<name>.part.json``.  A retry (or a later call with the same
staging directory) sends ``Range: bytes=N-`` for the N bytes on disk, with
``If-Range`` set to the stored validator: a 206 is appended, a 200 (the
server has no Range support, or the file changed) restarts the file cleanly
from 0.  The final size is checked against Content-Length / Content-Range
(and the source's own size and digest when it has them) before the file gets
its final name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import trio

from protocol.errors import InvalidName
from protocol.manifest import validate_rel_path
from protocol.units import human_bytes

from ...persist import FILE_MODE, atomic_write, make_dirs
from .common import (
    DEFAULT_RETRY,
    PART_SUFFIX,
    Progress,
    RetryPolicy,
    SourceError,
    SourceResult,
    Transient,
    parse_retry_after,
    redact,
    safe_url,
)

__all__ = ["Digest", "FileOutcome", "ProgressTracker", "download_file", "fetch_url"]

log = logging.getLogger("meshnode.copies.sources")

SIDECAR_SUFFIX = ".part.json"
_FLUSH_BYTES = 1 << 20  # write (and hash) in a worker thread once this much arrived
_HASH_READ = 8 << 20

#: ("sha256", hex) for an LFS file, ("git-sha1", hex) for a git blob id (needs the size)
Digest = tuple[str, str]
#: maps an error response to a SourceError (or None: use the default mapping)
Classify = Callable[[httpx.Response, bool], SourceError | None]
Reserve = Callable[[int], Awaitable[None]]  # (bytes) -> room made for them, or raises (NO_SPACE)


class _Mismatch(Exception):
    pass


@dataclass
class FileOutcome:
    rel: str
    size: int
    verified: bool
    etag: str | None = None
    last_modified: str | None = None
    content_type: str | None = None
    resumed_bytes: int = 0  # bytes found on disk and kept, over all attempts
    restarts: int = 0  # times the file started again from 0 (200 to a Range, mismatch)


class ProgressTracker:
    """Adds up bytes and files over concurrent downloads; calls ``progress`` on change."""

    def __init__(self, progress: Progress | None, bytes_total: int | None, files_total: int | None) -> None:
        self._cb = progress
        self.bytes_done = 0
        self.bytes_total = bytes_total
        self.files_done = 0
        self.files_total = files_total

    def add_bytes(self, delta: int) -> None:
        if delta:
            self.bytes_done += delta
            self._emit()

    def file_done(self) -> None:
        self.files_done += 1
        self._emit()

    def start(self) -> None:
        self._emit()

    def set_total(self, total: int | None) -> None:
        self.bytes_total = total
        self._emit()

    def _emit(self) -> None:
        if self._cb is None:
            return
        try:
            self._cb(self.bytes_done, self.bytes_total, self.files_done, self.files_total)
        except Exception:  # a progress display must not break a download
            log.exception("progress callback failed")


def _new_hasher(digest: Digest | None, size: int | None) -> Any:
    if digest is None:
        return None
    kind = digest[0]
    if kind == "sha256":
        return hashlib.sha256()
    if kind == "git-sha1" and size is not None:
        h = hashlib.sha1()
        h.update(b"blob %d\0" % size)
        return h
    return None


class _StreamPart:
    """``<final>.part`` and its sidecar, appended in order by one response body.
    Not ``s3._RangedPart`` (written at offsets by ranges in parallel) nor
    ``store.Partial`` (chunks of a known manifest): see ``common``.  Every
    method blocks: call through trio.to_thread."""

    def __init__(self, final: Path, url: str, size: int | None, digest: Digest | None) -> None:
        self.final = final
        self.part = final.with_name(final.name + PART_SUFFIX)
        self.side = final.with_name(final.name + SIDECAR_SUFFIX)
        self.url = url
        self.size = size
        self.digest = digest
        self.meta: dict[str, Any] = {}
        self.have = 0
        self.hasher: Any = None
        self.fd: int | None = None

    def prepare(self) -> int:
        """Open the partial file for appending; hash what is kept. Returns the bytes kept."""
        make_dirs(self.final.parent)
        meta: dict[str, Any] = {}
        try:
            loaded = json.loads(self.side.read_text())
            if isinstance(loaded, dict):
                meta = loaded
        except (OSError, ValueError):
            pass
        have = 0
        if meta.get("url") == self.url and not meta.get("encoded"):
            try:
                have = self.part.stat().st_size
            except FileNotFoundError:
                have = 0
            limit = self.size if self.size is not None else meta.get("total")
            if isinstance(limit, int) and have > limit:
                have = 0
        if have == 0:
            meta = {}
            self.side.unlink(missing_ok=True)
        self.meta = meta
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(self.part, flags | (os.O_TRUNC if have == 0 else 0), FILE_MODE)
        if have and have == self.have and self.hasher is not None:
            return have  # a retry: the hasher already holds these bytes
        self.have = have
        self.hasher = _new_hasher(self.digest, self.size)
        if have and self.hasher is not None:
            with open(self.part, "rb") as f:
                left = have
                while left > 0:
                    data = f.read(min(_HASH_READ, left))
                    if not data:
                        break
                    self.hasher.update(data)
                    left -= len(data)
        return have

    def reset(self) -> None:
        """Start the file again from 0."""
        assert self.fd is not None
        os.ftruncate(self.fd, 0)
        self.have = 0
        self.meta = {}
        self.side.unlink(missing_ok=True)
        self.hasher = _new_hasher(self.digest, self.size)

    def set_meta(self, etag: str | None, last_modified: str | None, total: int | None, encoded: bool) -> None:
        self.meta = {"url": self.url, "etag": etag, "last_modified": last_modified, "total": total, "encoded": encoded}
        atomic_write(self.side, json.dumps(self.meta).encode(), durable=False)

    def write(self, data: bytes | bytearray) -> None:
        assert self.fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        if self.hasher is not None:
            self.hasher.update(data)
        self.have += len(data)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def finish(self, expect_total: int | None) -> bool:
        """Check size and digest, then give the file its final name. Returns verified."""
        self.close()
        size = self.part.stat().st_size
        want = self.size if self.size is not None else expect_total
        if want is not None and size != want:
            raise _Mismatch(f"{size} bytes instead of {want}")
        verified = False
        if self.hasher is not None and self.digest is not None:
            got = self.hasher.hexdigest()
            if got != self.digest[1].lower():
                raise _Mismatch(f"{self.digest[0]} is {got}, expected {self.digest[1]}")
            verified = True
        os.replace(self.part, self.final)
        self.side.unlink(missing_ok=True)
        return verified

    def discard(self) -> None:
        self.close()
        self.part.unlink(missing_ok=True)
        self.side.unlink(missing_ok=True)


def _check_existing(final: Path, size: int | None, digest: Digest | None) -> tuple[int, bool] | None:
    """A final file from an earlier call: None if it must be fetched again, else (size, verified)."""
    try:
        st = final.stat()
    except FileNotFoundError:
        return None
    if size is not None and st.st_size != size:
        final.unlink()
        return None
    h = _new_hasher(digest, size if size is not None else st.st_size)
    if h is None or digest is None:
        return st.st_size, False
    with open(final, "rb") as f:
        while data := f.read(_HASH_READ):
            h.update(data)
    if h.hexdigest() != digest[1].lower():
        final.unlink()
        return None
    return st.st_size, True


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.I)
_CONTENT_RANGE_UNSAT = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.I)


def _content_length(r: httpx.Response) -> int | None:
    v = r.headers.get("content-length")
    if v is None or not v.strip().isdigit():
        return None
    return int(v)


def default_classify(r: httpx.Response, with_token: bool) -> SourceError:
    """The error for a final (non-retryable) response; ``with_token``: a token was sent."""
    url = safe_url(str(r.request.url))
    s = r.status_code
    if s == 401:
        why = "the token was rejected (invalid or expired)" if with_token else "it needs a token and none was given"
        return SourceError("UNAUTHORIZED", f"{url} answered 401: {why}")
    if s == 403:
        why = "the token has no access" if with_token else "access denied"
        return SourceError("UNAUTHORIZED", f"{url} answered 403: {why}")
    if s in (404, 410):
        return SourceError("NOT_FOUND", f"{url} answered {s}: not found")
    return SourceError("INVALID_REQUEST", f"{url} answered {s} {r.reason_phrase}")


def is_transient_status(s: int) -> bool:
    return s in (408, 425, 429) or 500 <= s <= 599


def os_error(e: OSError, what: str) -> SourceError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return SourceError("NO_SPACE", f"no space left to write {what}")
    return SourceError("UNAVAILABLE", f"cannot write {what}: {e.strerror or e}")


async def download_file(
    client: httpx.AsyncClient,
    url: str,
    dest_dir: Path,
    rel: str,
    *,
    size: int | None = None,
    digest: Digest | None = None,
    headers: Mapping[str, str] | None = None,
    policy: RetryPolicy = DEFAULT_RETRY,
    tracker: ProgressTracker | None = None,
    secret: str | None = None,
    classify: Classify | None = None,
    reserve: Reserve | None = None,
) -> FileOutcome:
    """Download ``url`` to ``dest_dir/rel``: resumed, retried, checked.

    ``size`` and ``digest`` (when the source publishes them) are checked
    before the file gets its final name; a mismatch deletes it and fetches it
    once more, then raises ``BAD_CONTENT``.  ``secret`` is scrubbed from every
    message.  ``reserve(total bytes)``, once, as soon as the server says the
    file's length and before its body is read, may make room or refuse (the
    evictor's ``make_room``).  Raises :class:`SourceError`.
    """
    final = dest_dir / rel
    tracker = tracker or ProgressTracker(None, size, 1)
    try:
        kept = await trio.to_thread.run_sync(_check_existing, final, size, digest)
    except OSError as e:
        raise os_error(e, rel) from None
    if kept is not None:
        n, ok = kept
        tracker.add_bytes(n)
        tracker.file_done()
        log.info("%s is already here (%d bytes%s)", rel, n, ", verified" if ok else "")
        return FileOutcome(rel, n, ok, resumed_bytes=n)

    pf = _StreamPart(final, url, size, digest)
    out = FileOutcome(rel, 0, False)
    reported = 0
    failures = 0
    mismatches = 0
    hdrs = dict(headers or {})
    with_token = any(k.lower() == "authorization" for k in hdrs)

    def sync_progress() -> None:
        nonlocal reported
        tracker.add_bytes(pf.have - reported)
        reported = pf.have

    asked = False

    async def reserve_once(total: int) -> None:
        nonlocal asked
        if reserve is not None and not asked:
            asked = True
            await reserve(total)

    while True:
        before = None
        expect_total: list[int | None] = [None]
        try:
            try:
                before = await trio.to_thread.run_sync(pf.prepare)
                out.resumed_bytes += before
                sync_progress()
                await _attempt(client, pf, hdrs, policy, tracker, sync_progress, out, expect_total, classify, with_token, rel,
                               reserve_once)
                verified = await trio.to_thread.run_sync(pf.finish, expect_total[0])
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(pf.close)
        except _Mismatch as e:
            mismatches += 1
            await trio.to_thread.run_sync(pf.discard)
            pf.have = 0
            sync_progress()
            out.restarts += 1
            if mismatches >= 2:
                raise SourceError("BAD_CONTENT", f"{rel} from {safe_url(url)}: {e} (fetched twice)") from None
            log.warning("%s from %s: %s; fetching it again", rel, safe_url(url), e)
            continue
        except Transient as e:
            if before is not None and pf.have > before:
                failures = 0  # it moved forward: only stalls in a row count
            failures += 1
            msg = redact(e.message, secret)
            if failures >= policy.attempts:
                raise SourceError(
                    "UNAVAILABLE", f"{rel} from {safe_url(url)}: {msg} (gave up after {failures} attempts in a row)"
                ) from None
            delay = policy.delay(failures, e.retry_after)
            log.warning("%s from %s: %s; retrying in %.1f s (%d/%d)", rel, safe_url(url), msg, delay, failures, policy.attempts)
            await trio.sleep(delay)
            continue
        except OSError as e:
            await _drop_if_empty(pf)
            raise os_error(e, rel) from None
        except SourceError:
            await _drop_if_empty(pf)
            raise
        out.size = pf.have
        out.verified = verified
        tracker.file_done()
        return out


async def _drop_if_empty(pf: _StreamPart) -> None:
    """After a final error: an empty .part is of no use to a later call."""
    if pf.have == 0:
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(pf.discard)
            except OSError:
                pass


async def _attempt(
    client: httpx.AsyncClient,
    pf: _StreamPart,
    headers: dict[str, str],
    policy: RetryPolicy,
    tracker: ProgressTracker,
    sync_progress: Callable[[], None],
    out: FileOutcome,
    expect_total: list[int | None],
    classify: Classify | None,
    with_token: bool,
    rel: str,
    reserve: Reserve,
) -> None:
    h = {**headers, "Accept-Encoding": "identity"}
    have = pf.have
    if have > 0:
        h["Range"] = f"bytes={have}-"
        validator = pf.meta.get("etag") or pf.meta.get("last_modified")
        if isinstance(validator, str) and validator:
            h["If-Range"] = validator
    try:
        async with client.stream("GET", pf.url, headers=h, timeout=policy.timeout()) as r:
            s = r.status_code
            if s >= 400:
                if is_transient_status(s):
                    raise Transient(f"the server answered {s}", parse_retry_after(r.headers.get("retry-after")))
                if s == 416 and have > 0:
                    m = _CONTENT_RANGE_UNSAT.match(r.headers.get("content-range", ""))
                    if m and int(m.group(1)) == have:
                        expect_total[0] = have  # what is on disk is the whole file
                        return
                    await trio.to_thread.run_sync(pf.reset)
                    sync_progress()
                    out.restarts += 1
                    raise Transient("the server refused the range; restarting the file")
                err = classify(r, with_token) if classify is not None else None
                raise err or default_classify(r, with_token)
            if s not in (200, 206):
                raise SourceError("INVALID_REQUEST", f"{safe_url(str(r.url))} answered {s} {r.reason_phrase}")
            encoding = r.headers.get("content-encoding", "identity").strip().lower()
            encoded = encoding not in ("", "identity")
            if s == 206:
                m = _CONTENT_RANGE.match(r.headers.get("content-range", ""))
                total = int(m.group(3)) if m and m.group(3) != "*" else None
                known = pf.size if pf.size is not None else pf.meta.get("total")
                if m is None or int(m.group(1)) != have or encoded or (known is not None and total is not None and total != known):
                    await trio.to_thread.run_sync(pf.reset)
                    sync_progress()
                    out.restarts += 1
                    raise Transient("the server answered with another range than asked; restarting the file")
                if total is None:
                    total = pf.meta.get("total")
            else:
                if have > 0:
                    log.info("%s: the server sent the whole file (no range support, or it changed); restarting from 0", rel)
                    await trio.to_thread.run_sync(pf.reset)
                    sync_progress()
                    out.restarts += 1
                total = None if encoded else _content_length(r)
                await trio.to_thread.run_sync(
                    pf.set_meta, r.headers.get("etag"), r.headers.get("last-modified"), total, encoded
                )
            out.etag = r.headers.get("etag") or out.etag
            out.last_modified = r.headers.get("last-modified") or out.last_modified
            out.content_type = r.headers.get("content-type") or out.content_type
            expect_total[0] = total
            if pf.size is not None and total is not None and total != pf.size:
                raise _Mismatch(f"the server says {total} bytes, the source's metadata {pf.size}")
            if pf.size is None and total is not None and tracker.files_total == 1:
                tracker.set_total(total)
            if total is not None:
                await reserve(total)
                need = total - pf.have
                free = (await trio.to_thread.run_sync(shutil.disk_usage, pf.part.parent)).free
                if need > free:
                    raise SourceError("NO_SPACE", f"{rel} needs {human_bytes(need)} more, {human_bytes(free)} free where it is staged")
            await _stream_body(r, pf, encoded, sync_progress)
            if total is not None and pf.have < total:
                raise Transient(f"the body ended after {pf.have} of {total} bytes")
    except httpx.UnsupportedProtocol:
        raise SourceError("INVALID_REQUEST", f"unsupported URL {safe_url(pf.url)}") from None
    except httpx.TooManyRedirects:
        raise SourceError("INVALID_REQUEST", f"too many redirects from {safe_url(pf.url)}") from None
    except httpx.TimeoutException as e:
        raise Transient(f"timed out ({type(e).__name__})") from None
    except httpx.TransportError as e:
        raise Transient(f"{type(e).__name__}: {e}") from None


async def _stream_body(r: httpx.Response, pf: _StreamPart, encoded: bool, sync_progress: Callable[[], None]) -> None:
    buf = bytearray()
    try:
        it = r.aiter_bytes() if encoded else r.aiter_raw()
        async for chunk in it:
            buf += chunk
            if len(buf) >= _FLUSH_BYTES:
                data, buf = buf, bytearray()  # handed over, not copied
                await trio.to_thread.run_sync(pf.write, data)
                sync_progress()
    finally:
        if buf:  # keep what arrived before an error: a retry resumes after it
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(pf.write, buf)
                sync_progress()


def _filename_from_url(url: str) -> str:
    path = urlsplit(url).path
    name = unquote(path.rsplit("/", 1)[-1]) if path else ""
    if not name:
        raise SourceError("INVALID_REQUEST", f"{safe_url(url)} names no file: give a filename")
    return name


async def fetch_url(
    url: str,
    dest_dir: Path,
    *,
    progress: Progress | None = None,
    client: httpx.AsyncClient | None = None,
    retries: RetryPolicy | None = None,
    filename: str | None = None,
    headers: Mapping[str, str] | None = None,
    reserve: Reserve | None = None,
) -> SourceResult:
    """Download one file from ``url`` into ``dest_dir`` (as ``filename``, else
    the URL's last path segment), resuming with Range after a failure;
    ``reserve(bytes)`` once its length is known, before its body (see
    ``download_file``).

    ``client``: an ``httpx.AsyncClient`` to use (it should follow redirects);
    by default one is made (and closed) for this call.  Raises SourceError.
    """
    policy = retries or DEFAULT_RETRY
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        raise SourceError("INVALID_REQUEST", "the URL is not valid") from None
    if scheme not in ("http", "https"):
        raise SourceError("INVALID_REQUEST", f"{safe_url(url)}: only http:// and https:// URLs are fetched here")
    name = filename if filename is not None else _filename_from_url(url)
    try:
        validate_rel_path(name)
    except InvalidName as e:
        raise SourceError("INVALID_REQUEST", f"bad file name {name!r}: {e}") from None
    try:
        await trio.to_thread.run_sync(make_dirs, dest_dir)
    except OSError as e:
        raise os_error(e, str(dest_dir)) from None
    tracker = ProgressTracker(progress, None, 1)
    own = client is None
    c = client if client is not None else httpx.AsyncClient(follow_redirects=True, timeout=policy.timeout())
    try:
        log.info("fetching %s into %s", safe_url(url), dest_dir)
        out = await download_file(c, url, dest_dir, name, headers=headers, policy=policy, tracker=tracker,
                                  reserve=reserve)
    finally:
        if own:
            with trio.CancelScope(shield=True):
                await c.aclose()
    meta: dict[str, Any] = {"source_url": safe_url(url), "resumed_bytes": out.resumed_bytes, "restarts": out.restarts}
    if out.etag:
        meta["etag"] = out.etag
    if out.last_modified:
        meta["last_modified"] = out.last_modified
    if out.content_type:
        meta["content_type"] = out.content_type
    return SourceResult(
        files=[name],
        total_bytes=out.size,
        revision=None,
        model_type=None,
        metadata=meta,
        verified={name: out.verified},
    )
