"""A fake Hugging Face hub (and plain file servers) on loopback, for the real client.

One trio + h11 server, so a test controls every byte: it can fail requests,
drop a connection halfway through a body, serve a wrong body, and count the
body bytes it sent per file.

Routes:

- ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}``
  (``?blobs=true`` adds sizes, blob ids and LFS info): what
  ``HfApi.model_info(..., files_metadata=True)`` reads.
- ``GET|HEAD /{repo}/resolve/{rev}/{file}``: the file at a commit or branch,
  with Range, ETag and the hub's ``X-Repo-Commit``, ``X-Linked-*`` headers;
  an LFS file redirects (302) to ``/cdn/{sha256}`` as on the real hub.
- ``GET|HEAD /files/{name}``: a plain Range-capable file server.
- ``GET|HEAD /norange/{name}``: ignores Range, always 200.
- ``GET /chunked/{name}``: no Content-Length (chunked), no Range.

Errors look like the hub's: ``X-Error-Code`` (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``, ``GatedRepo``) and
``X-Error-Message``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import trio

_CHUNK = 64 * 1024
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeFile:
    data: bytes
    lfs: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def blob_id(self) -> str:
        if self.lfs:  # the blob is the LFS pointer file
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
            return git_blob_sha1(pointer.encode())
        return git_blob_sha1(self.data)

    @property
    def etag(self) -> str:
        return f'"{self.sha256 if self.lfs else self.blob_id}"'


@dataclass
class FakeRepo:
    repo_id: str
    commits: dict[str, dict[str, FakeFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    pipeline_tag: str | None = "text-generation"
    library_name: str | None = "transformers"
    gated: str | bool = False  # "manual" or "auto" to gate it
    private: bool = False  # needs the hub's token
    allowed: set[str] = field(default_factory=set)  # tokens with access to a gated repo

    def add_commit(self, files: dict[str, FakeFile], *branches: str) -> str:
        h = hashlib.sha1()
        for name in sorted(files):
            h.update(name.encode() + b"\0" + files[name].sha256.encode())
        h.update(str(len(self.commits)).encode())
        sha = h.hexdigest()
        self.commits[sha] = files
        for b in branches:
            self.refs[b] = sha
        return sha

    def resolve(self, rev: str) -> str | None:
        if rev in self.commits:
            return rev
        return self.refs.get(rev)


@dataclass
class Served:
    """One request the server saw (no header values: tests look at names and ranges)."""

    method: str
    path: str
    status: int
    range: str | None
    if_range: str | None
    authorized: bool


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.plain: dict[str, bytes] = {}  # /files, /norange, /chunked
        self.host = "127.0.0.1"
        self.port = 0
        # -- knobs ------------------------------------------------------------------
        self.token: str | None = None  # the one valid token (None: any or none is fine)
        self.fail_next = 0  # the next K requests (matching fail_match) answer fail_status
        self.fail_always = False
        self.fail_status = 500
        self.fail_match = ""  # substring of the path; "" matches every request
        self.retry_after: str | None = None  # sent with failures
        self.drop_after: dict[str, list[int]] = {}  # file -> byte counts: drop the next responses after that many body bytes
        self.wrong_body: dict[str, int] = {}  # file -> how many more responses carry a corrupted body (-1: always)
        self.redirect_lfs = True
        # -- what happened ------------------------------------------------------------
        self.served: Counter[str] = Counter()  # file (repo path or plain name) -> body bytes sent
        self.log: list[Served] = []
        self._cdn: dict[str, tuple[str, FakeFile]] = {}

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.endpoint}/{path.lstrip('/')}"

    def add_repo(self, repo: FakeRepo) -> FakeRepo:
        self.repos[repo.repo_id] = repo
        for files in repo.commits.values():
            for name, f in files.items():
                if f.lfs:
                    self._cdn[f.sha256] = (name, f)
        return repo

    def requests_for(self, fragment: str) -> list[Served]:
        return [s for s in self.log if fragment in s.path]

    # -- serving ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)  # port 0 (the default): any
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read_request(conn, stream)
                if request is None:
                    return
                keep = await self._dispatch(conn, stream, request)
                if not keep or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    async def _read_request(self, conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
        request: h11.Request | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)  # b"" is EOF
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _send(self, conn: h11.Connection, stream: trio.SocketStream, event: h11.Event) -> None:
        data = conn.send(event)
        if data:
            await stream.send_all(data)

    async def _simple(self, conn: h11.Connection, stream: trio.SocketStream, status: int, body: bytes = b"",
                      headers: list[tuple[str, str]] | None = None, content_type: str = "application/json") -> bool:
        hs = [("Content-Type", content_type), ("Content-Length", str(len(body))), *(headers or [])]
        await self._send(conn, stream, h11.Response(status_code=status, headers=hs))
        if body:
            await self._send(conn, stream, h11.Data(data=body))
        await self._send(conn, stream, h11.EndOfMessage())
        return True

    async def _error(self, conn: h11.Connection, stream: trio.SocketStream, status: int, message: str,
                     code: str | None = None, header_message: str | None = None) -> bool:
        hs: list[tuple[str, str]] = []
        if code:
            hs.append(("X-Error-Code", code))
        if header_message:
            hs.append(("X-Error-Message", header_message))
        return await self._simple(conn, stream, status, json.dumps({"error": message}).encode(), hs)

    async def _dispatch(self, conn: h11.Connection, stream: trio.SocketStream, req: h11.Request) -> bool:
        target = req.target.decode("latin-1")
        split = urlsplit(target)
        path = split.path
        query = parse_qs(split.query)
        method = req.method.decode()
        hdrs = {k.decode().lower(): v.decode("latin-1") for k, v in req.headers}
        auth = hdrs.get("authorization", "")
        given = auth[len("Bearer "):] if auth.startswith("Bearer ") else None

        def record(status: int) -> None:
            self.log.append(Served(method, unquote(path), status, hdrs.get("range"), hdrs.get("if-range"), given is not None))

        if self.fail_always or (self.fail_next > 0 and self.fail_match in unquote(path)):
            if not self.fail_always:
                self.fail_next -= 1
            record(self.fail_status)
            extra = [("Retry-After", self.retry_after)] if self.retry_after else []
            return await self._simple(conn, stream, self.fail_status, b'{"error": "boom"}', extra)

        if path.startswith("/api/models/"):
            rest = unquote(path[len("/api/models/"):])
            rev: str | None = None
            if "/revision/" in rest:
                rest, rev = rest.split("/revision/", 1)
            return await self._api(conn, stream, rest, rev, given, "blobs" in query, record)
        for prefix, mode in (("/files/", "range"), ("/norange/", "norange"), ("/chunked/", "chunked")):
            if path.startswith(prefix):
                name = unquote(path[len(prefix):])
                data = self.plain.get(name)
                if data is None:
                    record(404)
                    return await self._error(conn, stream, 404, "no such file")
                etag = f'"{hashlib.sha256(data).hexdigest()[:32]}"'
                record(200)
                return await self._file(conn, stream, method, hdrs, name, data, etag, mode, [])
        if path.startswith("/cdn/"):
            sha = path[len("/cdn/"):]
            entry = self._cdn.get(sha)
            if entry is None:
                record(404)
                return await self._error(conn, stream, 404, "no such object")
            name, f = entry
            record(200)
            return await self._file(conn, stream, method, hdrs, name, f.data, f.etag, "range", [])
        m = re.match(r"^/(.+?)/resolve/([^/]+)/(.+)$", path)
        if m:
            return await self._resolve(conn, stream, method, hdrs, unquote(m.group(1)), unquote(m.group(2)),
                                       unquote(m.group(3)), given, record)
        record(404)
        return await self._error(conn, stream, 404, "not found")

    def _auth_error(self, repo: FakeRepo, given: str | None, for_file: bool) -> tuple[int, str, str | None, str | None] | None:
        if given is not None and self.token is not None and given != self.token:
            return 401, "Invalid credentials in Authorization header", None, "Invalid credentials in Authorization header"
        if repo.private and (given is None or given != self.token):
            return 401, "Repository not found", "RepoNotFound", None
        if for_file and repo.gated:
            if given is None:
                return 401, "Access to this model is restricted: you must be authenticated", "GatedRepo", "Access restricted: log in"
            if given not in repo.allowed:
                return 403, "Access to this model is restricted and you are not in the authorized list", "GatedRepo", \
                    "Access to model is restricted and you are not in the authorized list. Visit the page to ask for access."
        return None

    async def _api(self, conn: h11.Connection, stream: trio.SocketStream, repo_id: str, rev: str | None,
                   given: str | None, blobs: bool, record: Callable[[int], None]) -> bool:
        repo = self.repos.get(repo_id)
        if repo is None:
            if given is None:  # the hub hides missing and private repos alike
                record(401)
                return await self._error(conn, stream, 401, "Repository not found", "RepoNotFound")
            record(404)
            return await self._error(conn, stream, 404, "Repository not found", "RepoNotFound")
        err = self._auth_error(repo, given, for_file=False)
        if err is not None:
            record(err[0])
            return await self._error(conn, stream, err[0], err[1], err[2], err[3])
        sha = repo.resolve(rev or "main")
        if sha is None:
            record(404)
            return await self._error(conn, stream, 404, f"Invalid rev id: {rev}", "RevisionNotFound")
        files = repo.commits[sha]
        siblings = []
        for name in sorted(files):
            f = files[name]
            s: dict[str, object] = {"rfilename": name}
            if blobs:
                s["size"] = len(f.data)
                s["blobId"] = f.blob_id
                if f.lfs:
                    s["lfs"] = {"size": len(f.data), "sha256": f.sha256, "pointerSize": 134}
            siblings.append(s)
        config = None
        if "config.json" in files:
            try:
                config = {"model_type": json.loads(files["config.json"].data).get("model_type")}
            except ValueError:
                config = None
        body = {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": sha,
            "lastModified": "2024-05-01T12:00:00.000Z",
            "createdAt": "2024-04-01T12:00:00.000Z",
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "library_name": repo.library_name,
            "pipeline_tag": repo.pipeline_tag,
            "tags": ["safetensors", repo.library_name or "none"],
            "config": config,
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(len(f.data) for f in files.values()),
        }
        record(200)
        return await self._simple(conn, stream, 200, json.dumps(body).encode())

    async def _resolve(self, conn: h11.Connection, stream: trio.SocketStream, method: str, hdrs: dict[str, str],
                       repo_id: str, rev: str, name: str, given: str | None, record: Callable[[int], None]) -> bool:
        repo = self.repos.get(repo_id)
        if repo is None:
            record(404)
            return await self._error(conn, stream, 404, "Repository not found", "RepoNotFound")
        err = self._auth_error(repo, given, for_file=True)
        if err is not None:
            record(err[0])
            return await self._error(conn, stream, err[0], err[1], err[2], err[3])
        sha = repo.resolve(rev)
        if sha is None:
            record(404)
            return await self._error(conn, stream, 404, "Invalid rev id", "RevisionNotFound")
        f = repo.commits[sha].get(name)
        if f is None:
            record(404)
            return await self._error(conn, stream, 404, "Entry not found", "EntryNotFound")
        linked = [("X-Repo-Commit", sha), ("X-Linked-Size", str(len(f.data))), ("X-Linked-Etag", f.etag)]
        if f.lfs and self.redirect_lfs:
            record(302)
            self._cdn[f.sha256] = (name, f)
            return await self._simple(conn, stream, 302, b"", [("Location", f"/cdn/{f.sha256}"), *linked])
        record(200)
        return await self._file(conn, stream, method, hdrs, name, f.data, f.etag, "range", linked)

    async def _file(self, conn: h11.Connection, stream: trio.SocketStream, method: str, hdrs: dict[str, str],
                    name: str, data: bytes, etag: str, mode: str, extra: list[tuple[str, str]]) -> bool:
        size = len(data)
        start, end = 0, size
        status = 200
        rng = hdrs.get("range")
        if mode == "range" and rng is not None:
            if_range = hdrs.get("if-range")
            if if_range is None or if_range == etag:
                m = _RANGE.match(rng.strip())
                if m:
                    start = int(m.group(1))
                    end = min(size, int(m.group(2)) + 1) if m.group(2) else size
                    if start >= size:
                        return await self._simple(conn, stream, 416, b"", [("Content-Range", f"bytes */{size}")])
                    status = 206
        hs = [("Content-Type", "application/octet-stream"), ("ETag", etag), *extra]
        if mode == "range":
            hs.append(("Accept-Ranges", "bytes"))
        if status == 206:
            hs.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
        if mode != "chunked":
            hs.append(("Content-Length", str(end - start)))
        else:
            hs.append(("Transfer-Encoding", "chunked"))
        await self._send(conn, stream, h11.Response(status_code=status, headers=hs))
        if method == "HEAD":
            await self._send(conn, stream, h11.EndOfMessage())
            return True
        body = data[start:end]
        left = self.wrong_body.get(name, 0)
        if left != 0:
            body = bytes(b ^ 0x5A for b in body[:4096]) + body[4096:]
            if left > 0:
                self.wrong_body[name] = left - 1
        drops = self.drop_after.get(name)
        limit = drops.pop(0) if drops else None
        sent = 0
        while sent < len(body):
            n = min(_CHUNK, len(body) - sent)
            if limit is not None and sent + n > limit:
                n = limit - sent
                if n > 0:
                    await self._send(conn, stream, h11.Data(data=body[sent:sent + n]))
                    self.served[name] += n
                # Vanish mid-body: the client sees the connection end early.
                await trio.aclose_forcefully(stream)
                return False
            await self._send(conn, stream, h11.Data(data=body[sent:sent + n]))
            self.served[name] += n
            sent += n
        await self._send(conn, stream, h11.EndOfMessage())
        return True


@asynccontextmanager
async def run_fakehub() -> AsyncIterator[FakeHub]:
    hub = FakeHub()
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve)
        try:
            yield hub
        finally:
            nursery.cancel_scope.cancel()


def model_files(seed: int = 0, mib: int = 3) -> dict[str, FakeFile]:
    """A small, real-looking model: two weight files (one LFS), JSON configs, a nested file."""
    import random

    rnd = random.Random(seed)

    def blob(n: int) -> bytes:
        return rnd.randbytes(n)

    def safetensors(n: int) -> bytes:
        header = json.dumps({"w": {"dtype": "F32", "shape": [n // 4], "data_offsets": [0, n]}}).encode()
        return len(header).to_bytes(8, "little") + header + blob(n)

    return {
        "config.json": FakeFile(json.dumps({"model_type": "llama", "hidden_size": 64, "seed": seed}).encode()),
        "generation_config.json": FakeFile(b'{"do_sample": false}'),
        "model-00001-of-00002.safetensors": FakeFile(safetensors(mib << 20), lfs=True),
        "model-00002-of-00002.safetensors": FakeFile(safetensors((mib << 20) // 3 + 12345), lfs=False),
        "tokenizer/tokenizer.json": FakeFile(json.dumps({"vocab": {f"t{i}": i for i in range(2000)}}).encode()),
        "README.md": FakeFile(b"# a fake model\n"),
    }
