"""Sources against a fake hub on loopback, with the real huggingface_hub client."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trio
from huggingface_hub import close_session
from huggingface_hub import constants as hf_constants

from meshnode.copies.sources import RetryPolicy, SourceError, fetch_source, is_hf_source
from meshnode.copies.sources.hf import fetch_hf, parse_hf_ref
from meshnode.copies.sources.http import fetch_url
from meshnode.copies.store import Store
from tests.integration.fakehub import FakeHub, FakeRepo, model_files, run_fakehub

FAST = RetryPolicy(attempts=3, base_s=0.01, max_s=0.05, connect_timeout_s=5, read_timeout_s=5, api_timeout_s=5)
REPO = "acme/tiny"
LFS = "model-00001-of-00002.safetensors"
PLAIN_BIG = "model-00002-of-00002.safetensors"
MARGIN = 256 * 1024


@pytest.fixture(autouse=True)
def hf_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for var in ("HF_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    # Where `hf auth login` saves its token: here, empty, whatever this machine's user saved.
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield
    close_session()  # the hub client's pooled connections point at a server that is gone


@pytest.fixture
async def hub(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeHub]:
    async with run_fakehub() as h:
        repo = FakeRepo(REPO)
        repo.add_commit(model_files(seed=1), "main")
        dev = model_files(seed=2)
        dev["config.json"].data = b'{"model_type": "mistral"}'
        repo.add_commit(dev, "dev")
        h.add_repo(repo)
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


def files_of(hub: FakeHub, rev: str = "main") -> dict[str, bytes]:
    repo = hub.repos[REPO]
    return {k: v.data for k, v in repo.commits[repo.refs[rev]].items()}


def on_disk(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


async def expect_error(code: str, coro: object) -> SourceError:
    with pytest.raises(SourceError) as info:
        await coro  # type: ignore[misc]
    assert info.value.code == code, info.value
    return info.value


# -- Hugging Face -------------------------------------------------------------------------------


async def test_full_repo_byte_identical_with_commit(hub: FakeHub, tmp_path: Path) -> None:
    dest = tmp_path / "stage"
    calls: list[tuple[int, int | None, int, int | None]] = []
    res = await fetch_hf(REPO, dest, endpoint=hub.endpoint, progress=lambda *a: calls.append(a), retries=FAST)
    want = files_of(hub)
    assert on_disk(dest) == want  # nothing else: no .part, no sidecar
    assert res.files == sorted(want)
    assert res.revision == hub.repos[REPO].refs["main"]
    assert res.total_bytes == sum(len(v) for v in want.values())
    assert res.model_type == "llama"
    assert res.verified == dict.fromkeys(want, True)
    assert res.metadata["commit"] == res.revision and res.metadata["repo_id"] == REPO
    assert res.metadata["files"][LFS]["sha256"]
    assert calls[-1] == (res.total_bytes, res.total_bytes, len(want), len(want))
    for name, data in want.items():
        assert hub.served[name] == len(data)
    # Pinned to the commit; the LFS file came through the redirect to the CDN.
    assert all(res.revision in s.path for s in hub.requests_for("/resolve/"))
    assert hub.requests_for("/cdn/")
    # The caller's next step: the staging directory becomes a copy.
    store = Store("n1", tmp_path / "data", tmp_path / "shm")
    store.scan()
    copy = store.ingest_path("disk", REPO, dest)
    assert copy.manifest.total_bytes == res.total_bytes
    assert sorted(f.path for f in copy.manifest.files) == res.files


async def test_allow_and_ignore_patterns(hub: FakeHub, tmp_path: Path) -> None:
    res = await fetch_hf(REPO, tmp_path / "a", endpoint=hub.endpoint, allow_patterns=["*.json", "tokenizer/*"],
                         ignore_patterns="generation_*", retries=FAST)
    assert res.files == ["config.json", "tokenizer/tokenizer.json"]
    assert sorted(on_disk(tmp_path / "a")) == res.files
    res = await fetch_hf(REPO, tmp_path / "b", endpoint=hub.endpoint, allow_patterns="*.safetensors", retries=FAST)
    assert res.files == [LFS, PLAIN_BIG]
    assert res.model_type == "llama"  # no config.json fetched: the hub's config says it
    await expect_error("INVALID_REQUEST", fetch_hf(REPO, tmp_path / "c", endpoint=hub.endpoint,
                                                   allow_patterns="*.gguf", retries=FAST))


async def test_branch_resolves_to_commit_and_url_forms(hub: FakeHub, tmp_path: Path) -> None:
    dev_sha = hub.repos[REPO].refs["dev"]
    res = await fetch_hf(REPO, tmp_path / "a", endpoint=hub.endpoint, revision="dev", retries=FAST)
    assert res.revision == dev_sha
    assert res.model_type == "mistral"
    assert on_disk(tmp_path / "a") == files_of(hub, "dev")
    # The hub URL of a non-huggingface.co host is its own endpoint.
    res = await fetch_hf(f"{hub.endpoint}/{REPO}/tree/dev", tmp_path / "b", allow_patterns="config.json", retries=FAST)
    assert res.revision == dev_sha
    # huggingface.co URLs and hf:// go to HF_ENDPOINT (here the fake hub); a commit is a revision too.
    res = await fetch_source(f"https://huggingface.co/{REPO}/tree/{dev_sha}", tmp_path / "c",
                             allow_patterns="config.json", retries=FAST)
    assert res.revision == dev_sha
    res = await fetch_source(f"hf://{REPO}@dev", tmp_path / "d", allow_patterns="config.json", retries=FAST)
    assert res.revision == dev_sha and res.model_type == "mistral"


def test_parse_hf_ref() -> None:
    assert parse_hf_ref("acme/tiny") == ("acme/tiny", None, None)
    assert parse_hf_ref("gpt2") == ("gpt2", None, None)
    assert parse_hf_ref("https://huggingface.co/acme/tiny") == ("acme/tiny", None, None)
    assert parse_hf_ref("https://huggingface.co/acme/tiny/tree/v1.0") == ("acme/tiny", "v1.0", None)
    assert parse_hf_ref("https://huggingface.co/acme/tiny/tree/refs%2Fpr%2F3/sub") == ("acme/tiny", "refs/pr/3", None)
    assert parse_hf_ref("https://huggingface.co/models/acme/tiny/") == ("acme/tiny", None, None)
    assert parse_hf_ref("http://127.0.0.1:9/acme/tiny/tree/dev") == ("acme/tiny", "dev", "http://127.0.0.1:9")
    assert parse_hf_ref("hf://acme/tiny@main") == ("acme/tiny", "main", None)
    for bad in ("", "a/b/c", "https://huggingface.co/datasets/acme/data", "ftp://x/a/b", "acme/ti ny", "../x"):
        with pytest.raises(SourceError) as info:
            parse_hf_ref(bad)
        assert info.value.code == "INVALID_REQUEST"
    assert is_hf_source("https://huggingface.co/a/b") and is_hf_source("hf://a/b")
    assert not is_hf_source("https://example.com/a/b")


async def test_dropped_connection_resumes_from_verified_prefix(hub: FakeHub, tmp_path: Path) -> None:
    want = files_of(hub)
    hub.drop_after[LFS] = [1_200_000, 700_000]  # twice, at different places
    hub.drop_after[PLAIN_BIG] = [300_000]
    res = await fetch_hf(REPO, tmp_path / "s", endpoint=hub.endpoint, retries=FAST, concurrency=2)
    assert on_disk(tmp_path / "s") == want
    assert res.verified[LFS] and res.verified[PLAIN_BIG]
    assert res.metadata["resumed_bytes"] >= 1_200_000 + 700_000 + 300_000
    for name, data in want.items():
        assert hub.served[name] <= len(data) * 1.1 + MARGIN, name
    ranged = [s for s in hub.requests_for("/cdn/") if s.range]
    assert [s.range for s in ranged] == ["bytes=1200000-", "bytes=1900000-"]
    assert all(s.if_range for s in ranged)


async def test_resume_across_calls(hub: FakeHub, tmp_path: Path) -> None:
    """A failed call leaves .part files; the next call with the same staging dir goes on from them."""
    hub.drop_after[LFS] = [2_000_000]
    one = RetryPolicy(attempts=1, base_s=0, max_s=0, read_timeout_s=5)
    await expect_error("UNAVAILABLE", fetch_hf(REPO, tmp_path / "s", endpoint=hub.endpoint, retries=one, concurrency=1))
    assert (tmp_path / "s" / f"{LFS}.part").stat().st_size == 2_000_000
    res = await fetch_hf(REPO, tmp_path / "s", endpoint=hub.endpoint, retries=FAST)
    want = files_of(hub)
    assert on_disk(tmp_path / "s") == want
    for name, data in want.items():
        assert hub.served[name] <= len(data) * 1.1 + MARGIN, name
    assert res.metadata["resumed_bytes"] >= 2_000_000


async def test_bad_token_is_unauthorized_and_never_shown(hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "hf_WRONGtokenVALUE1234567890"
    hub.token = "hf_rightTOKEN0987654321"
    hub.repos[REPO].private = True
    e = await expect_error("UNAUTHORIZED", fetch_hf(REPO, tmp_path / "a", endpoint=hub.endpoint, token=secret, retries=FAST))
    assert secret not in str(e) and secret not in repr(e) and "rejected" in str(e)
    assert secret not in "".join(traceback.format_exception(e))  # nor in what it chains to
    # A private repo and no token: the hub says "not found", and so do we (with the hint).
    e = await expect_error("NOT_FOUND", fetch_hf(REPO, tmp_path / "b", endpoint=hub.endpoint, retries=FAST))
    assert "HF_TOKEN" in str(e)
    # The right token from HF_TOKEN_PATH works; so does HF_TOKEN.
    tok_file = tmp_path / "token"
    tok_file.write_text(hub.token + "\n")
    monkeypatch.setenv("HF_TOKEN_PATH", str(tok_file))
    res = await fetch_hf(REPO, tmp_path / "c", endpoint=hub.endpoint, allow_patterns="*.json", retries=FAST)
    assert res.files == ["config.json", "generation_config.json", "tokenizer/tokenizer.json"]
    assert all(s.authorized for s in hub.log[-2:])
    # The token `hf auth login` saved is used when nothing else names one.
    monkeypatch.delenv("HF_TOKEN_PATH")
    saved = Path(hf_constants.HF_TOKEN_PATH)
    saved.parent.mkdir(parents=True)
    saved.write_text(hub.token)
    res = await fetch_hf(REPO, tmp_path / "saved", endpoint=hub.endpoint, allow_patterns="*.json", retries=FAST)
    assert len(res.files) == 3 and all(s.authorized for s in hub.log[-2:])
    saved.unlink()
    monkeypatch.setenv("HF_TOKEN_PATH", str(tok_file))
    monkeypatch.setenv("HF_TOKEN", secret)  # wins over the file
    e = await expect_error("UNAUTHORIZED", fetch_hf(REPO, tmp_path / "d", endpoint=hub.endpoint, retries=FAST))
    assert secret not in str(e)
    # The token was also sent on file requests that failed: not in any log line either.
    hub.repos[REPO].private = False
    hub.token = None
    monkeypatch.delenv("HF_TOKEN")
    res = await fetch_hf(REPO, tmp_path / "e", endpoint=hub.endpoint, token=secret, allow_patterns="*.json", retries=FAST)
    assert secret not in caplog.text and hub.token is None


async def test_gated_repo_is_unauthorized(hub: FakeHub, tmp_path: Path) -> None:
    repo = hub.repos[REPO]
    repo.gated = "manual"
    repo.allowed = {"hf_granted"}
    e = await expect_error("UNAUTHORIZED", fetch_hf(REPO, tmp_path / "a", endpoint=hub.endpoint, retries=FAST))
    assert "gated" in str(e)
    e = await expect_error("UNAUTHORIZED", fetch_hf(REPO, tmp_path / "b", endpoint=hub.endpoint, token="hf_notgranted",
                                                    retries=FAST))
    assert "gated" in str(e) and "hf_notgranted" not in str(e)
    assert not list((tmp_path / "b").rglob("*.part*"))  # nothing useless left behind
    assert [s.status for s in hub.requests_for("/resolve/")][:1] == [403]
    res = await fetch_hf(REPO, tmp_path / "c", endpoint=hub.endpoint, token="hf_granted", retries=FAST)
    assert on_disk(tmp_path / "c") == files_of(hub)
    assert res.metadata["gated"] == "manual"


async def test_not_found_repo_and_revision(hub: FakeHub, tmp_path: Path) -> None:
    e = await expect_error("NOT_FOUND", fetch_hf("acme/nope", tmp_path / "a", endpoint=hub.endpoint, token="hf_x", retries=FAST))
    assert "acme/nope" in str(e)
    await expect_error("NOT_FOUND", fetch_hf("acme/nope", tmp_path / "a", endpoint=hub.endpoint, retries=FAST))
    e = await expect_error("NOT_FOUND", fetch_hf(REPO, tmp_path / "b", endpoint=hub.endpoint, revision="no-such-branch",
                                                 retries=FAST))
    assert "no-such-branch" in str(e)
    # never retried
    assert len(hub.requests_for("/api/models/acme/nope")) == 2
    assert len(hub.requests_for("no-such-branch")) == 1


async def test_server_errors_are_retried(hub: FakeHub, tmp_path: Path) -> None:
    hub.fail_next = 2  # the metadata request fails twice
    res = await fetch_hf(REPO, tmp_path / "a", endpoint=hub.endpoint, allow_patterns="*.json", retries=FAST)
    assert res.files == ["config.json", "generation_config.json", "tokenizer/tokenizer.json"]
    assert [s.status for s in hub.log[:3]] == [500, 500, 200]
    hub.fail_next, hub.fail_match = 2, "config.json"  # and a file, twice
    res = await fetch_hf(REPO, tmp_path / "b", endpoint=hub.endpoint, allow_patterns="config.json", retries=FAST)
    assert on_disk(tmp_path / "b") == {"config.json": files_of(hub)["config.json"]}
    # 429 with Retry-After is honoured
    hub.fail_next, hub.fail_match, hub.fail_status, hub.retry_after = 1, "config.json", 429, "0.3"
    t0 = time.monotonic()
    await fetch_hf(REPO, tmp_path / "c", endpoint=hub.endpoint, allow_patterns="config.json", retries=FAST)
    assert time.monotonic() - t0 >= 0.3


async def test_always_failing_is_unavailable_after_the_bound(hub: FakeHub, tmp_path: Path) -> None:
    hub.fail_always = True
    e = await expect_error("UNAVAILABLE", fetch_hf(REPO, tmp_path / "a", endpoint=hub.endpoint, retries=FAST))
    assert "3 attempts" in str(e)
    assert len(hub.log) == FAST.attempts
    hub.fail_always = False
    hub.fail_next, hub.fail_match = 100, "/resolve/"
    e = await expect_error("UNAVAILABLE", fetch_hf(REPO, tmp_path / "b", endpoint=hub.endpoint, allow_patterns="README.md",
                                                   retries=FAST))
    assert len(hub.requests_for("/resolve/")) == FAST.attempts


async def test_wrong_body_is_bad_content_after_one_retry(hub: FakeHub, tmp_path: Path) -> None:
    want = files_of(hub)
    hub.wrong_body[LFS] = 1  # once: the retry fixes it
    hub.wrong_body["config.json"] = 1  # a git (non-LFS) file: checked against its blob id
    res = await fetch_hf(REPO, tmp_path / "a", endpoint=hub.endpoint, retries=FAST)
    assert on_disk(tmp_path / "a") == want
    assert res.metadata["restarts"] == 2
    hub.served.clear()
    hub.wrong_body[LFS] = -1  # always
    e = await expect_error("BAD_CONTENT", fetch_hf(REPO, tmp_path / "b", endpoint=hub.endpoint, allow_patterns=LFS,
                                                   retries=FAST))
    assert "sha256" in str(e)
    assert hub.served[LFS] == 2 * len(want[LFS])
    assert not (tmp_path / "b" / LFS).exists() and not (tmp_path / "b" / f"{LFS}.part").exists()


# -- plain HTTP ---------------------------------------------------------------------------------


def blob(n: int, seed: int = 7) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


async def test_http_resume_with_range(hub: FakeHub, tmp_path: Path) -> None:
    data = blob(3_000_000)
    hub.plain["w.bin"] = data
    hub.drop_after["w.bin"] = [1_000_000, 1_000_000]
    calls: list[tuple[int, int | None, int, int | None]] = []
    res = await fetch_url(hub.url("files/w.bin"), tmp_path / "s", progress=lambda *a: calls.append(a), retries=FAST)
    assert res.files == ["w.bin"] and res.total_bytes == len(data)
    assert (tmp_path / "s" / "w.bin").read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["w.bin"]
    assert hub.served["w.bin"] == len(data)
    assert [s.range for s in hub.requests_for("/files/")] == [None, "bytes=1000000-", "bytes=2000000-"]
    assert all(s.if_range for s in hub.requests_for("/files/")[1:])
    assert calls[-1] == (len(data), len(data), 1, 1)
    assert res.metadata["etag"] and res.verified == {"w.bin": False}
    # An http(s) URL through the dispatcher: a server on loopback only when allowed.
    with pytest.raises(SourceError) as e:
        await fetch_source(hub.url("files/w.bin"), tmp_path / "t", retries=FAST)
    assert e.value.code == "PRIVATE_SOURCE" and "--allow-private-sources" in e.value.message
    assert not (tmp_path / "t" / "w.bin").exists()
    res = await fetch_source(hub.url("files/w.bin"), tmp_path / "t", retries=FAST, allow_private=True)
    assert res.files == ["w.bin"]


async def test_http_without_range_restarts_cleanly(hub: FakeHub, tmp_path: Path) -> None:
    data = blob(2_500_000)
    hub.plain["w.bin"] = data
    hub.drop_after["w.bin"] = [1_000_000]
    res = await fetch_url(hub.url("norange/w.bin"), tmp_path / "s", retries=FAST, filename="weights.bin")
    assert (tmp_path / "s" / "weights.bin").read_bytes() == data
    assert res.metadata["restarts"] == 1
    assert hub.served["w.bin"] == len(data) + 1_000_000
    assert hub.requests_for("/norange/")[1].range == "bytes=1000000-"  # asked, got a 200


async def test_http_changed_file_restarts_from_zero(hub: FakeHub, tmp_path: Path) -> None:
    hub.plain["w.bin"] = blob(2_000_000, seed=1)
    hub.drop_after["w.bin"] = [900_000]
    one = RetryPolicy(attempts=1, base_s=0, max_s=0, read_timeout_s=5)
    await expect_error("UNAVAILABLE", fetch_url(hub.url("files/w.bin"), tmp_path / "s", retries=one))
    assert (tmp_path / "s" / "w.bin.part").stat().st_size == 900_000
    new = blob(2_100_000, seed=2)
    hub.plain["w.bin"] = new  # a new ETag: If-Range fails, the server sends it all
    res = await fetch_url(hub.url("files/w.bin"), tmp_path / "s", retries=FAST)
    assert (tmp_path / "s" / "w.bin").read_bytes() == new and res.total_bytes == len(new)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["w.bin"]


async def test_http_chunked_and_errors(hub: FakeHub, tmp_path: Path) -> None:
    data = blob(1_500_000)
    hub.plain["c.bin"] = data
    res = await fetch_url(hub.url("chunked/c.bin"), tmp_path / "s", retries=FAST)
    assert (tmp_path / "s" / "c.bin").read_bytes() == data and res.total_bytes == len(data)
    await expect_error("NOT_FOUND", fetch_url(hub.url("files/missing.bin"), tmp_path / "s", retries=FAST))
    await expect_error("INVALID_REQUEST", fetch_url("ftp://example.com/x.bin", tmp_path / "s", retries=FAST))
    await expect_error("INVALID_REQUEST", fetch_url(hub.url("files/"), tmp_path / "s", retries=FAST))
    await expect_error("INVALID_REQUEST", fetch_source("file:///etc/passwd", tmp_path / "s", retries=FAST))
    # Nothing listens there: connection refused, retried, then UNAVAILABLE.
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await expect_error("UNAVAILABLE", fetch_url(f"http://127.0.0.1:{port}/x.bin", tmp_path / "s", retries=FAST))
    # A caller's own client is used and left open.
    async with httpx.AsyncClient(follow_redirects=True) as client:
        res = await fetch_url(hub.url("files/c.bin"), tmp_path / "u", client=client, retries=FAST)
        assert not client.is_closed


async def test_no_space(hub: FakeHub, tmpfs: Callable[[int], Path]) -> None:
    small_fs = tmpfs(1)
    hub.plain["big.bin"] = blob(3_000_000)
    # Known length: refused before writing.
    await expect_error("NO_SPACE", fetch_url(hub.url("files/big.bin"), small_fs / "a", retries=FAST))
    await expect_error("NO_SPACE", fetch_hf(REPO, small_fs / "b", endpoint=hub.endpoint, retries=FAST))
    # Unknown length: the write itself fails with ENOSPC.
    e = await expect_error("NO_SPACE", fetch_url(hub.url("chunked/big.bin"), small_fs / "c", retries=FAST))
    assert "big.bin" in str(e)


async def test_reserve_is_asked_once_with_the_length_before_a_byte_is_kept(hub: FakeHub, tmp_path: Path) -> None:
    """The evictor's make_room is asked for the bytes as soon as a source knows
    them: a URL from its response's length (once, resumes and all), the hub
    from its listing before any file is asked for; a refusal ends the fetch
    with nothing kept; a length the server does not say reserves nothing."""
    data = blob(700_000)
    hub.plain["w.bin"] = data
    asked: list[tuple[int, int]] = []

    async def reserve(n: int) -> None:
        asked.append((n, sum(hub.served.values())))

    hub.drop_after["w.bin"] = [300_000]  # one drop: the resume must not ask again
    res = await fetch_url(hub.url("files/w.bin"), tmp_path / "a", retries=FAST, reserve=reserve)
    assert res.total_bytes == len(data) and [n for n, _ in asked] == [len(data)]
    assert res.metadata is not None and res.metadata["resumed_bytes"] >= 300_000  # it did resume

    asked.clear()
    hub.served.clear()
    res = await fetch_hf(REPO, tmp_path / "b", endpoint=hub.endpoint, retries=FAST, reserve=reserve)
    assert asked == [(res.total_bytes, 0)]  # every file's size, before any file was asked for

    async def refuse(n: int) -> None:
        raise SourceError("NO_SPACE", f"no room for {n} bytes")

    await expect_error("NO_SPACE", fetch_url(hub.url("files/w.bin"), tmp_path / "c", retries=FAST, reserve=refuse))
    assert not any(f.stat().st_size for f in (tmp_path / "c").rglob("*") if f.is_file())
    await expect_error("NO_SPACE", fetch_hf(REPO, tmp_path / "d", endpoint=hub.endpoint, retries=FAST, reserve=refuse))
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").rglob("*.bin"))

    asked.clear()
    await fetch_url(hub.url("chunked/w.bin"), tmp_path / "e", retries=FAST, reserve=reserve)
    assert asked == []
