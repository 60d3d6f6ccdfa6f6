"""S3 and S3-compatible object stores (AWS, DigitalOcean Spaces, MinIO) as a source.

``s3://bucket/prefix`` is every object under ``prefix/`` (or the one object
``prefix``), each file named by its key below the prefix.  The endpoint and
region come from the URL (``?endpoint_url=https://nyc3.digitaloceanspaces.com&region=nyc3``,
so a registration carries its own), else from the node (``--s3-endpoint-url``),
else from boto3's own configuration (``AWS_ENDPOINT_URL``, ``AWS_REGION``,
``~/.aws/config``).  Credentials come only from boto3's chain (the
``AWS_*`` environment, ``~/.aws/credentials``, a profile, an instance role):
never from the URL, never logged, never in a message.

Theory of operation
-------------------
1. List (``ListObjectsV2``, paged, at most ``OBJECTS_MAX`` objects): keys,
   sizes, ETags.  A key that is no safe relative path is refused.
2. For an object uploaded in parts (an ETag ``<md5>-<n>``), one ``HEAD`` with
   ``PartNumber=1`` gives the part size; its ranges follow the parts, so that
   each range's MD5 is a part's and the ETag can be checked without reading
   the file again.  Other objects are cut in ``RANGE_BYTES`` ranges.
3. Up to ``concurrency`` ranges at once, over every object, each a
   ``GetObject`` with ``Range`` and ``IfMatch`` (the object may not change
   under us) streamed in ``PIECE_BYTES`` pieces into its place in a
   preallocated ``<file>.part``.  A connection dropped mid-range resumes from
   the byte it reached (the MD5 so far is kept), with backoff, at most
   ``RetryPolicy.attempts`` tries in a row without progress.
4. Every file is checked: its size always; its ETag when it is an MD5 (single
   part: the whole file's; multipart: the MD5 of the parts' MD5s), unless
   the object is encrypted with KMS or a customer key (its ETag is no MD5).
   Then it takes its final name.
5. A fetch stopped midway (the node stopped or crashed) resumes where it
   was: ``.meshnode-s3-resume.json`` in the staging directory records, per
   object (its ETag, size and ranges), the MD5 of each range done and of the
   done prefix of each range in flight (written at most once a second, and
   when the fetch stops).  The next fetch into that directory re-reads and
   re-hashes what the record claims, keeps what matches, fetches the rest;
   an object whose ETag or ranges changed starts over.  The record goes
   before the result is returned.

The fetch runs once per mesh like any web source (``WebIngest``): the other
nodes pull the copy peer to peer.  boto3 blocks, so every call runs in a
worker thread; progress and retries run in trio.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import trio

from protocol.errors import InvalidName
from protocol.manifest import validate_rel_path

from ...persist import make_dirs
from .common import (
    DEFAULT_RETRY,
    PART_SUFFIX,
    Progress,
    RetryPolicy,
    SourceError,
    SourceResult,
    Transient,
    redact,
)
from .guard import guard_error, public_only_connections, resolve_public
from .http import ProgressTracker, os_error
from .s3ledger import LEDGER, PIECE_BYTES, _check_claims, _Ledger, _Object, _RangedPart

__all__ = ["S3Location", "fetch_s3", "parse_s3_url"]

log = logging.getLogger("meshnode.copies.sources")
# botocore's debug log carries request headers (the access key id, the signature): never ours.
for _name in ("botocore", "boto3", "s3transfer", "urllib3"):
    logging.getLogger(_name).setLevel(logging.WARNING)

OBJECTS_MAX = 100_000
RANGE_BYTES = 8 << 20  # a range of an object not uploaded in parts
RANGE_MAX = 64 << 20  # a part bigger than this is fetched in several ranges (its MD5 read again)
CONCURRENCY = 8
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]\Z")
_REGION = re.compile(r"[a-z0-9\-]{1,32}\Z")
_MD5 = re.compile(r"[0-9a-f]{32}\Z")
_MULTIPART = re.compile(r"([0-9a-f]{32})-(\d{1,5})\Z")
_AUTH_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
                         "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "InvalidSecurity"})
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_TRANSIENT_CODES = frozenset({"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
                              "ThrottlingException", "RequestTimeTooSkewed"})


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str
    endpoint_url: str | None = None
    region: str | None = None

    def show(self, key: str | None = None) -> str:
        return f"s3://{self.bucket}/{self.prefix if key is None else key}"


def parse_s3_url(url: str) -> S3Location:
    """``s3://bucket/prefix[?endpoint_url=...&region=...]``, checked, or ``SourceError(INVALID_REQUEST)``."""
    def bad(why: str) -> SourceError:
        return SourceError("INVALID_REQUEST", f"bad S3 URL: {why}")

    try:
        p = urlsplit(url)
    except ValueError:
        raise bad("not a URL") from None
    if p.scheme.lower() != "s3":
        raise bad("it must start with s3://")
    if "@" in p.netloc:
        raise bad("credentials do not go in the URL: the node takes them from its AWS environment or files")
    bucket = p.netloc
    if not _BUCKET.match(bucket):
        raise bad(f"{bucket[:70]!r} is no bucket name (3 to 63 lowercase letters, digits, '.', '-')")
    prefix = unquote(p.path).lstrip("/")
    if len(prefix) > 1024:
        raise bad("the key prefix is longer than 1024 characters")
    q = parse_qs(p.query, keep_blank_values=True)
    unknown = set(q) - {"endpoint_url", "region"}
    if unknown:
        raise bad(f"unknown parameters {', '.join(sorted(unknown))[:100]} (only endpoint_url and region; "
                  "credentials come from the node's AWS environment or files)")
    endpoint = q.get("endpoint_url", [None])[-1]
    if endpoint is not None:
        e = urlsplit(endpoint)
        if e.scheme not in ("http", "https") or not e.hostname or e.username or e.password or e.query:
            raise bad("endpoint_url must be http(s)://host[:port] with no user info or query")
    region = q.get("region", [None])[-1]
    if region is not None and not _REGION.match(region):
        raise bad("region: lowercase letters, digits and '-'")
    return S3Location(bucket, prefix, endpoint, region)


