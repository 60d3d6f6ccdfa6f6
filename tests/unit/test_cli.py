"""The ``meshnode`` command line against a fake peer.

The fake is a plain function behind ``httpx.MockTransport``; ``cli.commands.make_client``
is swapped so every command talks to it.  Each test checks what went over the
wire (method, path, body, Authorization) and what the user saw.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshnode import cli
from meshnode.cli import commands, render, values, waiting
from meshnode.cli.client import ApiClient, model_path, normalize_peer_url

TOKEN = "s3cret-token-value"
REPO_ROOT = Path(__file__).resolve().parents[2]

Handler = Callable[[httpx.Request], httpx.Response]

STATUS = {
    "node_id": "node-a",
    "cluster": "lab",
    "nodes": {"alive": 2, "suspect": 1, "dead": 0, "left": 1, "total": 4},
    "models": {"total": 3, "replicated": 2, "single_node": 1},
    "storage": {"disk": {"total": 1000 * 1024**3, "used": 250 * 1024**3, "free": 750 * 1024**3}},
}
NODES = {
    "nodes": [
        {
            "node_id": "node-a",
            "address": "10.0.0.1:7420",
            "state": "alive",
            "generation": 3,
            "incarnation": 0,
            "last_change_s": 12.5,
            "storage": {"disk": {"total": 2 * 1024**4, "used": 0, "free": 1536 * 1024**3}},
            "gpus": [{"index": 0, "name": "H100", "total_bytes": 80 * 1024**3, "free_bytes": 60 * 1024**3},
                     {"index": 1, "name": "H100", "total_bytes": 80 * 1024**3, "free_bytes": 20 * 1024**3}],
            "gpu_status": {"source": "nvml", "read_ms": 1, "stale": True, "error": "NVML: GPU is lost"},
            "models": ["meta-llama/Llama-3.1-8B-Instruct", "gpt2"],
        },
        {
            "node_id": "node-b",
            "address": "10.0.0.2:7420",
            "state": "suspect",
            "generation": 1,
            "incarnation": 2,
            "last_change_s": 3.0,
            "storage": {"disk": {"total": 100, "used": 50, "free": 50}},
            "gpus": [],
            "models": [],
        },
    ],
    "total_count": 2,
}
MODELS = {
    "models": [
        {
            "model_name": "meta-llama/Llama-3.1-8B-Instruct",
            "model_type": "llm",
            "size": 16 * 1024**3,
            "locations": ["node-a:disk", "node-b:gpu0"],
            "services": [],
            "status": "ready",
        },
        {
            "model_name": "gpt2",
            "model_type": "llm",
            "size": None,
            "locations": [],
            "services": [],
            "status": "registered",
        },
    ],
    "total_count": 2,
}
INFO = {
    "model_name": "meta-llama/Llama-3.1-8B-Instruct",
    "model_type": "llm",
    "source_url": "https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct",
    "metadata": {
        "description": "Llama 3.1 8B instruct",
        "tags": ["chat", "8b"],
        "requirements": {"min_vram": 16 * 1024**3},
    },
    "size": 16 * 1024**3,
    "registered_by": "node-a",
    "locations": [
        {"device": "node-a:disk", "manifest_hash": "ab" * 16, "status": "ready"},
        "node-b:gpu0",
    ],
    "services": [{"node": "node-a", "port": 8000, "device": "node-a:gpu0", "engine": "vllm", "state": "healthy"}],
    "status": "ready",
}
AVAILABILITY = {
    "nodes": {
        "node-a": {
            "node_id": "node-a",
            "address": "10.0.0.1:7420",
            "online": True,
            "models": ["gpt2", "meta-llama/Llama-3.1-8B-Instruct"],
            "pools": [{"pool_id": "pool-gpu0", "gpu": 0, "ready": True, "models": ["gpt2"], "engines": ["vllm"]},
                      {"pool_id": "pool-gpu1", "gpu": 1, "ready": False, "models": [], "engines": []}],
        },
        "node-b": {
            "node_id": "node-b",
            "address": "10.0.0.2:7420",
            "online": False,
            "models": ["gpt2"],
            "pools": [],
        },
    },
    "total_models": 2,
    "replicated_models": ["gpt2"],
    "single_node_models": ["meta-llama/Llama-3.1-8B-Instruct"],
}


def error_response(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


class Wire:
    """What the CLI asked for: the client settings and every request."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.base_url: str | None = None
        self.token: str | None = None
        self.timeout_s: float | None = None

    @property
    def last(self) -> httpx.Request:
        assert self.requests, "the CLI sent no request"
        return self.requests[-1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # the last write's token lives here
    for name in list(os.environ):
        if name.startswith("MESHNODE_"):
            monkeypatch.delenv(name)
    for name in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Callable[[Handler], Wire]:
    """``fake(handler)`` routes the CLI to ``handler`` and returns the ``Wire`` record."""

    def install(handler: Handler) -> Wire:
        wire = Wire()

        def recording(request: httpx.Request) -> httpx.Response:
            request.read()
            wire.requests.append(request)
            return handler(request)

        def make_client(base_url: str, token: str | None, timeout_s: float, *_tls: object) -> ApiClient:
            wire.base_url, wire.token, wire.timeout_s = base_url, token, timeout_s
            return ApiClient(
                base_url,
                token=token,
                timeout_s=timeout_s,
                transport=httpx.MockTransport(recording),
            )

        monkeypatch.setattr(commands, "make_client", make_client)
        return wire

    return install


def routes(table: dict[tuple[str, str], Any]) -> Handler:
    """A handler answering ``(method, raw path)`` from a table, 404 otherwise."""

    def handler(request: httpx.Request) -> httpx.Response:
        key = (request.method, request.url.raw_path.decode().split("?")[0])
        if key not in table:
            return error_response(404, "NOT_FOUND", f"no route {key}")
        return httpx.Response(200, json=table[key])

    return handler


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, starts: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(starts), lines[0]
    assert "Traceback" not in err


# -- each command: the request and the output ----------------------------------


def test_status_summary(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    wire = fake(routes({("GET", "/status"): STATUS}))
    code, out, err = run(capsys, "status", "--token", TOKEN)
    assert code == 0, err
    assert (wire.last.method, wire.last.url.path) == ("GET", "/status")
    assert wire.last.headers["authorization"] == f"Bearer {TOKEN}"
    assert "node-a" in out and "lab" in out
    assert "2 alive" in out and "1 suspect" in out and "4 total" in out
    assert "750.0 GiB free" in out
    assert TOKEN not in out + err
    assert err == ""


def test_status_json_is_the_raw_response(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake(routes({("GET", "/status"): STATUS}))
    code, out, _ = run(capsys, "status", "--json")
    assert code == 0
    assert json.loads(out) == STATUS


def test_nodes_table(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    wire = fake(routes({("GET", "/nodes"): NODES}))
    code, out, _ = run(capsys, "nodes", "--token", TOKEN)
    assert code == 0
    assert (wire.last.method, wire.last.url.path) == ("GET", "/nodes")
    assert wire.last.headers["authorization"] == f"Bearer {TOKEN}"
    for text in ("node-a", "node-b", "10.0.0.1:7420", "alive", "suspect", "1.5 TiB", "50 B",
                 "80.0 GiB of 160.0 GiB (stale)"):
        assert text in out, text
    assert "\x1b[" not in out  # no colour codes when stdout is not a terminal


def test_nodes_json(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake(routes({("GET", "/nodes"): NODES}))
    code, out, _ = run(capsys, "nodes", "--json")
    assert code == 0
    assert json.loads(out)["total_count"] == 2


def test_list_table(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    wire = fake(routes({("GET", "/models"): MODELS}))
    code, out, _ = run(capsys, "list")
    assert code == 0
    assert (wire.last.method, wire.last.url.path) == ("GET", "/models")
    for text in ("meta-llama/Llama-3.1-8B-Instruct", "gpt2", "16.0 GiB", "node-a:disk", "ready"):
        assert text in out, text


def test_an_unknown_model_type_shows_as_a_dash_not_none(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """A model registered by an ingest may have no type: it showed as the text "None"."""
    untyped = {**MODELS["models"][1], "model_type": None}
    fake(routes({("GET", "/models"): {"models": [untyped], "total_count": 1},
                 ("GET", "/models/gpt2"): {**INFO, "model_name": "gpt2", "model_type": None}}))
    for argv in (("list",), ("info", "gpt2")):
        code, out, err = run(capsys, *argv)
        assert code == 0, err
        assert "None" not in out, out


def test_list_json(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake(routes({("GET", "/models"): MODELS}))
    code, out, _ = run(capsys, "list", "--json")
    assert code == 0
    assert json.loads(out) == MODELS


def test_info_routes_a_slashed_name_unencoded(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    wire = fake(routes({("GET", "/models/meta-llama/Llama-3.1-8B-Instruct"): INFO}))
    code, out, err = run(capsys, "info", "meta-llama/Llama-3.1-8B-Instruct", "--token", TOKEN)
    assert code == 0, err
    assert wire.last.method == "GET"
    assert wire.last.url.raw_path == b"/models/meta-llama/Llama-3.1-8B-Instruct"
    assert wire.last.headers["authorization"] == f"Bearer {TOKEN}"
    for text in (
        "meta-llama/Llama-3.1-8B-Instruct",
        "Llama 3.1 8B instruct",
        "chat, 8b",
        "min_vram=16.0 GiB",
        "node-a:disk",
        "node-b:gpu0",
        "node-a:gpu0",
        "8000",
        "healthy",
        "https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct",
    ):
        assert text in out, text


def test_info_quotes_other_characters(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    wire = fake(lambda request: httpx.Response(200, json={"model_name": "a b?c"}))
    code, _, _ = run(capsys, "info", "own er/a b?c#d")
    assert code == 0
    assert wire.last.url.raw_path == b"/models/own%20er/a%20b%3Fc%23d"


def test_info_json(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake(routes({("GET", "/models/gpt2"): {"model_name": "gpt2"}}))
    code, out, _ = run(capsys, "info", "gpt2", "--json")
    assert code == 0
    assert json.loads(out) == {"model_name": "gpt2"}


@pytest.mark.parametrize("name", ["a/b/c", "/abs", "a/..", "owner/"])
def test_info_rejects_impossible_names_before_any_request(
    fake: Any, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    wire = fake(routes({}))
    code, _, err = run(capsys, "info", name)
    assert code == 2
    assert wire.requests == []
    assert_one_error_line(err, "meshnode: error: model name")


def test_register_sends_the_registration(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    wire = fake(
        lambda request: httpx.Response(201, json={"model_name": "meta-llama/Llama-3.1-8B-Instruct"})
    )
    code, out, err = run(
        capsys,
        "register",
        "meta-llama/Llama-3.1-8B-Instruct",
        "--type",
        "llm",
        "--url",
        "https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct",
        "--desc",
        "Llama 3.1 8B",
        "--tags",
        "chat, 8b,",
        "--min-vram",
        "16GiB",
        "--min-memory",
        "32000000000",
        "--gpu-arch",
        "sm_80",
        "--token",
        TOKEN,
    )
    assert code == 0, err
    request = wire.last
    assert request.method == "POST"
    assert request.url.raw_path == b"/models/meta-llama/Llama-3.1-8B-Instruct/register"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {
        "model_type": "llm",
        "source_url": "https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct",
        "metadata": {
            "description": "Llama 3.1 8B",
            "tags": ["chat", "8b"],
            "requirements": {
                "min_vram": 16 * 1024**3,
                "min_memory": 32_000_000_000,
                "gpu_arch": "sm_80",
            },
        },
    }
    assert "registered model 'meta-llama/Llama-3.1-8B-Instruct'" in out


def test_register_several_gpu_archs(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    wire = fake(lambda request: httpx.Response(201, json={"model_name": "m"}))
    code, _, err = run(capsys, "register", "m", "--type", "llm", "--url", "u", "--desc", "d",
                       "--gpu-arch", "sm_80,sm_90")
    assert code == 0, err
    assert json.loads(wire.last.content)["metadata"]["requirements"] == {"gpu_arch": ["sm_80", "sm_90"]}


def test_register_again_says_what_it_replaced(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake(lambda request: httpx.Response(200, json={"model_name": "m", "replaced": True,
                                                   "changed": ["metadata.description"]}))
    code, out, err = run(capsys, "register", "m", "--type", "llm", "--url", "u", "--desc", "d")
    assert code == 0, err
    assert "again, replacing its registration (changed: metadata.description)" in out


def test_register_minimal_body(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    wire = fake(lambda request: httpx.Response(200, json={"ok": True}))
    code, out, _ = run(
        capsys,
        "register",
        "gpt2",
        "--type",
        "llm",
        "--url",
        "https://x/gpt2",
        "--desc",
        "d",
        "--json",
    )
    assert code == 0
    assert json.loads(wire.last.content) == {
        "model_type": "llm",
        "source_url": "https://x/gpt2",
        "metadata": {"description": "d"},
    }
    assert "authorization" not in wire.last.headers
    assert json.loads(out) == {"ok": True}


def test_register_takes_gswarm_s_form_where_only_the_name_is_required(
        fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    wire = fake(lambda request: httpx.Response(201, json={"model_name": "gpt2"}))
    code, _, err = run(capsys, "register", "gpt2")
    assert code == 0, err
    assert json.loads(wire.last.content) == {"metadata": {}}
    code, _, err = run(capsys, "register", "gpt2", "--type", "llm")
    assert code == 0 and json.loads(wire.last.content) == {"model_type": "llm", "metadata": {}}


@pytest.mark.parametrize(
    "argv",
    [
        ["register", "gpt2", "--type", "llm", "--url", "u", "--desc", "d", "--min-vram", "lots"],
        ["info"],  # no NAME
        ["download", "gpt2", "--from", "/models/gpt2"],  # no --to
        ["copy", "gpt2"],  # no --to
        ["move", "gpt2", "--to", "b:disk"],  # no --from
        ["move", "gpt2", "--from", "a:disk"],  # no --to
        ["download", "gpt2", "--to", "b:disk", "--from", "/p", "--url", "file:///p"],
        ["download", "gpt2", "--to", "b:disk", "--wait", "--wait-timeout", "-1"],
        ["copy", "gpt2", "--to", "b:disk", "--wait-timeout", "5"],  # without --wait
        ["download", "gpt2", "--to", "b:disk", "--from", ""],
        ["transfer"],  # no ID
        ["transfer", " "],
        [],  # no command
        ["frobnicate"],
        ["status", "--timeout", "0"],
        ["status", "--token", "a", "--token-file", "b"],
        ["--log-level", "loud", "status"],
    ],
)
def test_bad_usage_exits_2_without_a_request(
    fake: Any, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    wire = fake(routes({}))
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert wire.requests == []
    assert "error" in err and "Traceback" not in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in (
        "start",
        "status",
        "nodes",
        "list",
        "info",
        "register",
        "unregister",
        "availability",
        "download",
        "copy",
        "move",
        "transfers",
        "transfer",
    ):
        assert command in out


def test_unregister(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    wire = fake(lambda request: httpx.Response(204))
    code, out, err = run(capsys, "unregister", "owner/model", "--token", TOKEN)
    assert code == 0, err
    assert wire.last.method == "DELETE"
    assert wire.last.url.raw_path == b"/models/owner/model"
    assert wire.last.url.query == b""
    assert wire.last.headers["authorization"] == f"Bearer {TOKEN}"
    assert "unregistered model 'owner/model'" in out


def test_unregister_purge(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """It says which copies were deleted and which are not yet, not "purged every copy"."""
    answer = {"unregistered": True, "deleted_copies": ["a:disk", "b:disk"],
              "pending_copies": [{"device": "c:dram", "reason": "node 'c' is dead; it deletes its copy when back"}]}
    wire = fake(lambda request: httpx.Response(200, json=answer))
    code, out, _ = run(capsys, "unregister", "gpt2", "--purge")
    assert code == 0
    assert wire.last.method == "DELETE"
    assert wire.last.url.raw_path == b"/models/gpt2?purge=true"
    assert "deleted copies: a:disk, b:disk" in out
    assert "not yet deleted: c:dram: node 'c' is dead" in out
    assert "every copy" not in out


def test_delete_frees_one_device(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    wire = fake(lambda request: httpx.Response(200, json={"model_name": "gpt2", "device": "b:disk",
                                                          "dropped": True, "deleted_copy": True}))
    code, out, err = run(capsys, "delete", "gpt2", "--on", "b:disk")
    assert code == 0, err
    assert wire.last.method == "DELETE"
    assert wire.last.url.raw_path == b"/models/gpt2?device=b%3Adisk"
    assert "deleted the copy on b:disk of 'gpt2'" in out


def test_unregister_json_with_empty_body(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake(lambda request: httpx.Response(204))
    code, out, _ = run(capsys, "unregister", "gpt2", "--json")
    assert code == 0
    assert json.loads(out) == {}


def test_availability(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    wire = fake(routes({("GET", "/v2/catalog/availability"): AVAILABILITY}))
    code, out, _ = run(capsys, "availability", "--token", TOKEN)
    assert code == 0
    assert (wire.last.method, wire.last.url.path) == ("GET", "/v2/catalog/availability")
    assert wire.last.headers["authorization"] == f"Bearer {TOKEN}"
    for text in ("node-a", "node-b", "10.0.0.2:7420", "gpu0 ready (gpt2); gpu1 idle", "yes", "no"):
        assert text in out, text
    assert "pool_id" not in out and "{" not in out  # no raw JSON
    assert "replicated (1): gpt2" in out
    assert "single node (1): meta-llama/Llama-3.1-8B-Instruct" in out


def test_availability_json(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake(routes({("GET", "/v2/catalog/availability"): AVAILABILITY}))
    code, out, _ = run(capsys, "availability", "--json")
    assert code == 0
    assert json.loads(out) == AVAILABILITY


# -- errors --------------------------------------------------------------------


def test_api_error_is_one_line_and_exit_1(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake(lambda request: error_response(404, "MODEL_NOT_FOUND", "model 'x' is not registered"))
    code, out, err = run(capsys, "info", "x", "--token", TOKEN)
    assert code == 1
    assert out == ""
    assert err == "meshnode: error: MODEL_NOT_FOUND: model 'x' is not registered (HTTP 404)\n"
    assert TOKEN not in out + err


def test_api_error_with_json_flag_is_one_json_line(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    fake(lambda request: error_response(409, "CONFLICT", "already\nregistered"))
    code, out, err = run(
        capsys, "register", "m", "--type", "t", "--url", "u", "--desc", "d", "--json"
    )
    assert code == 1
    assert out == "" and err.count("\n") == 1
    assert json.loads(err) == {"error": {"code": "CONFLICT", "message": "CONFLICT: already registered (HTTP 409)",
                                         "exit_code": 1, "status": 409}}
    # Without --json, the same error is one line for people.
    code, out, err = run(capsys, "register", "m", "--type", "t", "--url", "u", "--desc", "d")
    assert (code, err) == (1, "meshnode: error: CONFLICT: already registered (HTTP 409)\n")


def test_json_errors_for_usage_and_an_unreachable_peer(capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run(capsys, "--json", "--peer", "http://127.0.0.1:9", "--timeout", "2", "nodes")
    e = json.loads(err)["error"]
    assert (code, e["code"], e["exit_code"]) == (2, "PEER_UNREACHABLE", 2) and "127.0.0.1:9" in e["message"]
    code, _out, err = run(capsys, "--json", "--key", "k.pem", "nodes")
    assert (code, json.loads(err)["error"]["code"]) == (2, "USAGE")


def test_error_message_never_echoes_the_token(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    fake(lambda request: error_response(403, "FORBIDDEN", f"token {TOKEN} is not accepted"))
    code, out, err = run(capsys, "status", "--token", TOKEN)
    assert code == 1
    assert TOKEN not in out + err
    assert_one_error_line(err, "meshnode: error: FORBIDDEN: token *** is not accepted (HTTP 403)")


def test_a_short_token_is_not_searched_for_inside_words(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--token o` once turned "missing or wrong API token" into "missing ***r wr***ng API t***ken"."""
    fake(lambda request: error_response(401, "UNAUTHORIZED", "missing or wrong API token"))
    code, _, err = run(capsys, "status", "--token", "o")
    assert code == 1
    assert_one_error_line(err, "meshnode: error: UNAUTHORIZED: missing or wrong API token (HTTP 401)")


def test_a_token_no_header_can_carry_is_refused_before_any_request(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    wire = fake(routes({("GET", "/status"): STATUS}))
    code, out, err = run(capsys, "status", "--token", "s3cret value\n")
    assert code == 2 and not wire.requests
    assert "s3cret" not in out + err
    assert_one_error_line(err, "meshnode: error: the API token holds characters")


@pytest.mark.parametrize(
    "argv",
    [
        ("--peer", "http://gpu2:7420", "--token", TOKEN, "--json", "nodes"),
        ("nodes", "--peer", "http://gpu2:7420", "--token", TOKEN, "--json"),
        ("--peer", "http://gpu2:7420", "nodes", "--token", TOKEN, "--json"),
    ],
)
def test_peer_flags_work_before_and_after_the_verb(
    fake: Any, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    """README's `meshnode --peer http://gpu2:7420 nodes` once exited 2."""
    wire = fake(routes({("GET", "/nodes"): NODES}))
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert wire.base_url == "http://gpu2:7420" and wire.token == TOKEN
    assert json.loads(out) == NODES


def test_token_and_token_file_on_either_side_of_the_verb_conflict(
    fake: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    wire = fake(routes({("GET", "/nodes"): NODES}))
    (tmp_path / "t").write_text(TOKEN)
    code, _, err = run(capsys, "--token", TOKEN, "nodes", "--token-file", str(tmp_path / "t"))
    assert code == 2 and not wire.requests
    assert_one_error_line(err, "meshnode: error: argument --token-file: not allowed with argument --token")


def test_unauthorized_without_token_hints_at_the_flag(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    fake(lambda request: error_response(401, "UNAUTHORIZED", "missing bearer token"))
    code, _, err = run(capsys, "status")
    assert code == 1
    assert_one_error_line(err, "meshnode: error: UNAUTHORIZED: missing bearer token")
    assert "--token" in err


def test_error_without_json_body(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake(lambda request: httpx.Response(502, text="<html>\n<h1>Bad Gateway</h1>\n</html>"))
    code, _, err = run(capsys, "list")
    assert code == 1
    assert err == "meshnode: error: HTTP_502: Bad Gateway (HTTP 502)\n"


def test_success_that_is_not_json(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake(lambda request: httpx.Response(200, text="hello"))
    code, _, err = run(capsys, "list")
    assert code == 1
    assert_one_error_line(err, "meshnode: error: peer http://127.0.0.1:7420 sent a response")


@pytest.mark.parametrize("payload", [[], {"nodes": "garbage"}, {"nodes": [None, 3]}, "text"])
def test_odd_shapes_never_give_a_traceback(
    fake: Any, capsys: pytest.CaptureFixture[str], payload: Any
) -> None:
    fake(lambda request: httpx.Response(200, json=payload))
    for command in ("status", "nodes", "list", "availability"):
        code, _, err = run(capsys, command)
        assert code in (0, 1)
        assert "Traceback" not in err


def test_unreachable_peer_exits_2(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    fake(refuse)
    code, out, err = run(capsys, "status", "--peer", "10.0.0.5:7420", "--token", TOKEN)
    assert code == 2
    assert out == ""
    assert (
        err
        == "meshnode: error: cannot reach peer http://10.0.0.5:7420: [Errno 111] Connection refused\n"
    )
    assert TOKEN not in err


def test_connect_timeout_is_unreachable(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    fake(slow)
    code, _, err = run(capsys, "nodes", "--timeout", "2.5")
    assert code == 2
    assert err == (
        "meshnode: error: cannot reach peer http://127.0.0.1:7420: connection timed out after 2.5s\n"
    )


def test_read_timeout_exits_1(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    def stall(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    fake(stall)
    code, _, err = run(capsys, "list")
    assert code == 1
    assert_one_error_line(
        err, "meshnode: error: peer http://127.0.0.1:7420 did not answer GET /models"
    )


# -- peer, token and timeout settings ------------------------------------------


@pytest.mark.parametrize(
    ("peer", "base_url"),
    [
        (None, "http://127.0.0.1:7420"),
        ("10.1.2.3:9000", "http://10.1.2.3:9000"),
        ("node-b", "http://node-b:7420"),
        ("https://mesh.example:443/", "https://mesh.example"),
        ("http://node-c:8080/", "http://node-c:8080"),
        ("[::1]:7421", "http://[::1]:7421"),
    ],
)
def test_peer_address_forms(
    fake: Any, capsys: pytest.CaptureFixture[str], peer: str | None, base_url: str
) -> None:
    wire = fake(routes({("GET", "/status"): STATUS}))
    argv = ["status"] + (["--peer", peer] if peer else [])
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert wire.base_url == base_url
    assert wire.timeout_s == 10.0


def test_settings_from_the_environment(
    fake: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHNODE_PEER", "node-z:7500")
    monkeypatch.setenv("MESHNODE_TOKEN", TOKEN)
    monkeypatch.setenv("MESHNODE_TIMEOUT", "3")
    wire = fake(routes({("GET", "/status"): STATUS}))
    code, _, _ = run(capsys, "status")
    assert code == 0
    assert wire.base_url == "http://node-z:7500"
    assert wire.timeout_s == 3.0
    assert wire.last.headers["authorization"] == f"Bearer {TOKEN}"
    assert wire.last.url.host == "node-z"


def test_flags_beat_the_environment(
    fake: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHNODE_PEER", "node-z:7500")
    monkeypatch.setenv("MESHNODE_TOKEN", "from-env")
    wire = fake(routes({("GET", "/status"): STATUS}))
    code, _, _ = run(capsys, "status", "--peer", "node-y:1", "--token", TOKEN, "--timeout", "1")
    assert code == 0
    assert wire.base_url == "http://node-y:1"
    assert wire.timeout_s == 1.0
    assert wire.last.headers["authorization"] == f"Bearer {TOKEN}"


def test_token_file(fake: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\nolder-token\n")
    wire = fake(routes({("GET", "/nodes"): NODES}))
    code, _, _ = run(capsys, "nodes", "--token-file", str(path))
    assert code == 0
    assert wire.last.headers["authorization"] == f"Bearer {TOKEN}"


def test_missing_token_file_is_a_usage_error(
    fake: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    wire = fake(routes({}))
    code, _, err = run(capsys, "nodes", "--token-file", str(tmp_path / "nope"))
    assert code == 2
    assert wire.requests == []
    assert_one_error_line(err, "meshnode: error: cannot read token file")


@pytest.mark.parametrize("peer", ["ftp://host:1", "http://", "   "])
def test_bad_peer_is_a_usage_error(
    fake: Any, capsys: pytest.CaptureFixture[str], peer: str
) -> None:
    wire = fake(routes({}))
    code, _, err = run(capsys, "status", "--peer", peer, "--token", TOKEN)
    assert code == 2
    assert wire.requests == []
    assert_one_error_line(err, "meshnode: error:")
    assert TOKEN not in err


def test_bad_log_level_env_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHNODE_LOG_LEVEL", "chatty")
    code, _, err = run(capsys, "status")
    assert code == 2
    assert_one_error_line(err, "meshnode: error: MESHNODE_LOG_LEVEL")


def test_log_level_after_the_command(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake(routes({("GET", "/status"): STATUS}))
    code, _, _ = run(capsys, "status", "--log-level", "warning")
    assert code == 0


# -- helpers -------------------------------------------------------------------


def test_model_path() -> None:
    assert model_path("gpt2") == "/models/gpt2"
    assert (
        model_path("meta-llama/Llama-3.1-8B-Instruct") == "/models/meta-llama/Llama-3.1-8B-Instruct"
    )
    assert model_path("a b/c%d") == "/models/a%20b/c%25d"
    for bad in ("", "a/b/c", "/a", "a/", "..", "a/."):
        with pytest.raises(ValueError):
            model_path(bad)


def test_normalize_peer_url() -> None:
    assert normalize_peer_url("127.0.0.1:7420") == "http://127.0.0.1:7420"
    assert normalize_peer_url("localhost") == "http://localhost:7420"
    assert normalize_peer_url("https://h/prefix/") == "https://h/prefix"
    with pytest.raises(ValueError):
        normalize_peer_url("gopher://h")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("17179869184", 17179869184),
        ("16GiB", 16 * 1024**3),
        ("16g", 16 * 1000**3),
        ("1.5 MiB", 1572864),
    ],
)
def test_parse_bytes(text: str, value: int) -> None:
    assert values.parse_bytes(text) == value


def test_human_bytes() -> None:
    assert render.human_bytes(0) == "0 B"
    assert render.human_bytes(1536) == "1.5 KiB"
    assert render.human_bytes(None) == "-"
    assert render.human_bytes(True) == "-"


# -- start ---------------------------------------------------------------------


def test_start_dispatches_to_the_node(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []

    def main_start(args: Any) -> int:
        seen.append(args)
        return 0

    monkeypatch.setitem(sys.modules, "meshnode.daemon", types.SimpleNamespace(main_start=main_start))
    code, _, _ = run(capsys, "start", "--log-level", "ERROR")
    assert code == 0
    assert len(seen) == 1 and seen[0].command == "start"


def test_start_has_the_config_flags() -> None:
    config = pytest.importorskip("meshnode.config")
    assert hasattr(config, "add_start_arguments")
    args = cli.build_parser().parse_args(["start", "--node-id", "n1", "--port", "0"])
    assert args.node_id == "n1"
    assert args.port == 0


# -- the real thing, once ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_python_dash_m_against_a_closed_port() -> None:
    """``python -m meshnode`` over a real socket: one line, exit 2, no token."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHNODE_")}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["MESHNODE_TOKEN"] = TOKEN
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshnode",
            "status",
            "--peer",
            f"127.0.0.1:{port}",
            "--timeout",
            "5",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert_one_error_line(
        proc.stderr, f"meshnode: error: cannot reach peer http://127.0.0.1:{port}: "
    )
    assert TOKEN not in proc.stderr


def test_closed_stdout_is_quiet(
    fake: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``meshnode list --json | head -1``: no traceback when the reader leaves."""

    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    fake(routes({("GET", "/models"): MODELS}))
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code = cli.main(["list", "--json"])
    monkeypatch.undo()
    assert code == 1
    assert "Traceback" not in capsys.readouterr().err


# -- copies and transfers --------------------------------------------------------

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TID = "0123456789abcdef"


def transfer(status: str = "queued", **changes: Any) -> dict[str, Any]:
    t: dict[str, Any] = {
        "transfer_id": TID,
        "node_id": "node-b",
        "target_device": "node-b:disk",
        "model": MODEL,
        "status": status,
        "bytes_total": 4 * 1024**3,
        "bytes_done": 0,
        "rate_bps": 0.0,
        "sources": [],
        "banned": [],
        "chunks_total": 64,
        "chunks_fetched": 0,
        "chunks_resumed": 0,
        "bad_chunks": 0,
        "error": None,
        "note": "",
        "started_ms": 1_700_000_000_000,
        "finished_ms": 0,
    }
    t.update(changes)
    return t


RUNNING = transfer(
    "running",
    bytes_done=1024**3,
    rate_bps=100 * 1024**2,
    sources=["node-a", "node-c"],
    chunks_fetched=16,
)
DONE = transfer(
    "done",
    bytes_done=4 * 1024**3,
    sources=["node-a", "node-c"],
    chunks_fetched=60,
    chunks_resumed=4,
    finished_ms=1_700_000_042_000,
)
FAILED = transfer(
    "failed",
    error={"code": "NO_SOURCE", "message": "no live node holds manifest ab12"},
    finished_ms=1_700_000_003_000,
)


class FakeTime:
    """Replaces ``cli.waiting._sleep`` and ``_monotonic``: sleeping moves the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.interrupt_after: int | None = None

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.interrupt_after is not None and len(self.sleeps) > self.interrupt_after:
            raise KeyboardInterrupt
        self.now += seconds

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake_time = FakeTime()
    monkeypatch.setattr(waiting, "_sleep", fake_time.sleep)
    monkeypatch.setattr(waiting, "_monotonic", fake_time.monotonic)
    return fake_time


def transfer_peer(
    posted: dict[str, Any], polls: list[Any], *, not_found: str = "TRANSFER_NOT_FOUND"
) -> Handler:
    """POST answers 202 with ``posted``; each GET /transfers/{id} answers the next
    of ``polls`` (``404`` -> an error with code ``not_found``), the last one repeating."""
    answers = list(polls)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json=posted)
        if request.method == "GET" and request.url.raw_path == f"/transfers/{TID}".encode():
            answer = answers.pop(0) if len(answers) > 1 else answers[0]
            if answer == 404:
                return error_response(404, not_found, f"no transfer {TID!r} is known")
            return httpx.Response(200, json=answer)
        return error_response(404, "NOT_FOUND", "no route")

    return handler


def posts(wire: Wire) -> list[httpx.Request]:
    return [r for r in wire.requests if r.method == "POST"]


def polls(wire: Wire) -> list[httpx.Request]:
    return [r for r in wire.requests if r.method == "GET"]


def test_download_from_an_absolute_path(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    wire = fake(transfer_peer(transfer(), [RUNNING]))
    code, out, err = run(
        capsys,
        "download",
        MODEL,
        "--to",
        "node-b:disk",
        "--from",
        "/srv/models/llama",
        "--token",
        TOKEN,
    )
    assert code == 0, err
    assert wire.last.method == "POST"
    assert wire.last.url.raw_path == f"/models/{MODEL}/download".encode()
    assert wire.last.headers["authorization"] == f"Bearer {TOKEN}"
    assert json.loads(wire.last.content) == {
        "source": "web",
        "source_url": "file:///srv/models/llama",
        "target_device": "node-b:disk",
    }
    assert len(wire.requests) == 1  # no --wait: no polling
    assert f"transfer {TID} queued" in out
    assert f"meshnode transfer {TID}" in out
    assert err == ""


def test_download_makes_a_relative_path_absolute(
    fake: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    wire = fake(transfer_peer(transfer(), [RUNNING]))
    code, _, err = run(capsys, "download", "gpt2", "--to", "node-b:dram", "--from", "weights/gpt 2")
    assert code == 0, err
    body = json.loads(wire.last.content)
    assert body["source_url"] == (tmp_path / "weights" / "gpt 2").as_uri()
    assert body["source_url"].startswith("file:///")
    assert body["source_url"].endswith("/weights/gpt%202")


def test_download_from_a_url_and_from_a_node(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    wire = fake(transfer_peer(transfer(), [RUNNING]))
    code, _, _ = run(capsys, "download", "gpt2", "--to", "node-b:disk", "--url", "https://x/gpt2")
    assert code == 0
    assert json.loads(wire.last.content) == {
        "source": "web",
        "source_url": "https://x/gpt2",
        "target_device": "node-b:disk",
    }
    code, _, _ = run(capsys, "download", "gpt2", "--to", "node-b:disk", "--source", "node-a:disk")
    assert code == 0
    assert json.loads(wire.last.content) == {
        "source": "node-a:disk",
        "target_device": "node-b:disk",
    }
    # Neither: the server falls back to the URL the model was registered with.
    code, _, _ = run(capsys, "download", "gpt2", "--to", "node-b:disk")
    assert code == 0
    assert json.loads(wire.last.content) == {"source": "web", "target_device": "node-b:disk"}


def test_copy_and_move_requests(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    wire = fake(transfer_peer(transfer(), [RUNNING]))
    code, out, err = run(capsys, "copy", MODEL, "--to", "node-b:disk")
    assert code == 0, err
    assert wire.last.method == "POST"
    assert wire.last.url.raw_path == f"/models/{MODEL}/copy".encode()
    assert json.loads(wire.last.content) == {"to_device": "node-b:disk"}
    assert f"transfer {TID} queued: {MODEL} -> node-b:disk" in out

    code, _, _ = run(capsys, "copy", MODEL, "--from", "node-a:dram", "--to", "node-b:disk")
    assert code == 0
    assert json.loads(wire.last.content) == {
        "from_device": "node-a:dram",
        "to_device": "node-b:disk",
    }

    code, _, _ = run(capsys, "move", "gpt2", "--from", "node-a:disk", "--to", "node-b:disk")
    assert code == 0
    assert wire.last.url.raw_path == b"/models/gpt2/move"
    assert json.loads(wire.last.content) == {
        "from_device": "node-a:disk",
        "to_device": "node-b:disk",
    }


def test_copy_json_without_wait_is_the_raw_answer(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    fake(transfer_peer(transfer(), [RUNNING]))
    code, out, _ = run(capsys, "copy", "gpt2", "--to", "node-b:disk", "--json")
    assert code == 0
    assert json.loads(out) == transfer()


def test_quiet_prints_the_transfer_id_alone(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """README: ``id=$(meshnode copy gpt2 --to gpu1:dram --quiet)`` then ``meshnode transfer "$id"``."""
    fake(transfer_peer(transfer(), [RUNNING]))
    for cmd in (["copy", "gpt2", "--to", "node-b:disk"], ["move", "gpt2", "--from", "a:disk", "--to", "b:disk"],
                ["download", "gpt2", "--to", "b:disk", "--source", "a:disk"]):
        code, out, err = run(capsys, *cmd, "-q")
        assert (code, out, err) == (0, f"{TID}\n", "")
    for extra in ("--wait", "--json"):
        code, out, err = run(capsys, "copy", "gpt2", "--to", "node-b:disk", "--quiet", extra)
        assert code == 2 and out == "" and "--quiet prints the transfer id alone" in err


def test_bad_device_is_left_to_the_server(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    wire = fake(lambda request: error_response(400, "INVALID_DEVICE", "to_device: not a device"))
    code, out, err = run(capsys, "copy", "gpt2", "--to", "nonsense", "--wait")
    assert code == 1
    assert out == ""
    assert len(wire.requests) == 1
    assert err == "meshnode: error: INVALID_DEVICE: to_device: not a device (HTTP 400)\n"


def test_wait_polls_until_done(
    fake: Any, capsys: pytest.CaptureFixture[str], clock: FakeTime
) -> None:
    wire = fake(transfer_peer(transfer(), [transfer("queued"), RUNNING, RUNNING, DONE]))
    code, out, err = run(capsys, "copy", MODEL, "--to", "node-b:disk", "--wait", "--peer", "node-a")
    assert code == 0, err
    assert len(posts(wire)) == 1
    assert len(polls(wire)) == 4
    assert all(r.url.raw_path == f"/transfers/{TID}".encode() for r in polls(wire))
    assert all(r.url.host == "node-a" for r in wire.requests)  # the same peer throughout
    assert clock.sleeps == [waiting.POLL_INTERVAL_S] * 4
    assert (
        f"transfer {TID} done: {MODEL} -> node-b:disk (4.0 GiB in 42s; from node-a, node-c" in out
    )
    assert "60 chunks fetched, 4 resumed" in out
    assert err == ""  # no bar when stderr is not a terminal


def test_wait_on_an_answer_that_is_already_final(
    fake: Any, capsys: pytest.CaptureFixture[str], clock: FakeTime
) -> None:
    wire = fake(transfer_peer(DONE, [DONE]))
    code, out, _ = run(capsys, "download", "gpt2", "--to", "node-b:disk", "--from", "/p", "--wait")
    assert code == 0
    assert polls(wire) == []
    assert "done" in out


def test_wait_failed_exits_1_with_one_line(
    fake: Any, capsys: pytest.CaptureFixture[str], clock: FakeTime
) -> None:
    fake(transfer_peer(transfer(), [RUNNING, FAILED]))
    code, out, err = run(capsys, "copy", MODEL, "--to", "node-b:disk", "--wait", "--token", TOKEN)
    assert code == 1
    assert out == ""
    assert_one_error_line(err, "meshnode: error: NO_SOURCE: no live node holds manifest ab12")
    assert TID in err


def test_json_wait_prints_one_object_per_poll(
    fake: Any, capsys: pytest.CaptureFixture[str], clock: FakeTime
) -> None:
    fake(transfer_peer(transfer(), [RUNNING, DONE]))
    code, out, err = run(
        capsys, "move", "gpt2", "--from", "a:disk", "--to", "node-b:disk", "--json", "--wait"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert [json.loads(line) for line in lines] == [transfer(), RUNNING, DONE]
    assert err == ""


def test_json_wait_failed(fake: Any, capsys: pytest.CaptureFixture[str], clock: FakeTime) -> None:
    fake(transfer_peer(transfer(), [FAILED]))
    code, out, err = run(capsys, "copy", "gpt2", "--to", "node-b:disk", "--json", "--wait")
    assert code == 1
    assert json.loads(out.splitlines()[-1])["status"] == "failed"
    e = json.loads(err)["error"]
    assert e["code"] == "NO_SOURCE" and e["message"].startswith("NO_SOURCE:") and e["transfer_id"]


def test_wait_tolerates_404_right_after_the_post(
    fake: Any, capsys: pytest.CaptureFixture[str], clock: FakeTime
) -> None:
    wire = fake(transfer_peer(transfer(), [404, 404, 404, RUNNING, DONE]))
    code, out, err = run(capsys, "copy", "gpt2", "--to", "node-b:disk", "--wait", "--json")
    assert code == 0, err
    assert len(polls(wire)) == 5
    assert [json.loads(line)["status"] for line in out.splitlines()] == [
        "queued",
        "running",
        "done",
    ]


def test_wait_gives_up_on_404_after_the_grace(
    fake: Any, capsys: pytest.CaptureFixture[str], clock: FakeTime
) -> None:
    wire = fake(transfer_peer(transfer(), [404]))
    code, _, err = run(capsys, "copy", "gpt2", "--to", "node-b:disk", "--wait")
    assert code == 1
    assert_one_error_line(err, "meshnode: error: TRANSFER_NOT_FOUND:")
    assert f"meshnode transfer {TID}" in err
    assert len(polls(wire)) == int(waiting.NOT_FOUND_GRACE_S / waiting.POLL_INTERVAL_S)


def test_wait_does_not_tolerate_other_404s(
    fake: Any, capsys: pytest.CaptureFixture[str], clock: FakeTime
) -> None:
    wire = fake(transfer_peer(transfer(), [404], not_found="NOT_FOUND"))
    code, _, err = run(capsys, "copy", "gpt2", "--to", "node-b:disk", "--wait")
    assert code == 1
    assert len(polls(wire)) == 1
    assert_one_error_line(err, "meshnode: error: NOT_FOUND:")


def test_wait_timeout(fake: Any, capsys: pytest.CaptureFixture[str], clock: FakeTime) -> None:
    wire = fake(transfer_peer(transfer(), [RUNNING]))
    code, out, err = run(
        capsys, "copy", "gpt2", "--to", "node-b:disk", "--wait", "--wait-timeout", "2"
    )
    assert code == 1
    assert out == ""
    assert_one_error_line(
        err, f"meshnode: error: transfer {TID} still running after --wait-timeout 2s"
    )
    assert f"meshnode transfer {TID}" in err
    assert len(polls(wire)) == 4
    assert sum(clock.sleeps) == pytest.approx(2.0)


def test_ctrl_c_while_waiting(
    fake: Any, capsys: pytest.CaptureFixture[str], clock: FakeTime
) -> None:
    fake(transfer_peer(transfer(), [RUNNING]))
    clock.interrupt_after = 2
    code, _, err = run(
        capsys, "copy", "gpt2", "--to", "node-b:disk", "--wait", "--peer", "node-a:7420"
    )
    assert code == 130
    assert "stopped waiting" in err
    assert "continues on node node-b" in err
    assert f"meshnode transfer {TID} --peer node-a:7420" in err
    assert "Traceback" not in err


def test_peer_lost_while_waiting(
    fake: Any, capsys: pytest.CaptureFixture[str], clock: FakeTime
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json=transfer())
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    fake(handler)
    code, _, err = run(capsys, "copy", "gpt2", "--to", "node-b:disk", "--wait")
    assert code == 2
    assert_one_error_line(err, "meshnode: error: cannot reach peer")
    assert f"meshnode transfer {TID}" in err


def test_wait_on_an_answer_without_transfer_id(
    fake: Any, capsys: pytest.CaptureFixture[str], clock: FakeTime
) -> None:
    fake(lambda request: httpx.Response(202, json={"ok": True}))
    code, _, err = run(capsys, "copy", "gpt2", "--to", "node-b:disk", "--wait")
    assert code == 1
    assert_one_error_line(err, "meshnode: error: the peer's answer to copy names no transfer_id")


def test_wait_shows_a_bar_on_a_terminal(
    fake: Any, capsys: pytest.CaptureFixture[str], clock: FakeTime, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from rich.console import Console

    screen = io.StringIO()
    monkeypatch.setattr(
        waiting, "stderr_console", lambda: Console(file=screen, force_terminal=True, width=200)
    )
    fake(transfer_peer(transfer(), [RUNNING, DONE]))
    code, out, _ = run(capsys, "copy", MODEL, "--to", "node-b:disk", "--wait")
    assert code == 0
    assert "done" in out
    drawn = screen.getvalue()
    assert f"{MODEL} -> node-b:disk" in drawn


def test_transfers_table(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    listing = {"transfers": [RUNNING, FAILED, {"transfer_id": "odd"}], "total_count": 3}
    wire = fake(routes({("GET", "/transfers"): listing}))
    code, out, err = run(capsys, "transfers", "--token", TOKEN)
    assert code == 0, err
    assert (wire.last.method, wire.last.url.path) == ("GET", "/transfers")
    assert wire.last.headers["authorization"] == f"Bearer {TOKEN}"
    for text in (
        TID,
        MODEL,
        "node-b:disk",
        "running",
        "25%",
        "100.0 MiB/s",
        "node-a, node-c",
        "failed",
        "odd",
    ):
        assert text in out, text


def test_transfers_json(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    listing = {"transfers": [RUNNING], "total_count": 1}
    fake(routes({("GET", "/transfers"): listing}))
    code, out, _ = run(capsys, "transfers", "--json")
    assert code == 0
    assert json.loads(out) == listing


def test_transfer_detail(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    wire = fake(routes({("GET", f"/transfers/{TID}"): RUNNING}))
    code, out, err = run(capsys, "transfer", TID)
    assert code == 0, err
    assert wire.last.url.raw_path == f"/transfers/{TID}".encode()
    for text in (
        TID,
        MODEL,
        "running",
        "1.0 GiB of 4.0 GiB (25%)",
        "100.0 MiB/s",
        "eta",
        "31s",
        "node-a, node-c",
    ):
        assert text in out, text


def test_transfer_detail_failed_and_not_found(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    fake(routes({("GET", f"/transfers/{TID}"): FAILED}))
    code, out, _ = run(capsys, "transfer", TID)
    assert code == 0
    assert "NO_SOURCE: no live node holds manifest ab12" in out
    code, out, err = run(capsys, "transfer", "nope/../x")
    assert code == 1
    assert out == ""
    assert_one_error_line(err, "meshnode: error: NOT_FOUND")


def test_transfer_id_is_one_quoted_segment(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    wire = fake(routes({}))
    run(capsys, "transfer", "a/b c")
    assert wire.last.url.raw_path == b"/transfers/a%2Fb%20c"


def test_info_shows_copies(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    info = {
        "model_name": "gpt2",
        "locations": ["node-a:disk", "node-b:dram", "node-c:disk"],
        "copies": [
            {
                "device": "node-a:disk",
                "manifest_hash": "0123456789abcdef" * 2,
                "size": 548 * 1024**2,
                "status": "ready",
                "online": True,
            },
            {
                "device": "node-b:dram",
                "manifest_hash": "fedcba9876543210" * 2,
                "size": 548 * 1024**2,
                "status": "ready",
                "online": False,
            },
        ],
        "status": "available",
    }
    fake(routes({("GET", "/models/gpt2"): info}))
    code, out, err = run(capsys, "info", "gpt2")
    assert code == 0, err
    assert "copies (3)" in out
    assert "0123456789ab " in out and "0123456789abc" not in out  # short hash
    assert "548.0 MiB" in out
    assert "yes" in out and "no" in out
    assert "node-c:disk" in out and "recorded" in out


@pytest.mark.parametrize(
    "payload", [[], {"transfers": "garbage"}, {"transfers": [None, 3]}, "text"]
)
def test_transfer_odd_shapes_never_give_a_traceback(
    fake: Any, capsys: pytest.CaptureFixture[str], payload: Any
) -> None:
    fake(lambda request: httpx.Response(200, json=payload))
    for argv in (["transfers"], ["transfer", TID], ["copy", "m", "--to", "b:disk"]):
        code, _, err = run(capsys, *argv)
        assert code in (0, 1)
        assert "Traceback" not in err


def test_download_passes_revision_and_patterns(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(202, json={"transfer_id": "t1", "status": "queued", "model": "o/m", "target_device": "n1:disk"})

    monkeypatch.setattr(commands, "make_client", lambda base, token, timeout, *_tls: ApiClient(base, token=token, timeout_s=timeout, transport=httpx.MockTransport(handler)))
    rc = cli.main(["download", "o/m", "--to", "n1:disk", "--revision", "v2", "--include", "*.json", "--include", "*.safetensors", "--exclude", "*.bin"])
    assert rc == 0
    assert seen == [{"source": "web", "target_device": "n1:disk", "revision": "v2",
                     "allow_patterns": ["*.json", "*.safetensors"], "ignore_patterns": ["*.bin"]}]


def test_transfer_shows_files_and_note(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"transfer_id": "t9", "model": "o/m", "target_device": "n1:disk", "status": "running",
             "bytes_done": 10, "bytes_total": 100, "rate_bps": 5, "files_done": 2, "files_total": 6,
             "note": "fetching from the source", "sources": []}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=state)

    monkeypatch.setattr(commands, "make_client", lambda base, token, timeout, *_tls: ApiClient(base, token=token, timeout_s=timeout, transport=httpx.MockTransport(handler)))
    assert cli.main(["transfer", "t9"]) == 0
    out = capsys.readouterr().out
    assert "2 of 6" in out and "fetching from the source" in out


@pytest.mark.parametrize(
    ("text", "value"),
    [("500M", 500e6), ("1.5G/s", 1.5e9), ("800MiB", 800 * 2**20), ("500MB", 500e6), ("", 0.0), (None, 0.0)],
)
def test_rates_share_the_size_units(text: str | None, value: float) -> None:
    from meshnode.config import parse_rate

    assert parse_rate(text, "--max-egress") == value


@pytest.mark.parametrize("text", ["fast", "-1M", "5X", "M"])
def test_bad_rates_say_which_flag(text: str) -> None:
    from meshnode.config import ConfigError, parse_rate

    with pytest.raises(ConfigError, match="--max-ingress"):
        parse_rate(text, "--max-ingress")


def test_the_next_command_carries_the_last_writes_token(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Register through one peer, then copy through another at once: the
    copy's request carries the register's token, so the second peer answers
    only once it has seen the registration (read your writes)."""
    token = "node-a:17:42"

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.endswith("/register"):
            return httpx.Response(201, json={"model_name": "m", "mesh_token": token}, headers={"X-Mesh-Token": token})
        return httpx.Response(202, json={"transfer_id": "t1", "status": "queued", "node_id": "node-b"})

    wire = fake(handler)
    assert run(capsys, "register", "m", "--type", "llm", "--url", "u", "--desc", "d", "--peer", "node-a")[0] == 0
    assert "x-mesh-after" not in wire.requests[0].headers
    assert run(capsys, "copy", "m", "--to", "node-b:disk", "--peer", "node-b")[0] == 0
    assert wire.requests[1].headers["x-mesh-after"] == token


def test_job_example_and_example_output_need_no_peer(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """gswarm's pipelines ship with the package: printed, or written as files."""
    import yaml

    from protocol.pipeline import parse_pipeline

    code, out, err = run(capsys, "job", "example")
    assert code == 0 and parse_pipeline(yaml.safe_load(out)).name == "llama-deployment-pipeline", err
    for name in ("multi-model", "distributed-70b", "migration"):
        code, out, _ = run(capsys, "job", "example", name)
        assert code == 0 and parse_pipeline(yaml.safe_load(out)).actions
    code, _, err = run(capsys, "job", "example", "nope")
    assert code == 2 and "no example 'nope'" in err
    code, out, _ = run(capsys, "example", "--output", str(tmp_path / "ex"))
    assert code == 0 and len(out.split()) == 4 and (tmp_path / "ex" / "migration.yaml").is_file()
    code, _, err = run(capsys, "example", "--output", str(tmp_path / "ex"))
    assert code == 2 and "--force" in err
    assert run(capsys, "example", "--output", str(tmp_path / "ex"), "--force")[0] == 0
    code, _, err = run(capsys, "job", "cancel", "x", "--wait")
    assert code == 2 and "--wait follows a job you run" in err


def test_lists_are_read_page_by_page() -> None:
    """A node pages its lists (limit, offset); the client reads every page."""
    names = [f"m{i:03d}" for i in range(7)]
    asked: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        limit = min(int(request.url.params["limit"]), 3)  # a node whose pages hold 3
        offset = int(request.url.params["offset"])
        asked.append((request.url.params["limit"], request.url.params["offset"]))
        page = [{"model_name": n} for n in names[offset:offset + limit]]
        return httpx.Response(200, json={"models": page, "total_count": len(names), "limit": limit, "offset": offset})

    api = ApiClient("http://node", transport=httpx.MockTransport(handler))
    got = api.list_models()
    assert [m["model_name"] for m in got["models"]] == names and got["total_count"] == 7
    assert "limit" not in got and asked == [("1000", "0"), ("1000", "3"), ("1000", "6")]


def test_the_readme_completion_line_completes_commands_and_flags() -> None:
    """README's ``eval "$(register-python-argcomplete meshnode)"``, run as
    written in bash, then bash asking for completions as at a TAB."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (line,) = re.findall(r"^eval \"\$\(register-python-argcomplete meshnode\)\"$", readme, re.M)
    script = line + "\n" + "\n".join(
        f'COMP_LINE="{cmd}"; COMP_POINT=${{#COMP_LINE}}; COMP_WORDS=({cmd}); COMP_CWORD={cmd.count(" ")}; '
        f'_python_argcomplete meshnode; echo "${{COMPREPLY[*]}}"'
        for cmd in ("meshnode sta", "meshnode copy gpt2 --t", "meshnode job"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    first, second, third = r.stdout.splitlines()
    assert first.split() == ["start", "status"]
    assert "--to" in second.split() and "--token" in second.split()
    assert {"job", "jobs"} <= set(third.split()) and all(w.startswith("job") for w in third.split())


def _top_peer(fail_after: int | None = None) -> Handler:
    """A peer for ``top``: a node, a running and a done transfer, a job; the
    status route fails from its ``fail_after``-th call on."""
    calls = {"status": 0}
    table = {
        ("GET", "/nodes"): {"nodes": [{"node_id": "gpu1", "address": "gpu1:7420", "state": "alive", "gpus": [],
                                       "storage": {}, "models": []}], "total_count": 1},
        ("GET", "/transfers"): {"transfers": [
            {"transfer_id": "t-done", "model": "gpt2", "target_device": "gpu1:disk", "status": "done",
             "bytes_done": 10, "bytes_total": 10},
            {"transfer_id": "t-run", "model": "gpt2", "target_device": "gpu2:dram", "status": "running",
             "bytes_done": 5, "bytes_total": 10}], "total_count": 2},
        ("GET", "/jobs"): {"jobs": [{"job_id": "j1", "name": "stage", "status": "running", "actions": []}],
                           "total_count": 1},
        ("GET", "/services"): {"services": [], "total_count": 0},
    }
    inner = routes(table)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/status":
            calls["status"] += 1
            if fail_after is not None and calls["status"] > fail_after:
                return error_response(503, "STARTING", "the node is still starting")
            return httpx.Response(200, json={"node_id": "gpu1", "cluster": "prod", "nodes": {"alive": 1, "total": 1}})
        return inner(request)

    return handler


def test_top_draws_frames_until_its_count(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    wire = fake(_top_peer())
    code, out, err = run(capsys, "top", "--count", "2", "--interval", "0.01")
    assert code == 0, err
    assert out.count("nodes (1)") == 2 and out.count("jobs (1)") == 2
    assert out.index("t-run") < out.index("t-done")  # the active transfer first
    assert sum(r.url.path == "/status" for r in wire.requests) == 2
    code, out, err = run(capsys, "top", "--count", "1", "--json")
    frame = json.loads(out)
    assert set(frame) == {"status", "nodes", "transfers", "jobs", "services"} and code == 0


def test_top_shows_a_failure_and_goes_on_but_fails_at_once_on_the_first(fake: Any,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    fake(_top_peer(fail_after=1))
    code, out, err = run(capsys, "top", "--count", "3", "--interval", "0.01")
    assert code == 0, err
    assert out.count("nodes (1)") == 1 and out.count("STARTING: the node is still starting") == 2
    fake(_top_peer(fail_after=0))
    code, out, err = run(capsys, "top", "--count", "3")
    assert code == 1 and out == ""
    assert_one_error_line(err, "meshnode: error: STARTING")
    code, out, err = run(capsys, "top", "--count", "0")
    assert code == 2 and "must be 1 or more" in err


def test_placement_prints_sizes_a_person_reads(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake(routes({("GET", "/placement"): {
        "model_name": "org/m", "device": "disk", "chosen": None, "needs_bytes": 25165953,
        "ranking": [{"node_id": "a", "fits": False, "holds_model": False, "room_bytes": -7340161,
                     "reasons": ["needs 24.0 MiB on disk; has 17.0 MiB free"]},
                    {"node_id": "b", "fits": True, "holds_model": True, "room_bytes": 3 * 2**30, "reasons": []}]}}))
    code, out, _ = run(capsys, "placement", "org/m")
    assert code == 0
    assert "needs 24.0 MiB" in out and "short by 7.0 MiB" in out and "3.0 GiB" in out
    assert "25165953" not in out and "-7340161" not in out


def test_one_pipeline_problem_is_one_problem(fake: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"error": {"code": "INVALID_PIPELINE", "message": "bad", "problems": [
            {"action_id": "s", "field": "devices", "message": "no such GPU"}]}})

    fake(handler)
    doc = tmp_path / "p.yaml"
    doc.write_text("name: x\nactions: []\n")
    code, _, err = run(capsys, "job", str(doc))
    assert code != 0 and "1 problem: [s] devices: no such GPU" in err


def test_ctrl_c_in_job_wait_says_how_to_follow_the_job(fake: Any, capsys: pytest.CaptureFixture[str],
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from meshnode.cli import jobs as cli_jobs

    running = {"job_id": "j-123", "status": "running", "actions": [{"action_id": "s", "status": "running"}]}
    fake(routes({("POST", "/jobs/from-yaml"): running, ("GET", "/jobs/j-123"): running}))

    def interrupted(_s: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_jobs, "_sleep", interrupted)
    doc = tmp_path / "p.yaml"
    doc.write_text("name: x\nactions: []\n")
    code, _, err = run(capsys, "job", str(doc), "--wait")
    assert code == 130
    assert "job j-123 goes on" in err and "meshnode job-status j-123" in err


def test_serve_takes_a_health_path(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    wire = fake(lambda request: httpx.Response(202, json={"model_name": "m", "device": "n:gpu0", "port": 8000,
                                                          "state": "starting", "engine": "command"}))
    code, _, err = run(capsys, "serve", "m", "--on", "n:gpu0", "--engine", "command", "--command", "srv {port}",
                       "--health-path", "/v1/models")
    assert code == 0, err
    assert json.loads(wire.last.content)["config"] == {"engine": "command", "command": ["srv", "{port}"],
                                                       "health_path": "/v1/models"}
