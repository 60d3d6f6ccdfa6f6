"""A Hugging Face repository at one resolved commit.

The metadata comes from the real ``huggingface_hub`` client (``model_info``
with ``files_metadata``): the commit the revision points at, and every file
with its size, its git blob id and, for LFS files, its sha256.  The files
themselves are fetched here over httpx from ``/{repo}/resolve/{commit}/{file}``
(pinned to the commit, so a branch moving during the download changes
nothing), with the Range resume logic of ``http.py`` rather than the hub
client's own (which has changed across releases).  Every LFS file is checked
against its sha256 and every other file against its git blob id, hashing while
streaming (on resume, the prefix on disk first).

Token: the argument, else ``HF_TOKEN``, else the file named by
``HF_TOKEN_PATH``, else the token ``hf auth login`` saved (``get_token``).  It is sent as ``Authorization: Bearer`` to the hub only
(httpx drops it on a redirect to another host, e.g. the CDN) and never
appears in a log line or an error message.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import trio
from huggingface_hub import HfApi, constants, get_token, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import (  # type: ignore[attr-defined]  # exported lazily
    filter_repo_objects,
    validate_repo_id,
)

from protocol.errors import InvalidName
from protocol.manifest import validate_rel_path
from protocol.units import human_bytes

from ...errors import first_of, only
from ...persist import make_dirs
from .common import (
    DEFAULT_RETRY,
    HF_HOSTS,
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
from .http import (
    Digest,
    ProgressTracker,
    default_classify,
    download_file,
    is_transient_status,
    os_error,
)

__all__ = ["fetch_hf", "parse_hf_ref", "resolve_token"]

log = logging.getLogger("meshnode.copies.sources")

_REV_MARKERS = ("tree", "resolve", "blob", "commit")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
DEFAULT_CONCURRENCY = 4


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of whichever HTTP library the hub client uses."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for mod, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                       ("requests", ("ConnectionError", "Timeout"))):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        for n in names:
            t = getattr(m, n, None)
            if isinstance(t, type) and issubclass(t, BaseException):
                found.append(t)
    return tuple(found)


_TRANSPORT_ERRORS = _transport_errors()


def parse_hf_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``owner/name``, ``hf://owner/name[@REV]`` or ``https://huggingface.co/owner/name[/tree/REV]``
    -> (repo id, revision or None, endpoint or None).

    The endpoint is the URL's origin when it is not huggingface.co (a mirror
    or a private hub); None means "the configured endpoint".
    """
    ref = ref.strip()
    if not ref:
        raise SourceError("INVALID_REQUEST", "no repository given")
    rev: str | None = None
    origin: str | None = None
    if ref.startswith("hf://"):
        path = ref[len("hf://"):]
        if "@" in path:
            path, rev = path.split("@", 1)
            rev = unquote(rev) or None
    elif "://" in ref:
        try:
            p = urlsplit(ref)
        except ValueError:
            raise SourceError("INVALID_REQUEST", "the repository URL is not valid") from None
        if p.scheme.lower() not in ("http", "https") or not p.hostname:
            raise SourceError("INVALID_REQUEST", f"{safe_url(ref)} is not a hub URL")
        if p.hostname.lower() not in HF_HOSTS:
            port = f":{p.port}" if p.port is not None else ""
            origin = f"{p.scheme.lower()}://{p.hostname}{port}"
        path = p.path
    else:
        path = ref
    segs = [s for s in path.strip("/").split("/") if s]
    if segs and segs[0] in ("datasets", "spaces"):
        raise SourceError("INVALID_REQUEST", f"{safe_url(ref)}: only model repositories are fetched, not {segs[0]}")
    if segs and segs[0] == "models":
        segs = segs[1:]
    for i, s in enumerate(segs):
        if i >= 1 and s in _REV_MARKERS:
            if i + 1 < len(segs):
                if rev is not None:
                    raise SourceError("INVALID_REQUEST", f"{safe_url(ref)} names two revisions")
                rev = unquote(segs[i + 1])
            segs = segs[:i]
            break
    if not 1 <= len(segs) <= 2:
        raise SourceError("INVALID_REQUEST", f"{safe_url(ref)} is not a repository id (owner/name)")
    repo_id = "/".join(unquote(s) for s in segs)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise SourceError("INVALID_REQUEST", f"bad repository id {repo_id!r}: {e}") from None
    return repo_id, rev, origin