def _secrets() -> list[str]:
    return [os.environ.get(k, "") for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")]


def _classify(e: BaseException, what: str) -> SourceError | Transient:
    """A boto3 failure as a ``SourceError`` (final) or ``Transient`` (worth a retry)."""
    import botocore.exceptions as bx

    refused = guard_error(e)
    if refused is not None:  # a client's endpoint that resolved to a private address at connect
        return SourceError(refused.code, f"{what}: {refused.message}")
    if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return SourceError("UNAUTHORIZED", f"{what}: no AWS credentials on this node (set AWS_ACCESS_KEY_ID and "
                                           "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or ~/.aws/credentials)")
    if isinstance(e, bx.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        msg = redact(str(err.get("Message", ""))[:200], *_secrets())
        if code in _AUTH_CODES or status in (401, 403):
            return SourceError("UNAUTHORIZED", f"{what}: the store refused the node's credentials "
                                               f"({code or status}{': ' + msg if msg else ''})")
        if code in _MISSING_CODES or status == 404:
            return SourceError("NOT_FOUND", f"{what}: no such {'bucket' if code == 'NoSuchBucket' else 'key'} ({code or status})")
        if code == "PreconditionFailed" or status == 412:
            return SourceError("BAD_CONTENT", f"{what} changed while it was fetched; fetch it again")
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return Transient(f"{what}: {code or status}")
        return SourceError("INVALID_REQUEST", f"{what}: {code or status}{': ' + msg if msg else ''}")
    if isinstance(e, (bx.BotoCoreError, ConnectionError, TimeoutError)):
        return Transient(f"{what}: {type(e).__name__}: {redact(str(e)[:200], *_secrets())}")
    if isinstance(e, OSError):
        return os_error(e, what)
    raise e


async def _after_failure(e: Exception, what: str, failures: int, retries: RetryPolicy) -> int:
    """A final error raises; a transient one waits its backoff.  The failures in a row, now."""
    err = _classify(e, what)
    if isinstance(err, SourceError):
        raise err from None
    failures += 1
    if failures >= retries.attempts:
        raise SourceError("UNAVAILABLE", f"{err} (after {failures} tries in a row)") from None
    log.info("S3: %s; trying again", err)
    await trio.sleep(retries.delay(failures))
    return failures


def _guarded(fn: Callable[..., Any], guard: str | None) -> Callable[..., Any]:
    """``fn``, with every connection it opens to the host ``guard`` checked
    (``public_only_connections``); ``fn`` itself when ``guard`` is None."""
    if guard is None:
        return fn
    host = guard

    def run(*args: Any) -> Any:
        with public_only_connections(host):
            return fn(*args)

    return run


async def _call(fn: Callable[[], Any], what: str, retries: RetryPolicy, guard: str | None = None) -> Any:
    """``fn()`` in a worker thread, retried with backoff while it fails transiently;
    ``guard``: a host its connections to go only to public addresses of."""
    failures = 0
    while True:
        try:
            return await trio.to_thread.run_sync(_guarded(fn, guard))
        except Exception as e:  # classified: final errors raise, transient ones retry
            failures = await _after_failure(e, what, failures, retries)


def _client(loc: S3Location, endpoint_url: str | None, retries: RetryPolicy, concurrency: int) -> Any:
    import boto3
    from botocore.config import Config

    cfg = Config(connect_timeout=retries.connect_timeout_s, read_timeout=retries.read_timeout_s,
                 retries={"mode": "standard", "max_attempts": 2}, max_pool_connections=concurrency + 4,
                 s3={"addressing_style": "path"} if (loc.endpoint_url or endpoint_url) else None)
    return boto3.session.Session().client("s3", endpoint_url=loc.endpoint_url or endpoint_url,
                                          region_name=loc.region, config=cfg)


def _safe_rel(key: str, prefix: str) -> str:
    """The file a key becomes: the one object's own name, or its key below the "directory" ``prefix``."""
    rel = key.rsplit("/", 1)[-1] if key == prefix else key[len(prefix):]
    try:
        return validate_rel_path(rel)
    except InvalidName as e:
        raise SourceError("INVALID_REQUEST", f"the object key {key[:200]!r} is no safe file name: {e}") from None


def _list(client: Any, loc: S3Location) -> list[_Object]:
    """Every object the URL names: the one object ``prefix``, or every one under ``prefix/``."""
    import botocore.exceptions as bx

    out: list[_Object] = []
    prefix = loc.prefix
    if prefix and not prefix.endswith("/"):
        try:
            h = client.head_object(Bucket=loc.bucket, Key=prefix)
            return [_Object(prefix, _safe_rel(prefix, prefix), int(h["ContentLength"]), str(h.get("ETag", "")).strip('"'))]
        except bx.ClientError as e:
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if status != 404 and str(e.response.get("Error", {}).get("Code")) not in _MISSING_CODES:
                raise
        prefix += "/"  # not an object: a "directory"
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix)
    for page in pages:
        for o in page.get("Contents", []):
            key = o["Key"]
            if key.endswith("/"):
                continue  # a folder marker
            out.append(_Object(key, _safe_rel(key, prefix), int(o["Size"]), str(o.get("ETag", "")).strip('"')))
            if len(out) > OBJECTS_MAX:
                raise SourceError("INVALID_REQUEST", f"{loc.show()} holds more than {OBJECTS_MAX} objects")
    return out


def _plan_ranges(obj: _Object, range_bytes: int) -> None:
    step = obj.part_size if obj.part_size and obj.part_size <= RANGE_MAX else range_bytes
    obj.ranges = [(off, min(step, obj.size - off)) for off in range(0, obj.size, step)] or [(0, 0)]


def _etag_ok(obj: _Object, path: Path) -> bool | None:
    """True: the file's MD5 is the ETag's; False: it is not; None: the ETag is no MD5 we can check."""
    m = _MULTIPART.match(obj.etag)
    if m is not None:
        if obj.part_size is None or obj.part_size > RANGE_MAX or len(obj.ranges) != int(m.group(2)):
            return None
        joined = b"".join(obj.parts[i] for i in range(len(obj.ranges)))
        return hashlib.md5(joined, usedforsecurity=False).hexdigest() == m.group(1)
    if not _MD5.match(obj.etag):
        return None
    if len(obj.ranges) == 1:
        return obj.parts[0].hex() == obj.etag
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while data := f.read(8 << 20):
            h.update(data)
    return h.hexdigest() == obj.etag


async def fetch_s3(url: str, dest_dir: Path, *, progress: Progress | None = None,
                   retries: RetryPolicy | None = None, allow_private: bool = False,
                   endpoint_url: str | None = None, concurrency: int = CONCURRENCY,
                   range_bytes: int = RANGE_BYTES,
                   reserve: Callable[[int], Awaitable[None]] | None = None) -> SourceResult:
    """Every object ``url`` names, into ``dest_dir``, checked (see the module's doc).
    ``reserve(total bytes)``, once they are listed and before a byte is
    fetched, may make room for them or refuse (the evictor's ``make_room``)."""
    policy = retries or DEFAULT_RETRY
    loc = parse_s3_url(url)
    guard = await _endpoint_guard(loc, allow_private)
    client = await _call(lambda: _client(loc, endpoint_url, policy, concurrency), "S3 client", policy)
    objects: list[_Object] = await _call(lambda: _list(client, loc), f"listing {loc.show()}", policy, guard)
    if not objects:
        raise SourceError("NOT_FOUND", f"no object under {loc.show()}")
    rels = _file_names(loc, objects)
    total = sum(o.size for o in objects)
    if reserve is not None:
        await reserve(total)
    tracker = ProgressTracker(progress, total, len(objects))
    tracker.start()
    make_dirs(dest_dir)

    async def part_size(o: _Object, number: int = 1) -> int | None:
        """The size of part ``number`` of a multipart object; None where the store does not say."""
        try:
            h = await _call(functools.partial(client.head_object, Bucket=loc.bucket, Key=o.key, PartNumber=number),
                            f"{loc.show(o.key)} (part {number})", policy, guard)
        except SourceError as e:
            if e.code not in ("INVALID_REQUEST", "UNAVAILABLE"):
                raise
            log.info("S3: %s: no part sizes (%s); its ETag is not checked", loc.show(o.key), e.message)
            return None
        return int(h["ContentLength"])

    async def learn_part_size(o: _Object) -> None:
        o.part_size = await part_size(o)

    await _in_pool([o for o in objects if _MULTIPART.match(o.etag)], learn_part_size, concurrency)
    for o in objects:
        _plan_ranges(o, range_bytes)
    ledger = _Ledger(dest_dir / LEDGER)
    await trio.to_thread.run_sync(ledger.load)
    files, begun, resumed = await _resume(dest_dir, objects, ledger)
    if resumed:
        log.info("S3: resuming %s: %d of %d bytes already here", loc.show(), resumed, total)
        tracker.add_bytes(resumed)
    finished = False
    try:
        async def fetch_range(job: tuple[_Object, int]) -> None:
            o, index = job
            off, length = o.ranges[index]
            done, h = begun.pop((o.rel, index), (0, hashlib.md5(usedforsecurity=False)))
            failures = 0
            what = f"{loc.show(o.key)} bytes {off}-{off + length - 1}"
            fd = files[o.rel].open()  # here, not in a thread: two ranges of one file must not both open it
            while done < length:
                start = off + done
                try:
                    resp = await trio.to_thread.run_sync(_guarded(functools.partial(
                        client.get_object, Bucket=loc.bucket, Key=o.key,
                        Range=f"bytes={start}-{off + length - 1}", IfMatch=f'"{o.etag}"'), guard))
                    body = resp["Body"]
                    try:
                        _check_range(resp, start, off + length - 1, o.size, what)
                        while done < length:
                            n_read = await trio.to_thread.run_sync(
                                _guarded(_read_into, guard), body, fd, off + done, min(PIECE_BYTES, length - done), h)
                            done += n_read
                            tracker.add_bytes(n_read)
                            failures = 0
                            ledger.progress(o, index, done, h)
                            await ledger.flush()
                    finally:
                        body.close()
                except Exception as e:  # classified: final errors raise, a drop resumes from `done`
                    failures = await _after_failure(e, f"{what} (resuming at byte {off + done})", failures, policy)
            o.parts[index] = h.digest()
            ledger.range_done(o, index, o.parts[index])
            files[o.rel].range_done()

        await _in_pool([(o, i) for o in objects for i in range(len(o.ranges)) if i not in o.parts], fetch_range,
                       concurrency)
        verified: dict[str, bool] = {}
        for o in objects:
            part = files[o.rel].path
            if part.stat().st_size != o.size:
                raise SourceError("BAD_CONTENT", f"{loc.show(o.key)}: {part.stat().st_size} bytes, expected {o.size}")
            ok = await trio.to_thread.run_sync(_etag_ok, o, part)
            if ok is False and _MULTIPART.match(o.etag) and o.part_size is not None:
                # Ranges follow parts of part 1's size; parts of other sizes make another MD5.
                last = await part_size(o, len(o.ranges))
                if last != o.size - (len(o.ranges) - 1) * o.part_size:
                    ok = None  # uneven parts: the ETag cannot be checked from these ranges
            if ok is False:
                encrypted = await _call(functools.partial(client.head_object, Bucket=loc.bucket, Key=o.key),
                                        loc.show(o.key), policy, guard)
                if not (encrypted.get("ServerSideEncryption") == "aws:kms" or encrypted.get("SSECustomerAlgorithm")):
                    part.unlink(missing_ok=True)
                    raise SourceError("BAD_CONTENT", f"{loc.show(o.key)}: its bytes do not match its ETag")
                ok = None  # KMS or customer-key encryption: the ETag is no MD5
            verified[o.rel] = bool(ok)
            os.replace(part, dest_dir / o.rel)
            tracker.file_done()
        await trio.to_thread.run_sync(ledger.remove)  # not a file of the model
        finished = True
    except OSError as e:
        raise os_error(e, f"{loc.show()} into {dest_dir}") from None
    finally:
        for f in files.values():
            f.close()
        if not finished:  # stopped or failed: what is done so far, for the next try
            with trio.CancelScope(shield=True):
                await ledger.flush(now=True)
    model_type = await _model_type(dest_dir) if "config.json" in rels else None
    return SourceResult(sorted(rels), total, None, model_type, verified=verified)


async def _endpoint_guard(loc: S3Location, allow_private: bool) -> str | None:
    """The host every connection is checked against (None: not checked).  A
    client's endpoint (the node's own is the operator's) is checked now for a
    clear early answer, and at every connection, where it counts (a DNS answer
    may change in between)."""
    if loc.endpoint_url is None or allow_private:
        return None
    e = urlsplit(loc.endpoint_url)
    guard = e.hostname or ""
    await resolve_public(guard, e.port or (443 if e.scheme == "https" else 80))
    return guard


def _file_names(loc: S3Location, objects: list[_Object]) -> list[str]:
    """The objects' file names, refused where two map to one file or one
    would be both a file and a directory (or is meshnode's own ledger)."""
    rels = [o.rel for o in objects]
    if LEDGER in rels:
        raise SourceError("INVALID_REQUEST", f"{loc.show()}: an object named {LEDGER} (meshnode's own file name)")
    if len(set(rels)) != len(rels):
        raise SourceError("INVALID_REQUEST", f"two objects under {loc.show()} map to one file name")
    dirs = {rel.rsplit("/", i)[0] for rel in rels for i in range(1, rel.count("/") + 1)}
    both = sorted(dirs & set(rels))
    if both:
        raise SourceError("INVALID_REQUEST", f"{loc.show()}: {both[0][:200]!r} is both an object and a "
                                             "directory of others: it cannot be a file too")
    return rels


async def _resume(dest_dir: Path, objects: list[_Object], ledger: _Ledger
                  ) -> tuple[dict[str, _RangedPart], dict[tuple[str, int], tuple[int, Any]], int]:
    """What the ledger says is already here, checked against the bytes: each
    object's part file, the ranges begun (file, range -> bytes there, their
    MD5), and the bytes resumed in all."""
    files: dict[str, _RangedPart] = {}
    begun: dict[tuple[str, int], tuple[int, Any]] = {}
    resumed = 0
    for o in objects:
        part, final = dest_dir / (o.rel + PART_SUFFIX), dest_dir / o.rel
        done, partial = ledger.claims(o)
        path = part if part.exists() else final if final.exists() else part
        ok_part: dict[int, tuple[int, Any]] = {}
        if done or partial:
            ok_done, ok_part = await trio.to_thread.run_sync(_check_claims, path, o, done, partial)
            o.parts.update(ok_done)
            begun.update({(o.rel, i): v for i, v in ok_part.items()})
            resumed += sum(o.ranges[i][1] for i in ok_done) + sum(n for n, _ in ok_part.values())
        ledger.begin(o)
        files[o.rel] = _RangedPart(path, o.size, len(o.ranges) - len(o.parts), keep=bool(o.parts or ok_part))
    return files, begun, resumed


async def _model_type(dest_dir: Path) -> str | None:
    from .hf import _read_model_type

    return await trio.to_thread.run_sync(_read_model_type, dest_dir / "config.json")


async def _in_pool(jobs: list[Any], work: Callable[[Any], Awaitable[None]], workers: int) -> None:
    """``work(job)`` for every job, ``workers`` at a time (tasks that pull from one list)."""
    it = iter(jobs)

    async def worker() -> None:
        for job in it:
            await work(job)

    async with trio.open_nursery() as n:
        for _ in range(min(workers, len(jobs))):
            n.start_soon(worker)


def _check_range(resp: Any, first: int, last: int, size: int, what: str) -> None:
    """The answer is the range asked (a store that ignored ``Range`` would put
    the object's start at the range's place)."""
    cr = resp.get("ContentRange")
    if isinstance(cr, str) and cr.startswith(f"bytes {first}-{last}/"):
        return
    if cr is None and first == 0 and last == size - 1 and resp.get("ContentLength") == size:
        return  # the whole object, answered whole
    raise SourceError("BAD_CONTENT", f"{what}: the store answered another range ({str(cr)[:80]})")


def _read_into(body: Any, fd: int, offset: int, n: int, h: Any) -> int:
    """One piece of a range: read, write at its place, hash; the bytes it took (a drop raises)."""
    data = body.read(n)
    if not data:
        raise ConnectionError("the connection ended before the range did")
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    h.update(data)
    return len(data)