def _read_token_file(path: str) -> str | None:
    try:
        text = Path(os.path.expanduser(path)).read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SourceError("INVALID_REQUEST", f"cannot read the token file {path} (HF_TOKEN_PATH): {e.strerror}") from None
    return text.strip() or None


def resolve_token(token: str | None) -> str | None:
    """The argument, else ``HF_TOKEN``, else the file named by ``HF_TOKEN_PATH``
    (read now, so a change of it needs no restart), else what
    ``huggingface_hub.get_token`` finds: the token ``hf auth login`` saved on
    this node.  Blocks (a file read)."""
    if token is not None and token.strip():
        return token.strip()
    env = os.environ.get("HF_TOKEN", "").strip()
    if env:
        return env
    path = os.environ.get("HF_TOKEN_PATH", "").strip()
    if path:
        return _read_token_file(path)
    return get_token()


def _status(e: HfHubHTTPError) -> int | None:
    r = getattr(e, "response", None)
    return getattr(r, "status_code", None)


def _api_error(e: BaseException, repo: str, rev: str | None, token: str | None) -> SourceError | Transient:
    what = f"{repo}@{rev}" if rev else repo
    if isinstance(e, GatedRepoError):
        if token:
            return SourceError("UNAUTHORIZED", f"{repo} is gated and the token's account has no access: ask for it on the hub")
        return SourceError("UNAUTHORIZED", f"{repo} is gated: it needs a token of an account with access (set HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return SourceError("NOT_FOUND", f"{repo} has no revision {rev!r}")
    if isinstance(e, RepositoryNotFoundError):
        if not token:  # the hub answers the same (401 or 404) for a missing and a private repo
            return SourceError("NOT_FOUND", f"no repository {repo} on the hub (if it is private, set HF_TOKEN)")
        return SourceError("NOT_FOUND", f"no repository {repo} on the hub (or the token cannot see it)")
    if isinstance(e, HfHubHTTPError):
        s = _status(e)
        if s == 401:
            if token:
                return SourceError("UNAUTHORIZED", f"the hub rejected the token for {what} (401: invalid or expired)")
            return SourceError("UNAUTHORIZED", f"the hub wants a token for {what} (401; set HF_TOKEN)")
        if s == 403:
            return SourceError("UNAUTHORIZED", f"the token has no access to {what} (403)")
        if s in (404, 410):
            return SourceError("NOT_FOUND", f"{what} was not found on the hub ({s})")
        if s is not None and is_transient_status(s):
            r = getattr(e, "response", None)
            ra = parse_retry_after(r.headers.get("retry-after")) if r is not None else None
            return Transient(f"the hub answered {s}", ra)
        return SourceError("INVALID_REQUEST", f"the hub answered {s} for {what}")
    if isinstance(e, OfflineModeIsEnabled):
        return SourceError("INVALID_REQUEST", "HF_HUB_OFFLINE is set: the hub cannot be reached")
    if isinstance(e, HFValidationError | ValueError):
        return SourceError("INVALID_REQUEST", f"bad request for {what}: {redact(str(e), token)}")
    if isinstance(e, _TRANSPORT_ERRORS):
        return Transient(f"cannot reach the hub: {type(e).__name__}")
    raise e


async def _model_info(
    api: HfApi, repo: str, rev: str | None, token: str | None, policy: RetryPolicy, *, files_metadata: bool = True
) -> Any:
    """The repo's info at ``rev``; ``files_metadata``: with every file's size and hashes (the heavy listing)."""
    failures = 0
    while True:
        try:
            return await trio.to_thread.run_sync(
                lambda: api.model_info(repo, revision=rev, files_metadata=files_metadata, timeout=policy.api_timeout_s),
                abandon_on_cancel=True,
            )
        except Exception as exc:
            err = _api_error(exc, repo, rev, token)
        if isinstance(err, SourceError):
            raise err
        failures += 1
        if failures >= policy.attempts:
            raise SourceError("UNAVAILABLE", f"metadata of {repo}: {err.message} (gave up after {failures} attempts)")
        delay = policy.delay(failures, err.retry_after)
        log.warning("metadata of %s: %s; retrying in %.1f s (%d/%d)", repo, err.message, delay, failures, policy.attempts)
        await trio.sleep(delay)


def _drop_partials(dest_dir: Path) -> None:
    for p in dest_dir.rglob("*.part*"):
        if p.name.endswith((".part", ".part.json")):
            p.unlink(missing_ok=True)


def _already_there(dest_dir: Path, rels: list[str]) -> int:
    n = 0
    for rel in rels:
        for p in (dest_dir / rel, dest_dir / (rel + PART_SUFFIX)):
            try:
                n += p.stat().st_size
            except OSError:
                pass
    return n


def _read_model_type(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(4 << 20))
    except (OSError, ValueError):
        return None
    mt = data.get("model_type") if isinstance(data, dict) else None
    return mt if isinstance(mt, str) and mt else None


def _pattern_list(p: Sequence[str] | str | None) -> list[str] | str | None:
    if p is None or isinstance(p, str):
        return p
    if not all(isinstance(x, str) for x in p):
        raise SourceError("INVALID_REQUEST", "file patterns must be strings")
    return list(p)


async def fetch_hf(
    repo_id: str,
    dest_dir: Path,
    *,
    revision: str | None = None,
    allow_patterns: Sequence[str] | str | None = None,
    ignore_patterns: Sequence[str] | str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    progress: Progress | None = None,
    retries: RetryPolicy | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    client: httpx.AsyncClient | None = None,
    reserve: Callable[[int], Awaitable[None]] | None = None,
) -> SourceResult:
    """Download the files of a Hugging Face model repository into ``dest_dir``.

    ``repo_id``: ``owner/name``, ``hf://owner/name[@REV]`` or a hub URL
    (``https://huggingface.co/owner/name[/tree/REV]``).  ``revision`` (a
    branch, tag or commit; default ``main``) is resolved once to a commit and
    every file is fetched at that commit.  ``allow_patterns`` /
    ``ignore_patterns``: fnmatch patterns as in ``huggingface_hub``.
    ``endpoint``: default the URL's own (non-huggingface.co) origin, else
    ``HF_ENDPOINT``, else https://huggingface.co.  ``reserve(total bytes)``,
    once the listing gives every file's size and before a byte is fetched,
    may make room or refuse (the evictor's ``make_room``).  Raises
    :class:`SourceError`.
    """
    policy = retries or DEFAULT_RETRY
    repo, url_rev, url_origin = parse_hf_ref(repo_id)
    if revision is not None and url_rev is not None and revision != url_rev:
        raise SourceError("INVALID_REQUEST", f"two revisions given: {url_rev!r} in the URL and {revision!r}")
    rev = revision or url_rev
    ep = (endpoint or url_origin or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    tok = await trio.to_thread.run_sync(resolve_token, token)
    api = HfApi(endpoint=ep, token=tok or False)
    log.info("fetching %s@%s from %s into %s (%s)", repo, rev or "main", safe_url(ep), dest_dir,
             "with a token" if tok else "anonymously")
    info = await _model_info(api, repo, rev, tok, policy)
    commit: str | None = info.sha
    if not commit:
        if rev is not None and _SHA1.match(rev):
            commit = rev
        else:
            raise SourceError("UNAVAILABLE", f"the hub did not say which commit {repo}@{rev or 'main'} is")
    selected = _select_files(info, repo, commit, allow_patterns, ignore_patterns, tok)
    total = await _make_room(selected, dest_dir, repo, commit, reserve)

    headers = {"User-Agent": "meshnode"}
    if tok:
        headers["Authorization"] = f"Bearer {tok}"
    tracker = ProgressTracker(progress, total, len(selected))
    tracker.start()
    outcomes: dict[str, Any] = {}
    limiter = trio.CapacityLimiter(max(1, concurrency))
    own = client is None
    c = client if client is not None else httpx.AsyncClient(follow_redirects=True, timeout=policy.timeout())

    async def one(s: Any) -> None:
        rel = s.rfilename
        digest: Digest | None = None
        if s.lfs is not None and getattr(s.lfs, "sha256", None):
            digest = ("sha256", s.lfs.sha256)
        elif s.blob_id and s.size is not None:
            digest = ("git-sha1", s.blob_id)
        url = hf_hub_url(repo, rel, revision=commit, endpoint=ep)
        async with limiter:
            outcomes[rel] = await download_file(
                c, url, dest_dir, rel, size=s.size, digest=digest, headers=headers, policy=policy,
                tracker=tracker, secret=tok, classify=_file_classifier(repo, commit, rel, tok),
            )

    try:
        async with trio.open_nursery() as nursery:
            for s in selected:
                nursery.start_soon(one, s)
    except BaseExceptionGroup as eg:
        first = first_of(eg, SourceError)
        if isinstance(first, SourceError) and first.code in ("UNAUTHORIZED", "NOT_FOUND"):
            # Final answers: partial files of this commit will never be resumed.
            await trio.to_thread.run_sync(_drop_partials, dest_dir)
        if first is not None and only(eg, (SourceError, trio.Cancelled)):
            raise first from None
        raise
    finally:
        if own:
            with trio.CancelScope(shield=True):
                await c.aclose()
    return await _result(info, selected, outcomes, dest_dir, repo=repo, rev=rev, commit=commit, ep=ep,
                         allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)


def _select_files(
    info: Any, repo: str, commit: str, allow_patterns: Sequence[str] | str | None,
    ignore_patterns: Sequence[str] | str | None, tok: str | None,
) -> list[Any]:
    """The repo's files the patterns select, sorted by name; each name one the store can hold."""
    siblings = list(info.siblings or [])
    try:
        selected = sorted(
            filter_repo_objects(siblings, allow_patterns=_pattern_list(allow_patterns),
                                ignore_patterns=_pattern_list(ignore_patterns),
                                key=lambda s: s.rfilename),
            key=lambda s: s.rfilename,
        )
    except (TypeError, ValueError) as e:
        raise SourceError("INVALID_REQUEST", f"bad file patterns: {e}") from None
    if not selected:
        why = " matches the patterns" if (allow_patterns or ignore_patterns) else ""
        raise SourceError("INVALID_REQUEST", f"{repo}@{commit[:12]} has no file{why}")
    for s in selected:
        try:
            validate_rel_path(s.rfilename)
        except InvalidName as e:
            raise SourceError("INVALID_REQUEST", f"{repo} has a file name that cannot be stored ({s.rfilename!r}: {e})") from None
    if info.gated and not tok:
        raise SourceError("UNAUTHORIZED", f"{repo} is gated: it needs a token of an account with access (set HF_TOKEN)")
    return selected


async def _make_room(
    selected: list[Any], dest_dir: Path, repo: str, commit: str, reserve: Callable[[int], Awaitable[None]] | None,
) -> int | None:
    """The files' total size (None when the listing lacks one): reserved, and
    checked against the free space where they are staged, less what is there."""
    sizes = [s.size for s in selected]
    total: int | None = sum(x for x in sizes if x is not None) if all(x is not None for x in sizes) else None
    rels = [s.rfilename for s in selected]
    if total is not None and reserve is not None:
        await reserve(total)
    try:
        await trio.to_thread.run_sync(make_dirs, dest_dir)
        if total is not None:
            have = await trio.to_thread.run_sync(_already_there, dest_dir, rels)
            free = (await trio.to_thread.run_sync(shutil.disk_usage, dest_dir)).free
            if total - have > free:
                raise SourceError("NO_SPACE", f"{repo}@{commit[:12]} needs {human_bytes(total - have)} more, {human_bytes(free)} free where it is "
                                  "staged")
    except OSError as e:
        raise os_error(e, str(dest_dir)) from None
    return total


def _file_classifier(repo: str, commit: str, rel: str, tok: str | None) -> Callable[[httpx.Response, bool], SourceError | None]:
    """What a failed download of file ``rel`` means, in the hub's words (its ``x-error-code``)."""
    def classify(r: httpx.Response, with_token: bool) -> SourceError | None:
        code = r.headers.get("x-error-code", "")
        message = r.headers.get("x-error-message", "")
        if code == "GatedRepo" or (r.status_code == 403 and "gated" in message.lower()):
            if with_token:
                return SourceError("UNAUTHORIZED", f"{repo} is gated and the token's account has no access: ask for it on the hub")
            return SourceError("UNAUTHORIZED", f"{repo} is gated: it needs a token of an account with access (set HF_TOKEN)")
        if code == "RepoNotFound" and not with_token:
            return SourceError("NOT_FOUND", f"no repository {repo} on the hub (if it is private, set HF_TOKEN)")
        if r.status_code == 401:
            if with_token:
                return SourceError("UNAUTHORIZED", f"the hub rejected the token for {repo} (401: invalid or expired)")
            return SourceError("UNAUTHORIZED", f"{repo} needs a token (private or gated; set HF_TOKEN)")
        if code == "RepoNotFound":
            return SourceError("NOT_FOUND", f"no repository {repo} on the hub (or the token cannot see it)")
        if code == "RevisionNotFound":
            return SourceError("NOT_FOUND", f"{repo} has no commit {commit}")
        if r.status_code in (404, 410):
            return SourceError("NOT_FOUND", f"{repo}@{commit[:12] if commit else ''} has no file {rel}")
        err = default_classify(r, with_token)
        return SourceError(err.code, redact(err.message, tok))
    return classify


async def _result(
    info: Any, selected: list[Any], outcomes: dict[str, Any], dest_dir: Path, *, repo: str, rev: str | None,
    commit: str, ep: str, allow_patterns: Sequence[str] | str | None, ignore_patterns: Sequence[str] | str | None,
) -> SourceResult:
    """What was fetched: the files, the model's type and the metadata kept with the copy."""
    model_type: str | None = None
    if "config.json" in outcomes:
        model_type = await trio.to_thread.run_sync(_read_model_type, dest_dir / "config.json")
    if model_type is None and isinstance(info.config, dict) and isinstance(info.config.get("model_type"), str):
        model_type = info.config["model_type"]
    if model_type is None:
        model_type = info.pipeline_tag or info.library_name
    files_meta: dict[str, dict[str, Any]] = {}
    for s in selected:
        m: dict[str, Any] = {"size": outcomes[s.rfilename].size}
        if s.lfs is not None and getattr(s.lfs, "sha256", None):
            m["sha256"] = s.lfs.sha256
        if s.blob_id:
            m["blob_id"] = s.blob_id
        files_meta[s.rfilename] = m
    metadata: dict[str, Any] = {
        "source": "huggingface",
        "repo_id": repo,
        "revision": rev or "main",
        "commit": commit,
        "endpoint": safe_url(ep),
        "source_url": f"{safe_url(ep)}/{repo}/tree/{commit}",
        "pipeline_tag": info.pipeline_tag,
        "library_name": info.library_name,
        "tags": list(info.tags or [])[:64],
        "gated": info.gated or False,
        "private": bool(info.private),
        "files": files_meta,
        "resumed_bytes": sum(o.resumed_bytes for o in outcomes.values()),
        "restarts": sum(o.restarts for o in outcomes.values()),
    }
    if allow_patterns is not None:
        metadata["allow_patterns"] = [allow_patterns] if isinstance(allow_patterns, str) else list(allow_patterns)
    if ignore_patterns is not None:
        metadata["ignore_patterns"] = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns)
    files = sorted(outcomes)
    log.info("fetched %s@%s: %d files, %d bytes", repo, commit[:12], len(files), sum(o.size for o in outcomes.values()))
    return SourceResult(
        files=files,
        total_bytes=sum(o.size for o in outcomes.values()),
        revision=commit,
        model_type=model_type,
        metadata=metadata,
        verified={rel: outcomes[rel].verified for rel in files},
    )


async def resolve_hf_commit(
    repo_ref: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    retries: RetryPolicy | None = None,
) -> tuple[str, str]:
    """``(repo id, commit)`` that ``repo_ref`` at ``revision`` (default main) names now.

    One metadata request: what a node asks before it decides whether the mesh
    already holds these exact bytes."""
    policy = retries or DEFAULT_RETRY
    repo, url_rev, url_origin = parse_hf_ref(repo_ref)
    rev = revision or url_rev
    ep = (endpoint or url_origin or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    tok = await trio.to_thread.run_sync(resolve_token, token)
    info = await _model_info(HfApi(endpoint=ep, token=tok or False), repo, rev, tok, policy, files_metadata=False)
    commit = info.sha or (rev if rev is not None and _SHA1.match(rev) else None)
    if not commit:
        raise SourceError("UNAVAILABLE", f"the hub did not say which commit {repo}@{rev or 'main'} is")
    return repo, str(commit)
