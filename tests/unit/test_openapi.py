"""The API's description (``meshnode.api.schemas``): one entry for every
public route of the app and none for a route it lacks; a valid OpenAPI 3.1
document whose every schema is valid JSON Schema (draft 2020-12); request
schemas that take every body the handlers take (hand-written bodies from the
integration tests and README, and, by hypothesis, whatever the protocol's own
parsers accept) and refuse some that no handler takes."""

from __future__ import annotations

import copy
import json
import re
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from meshnode.api import schemas
from meshnode.api.app import _public_app
from meshnode.api.requests import gpu_devices as _gpu_devices
from meshnode.api.schemas import ERROR, ERROR_CODE, ROUTE_DOCS, TAGS, openapi_document
from meshnode.api.validate import Validator, body_problem, ecma_pattern
from meshnode.errors import STATUS, MeshError
from meshnode.jobs import JOB_ID
from protocol.actions import TIERS
from protocol.errors import InvalidName, LocalProtocolError
from protocol.healthcheck import parse_target
from protocol.names import (
    DEVICE_KIND_PATTERN,
    NODE_ID_MAX,
    parse_device,
    validate_model_name,
    validate_node_id,
)
from protocol.pipeline import InvalidPipeline, parse_pipeline, parse_step_device
from protocol.registry import InvalidInput, parse_policy, parse_registration
from protocol.replicas import parse_labels
from protocol.serving import ENGINES, ServeError, validate_config
from protocol.sources import classify

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)
# Not the public API: the peer routes, and the dashboard's own files (its pages, / and /docs, are).
UNDESCRIBED = ("/mesh/", "/ui/")
DOC = openapi_document("0.1.0")


def app_routes() -> set[tuple[str, str]]:
    app = _public_app(types.SimpleNamespace())  # type: ignore[arg-type]
    return {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static" and not rule.rule.startswith(UNDESCRIBED)
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }


def body_schema(method: str, rule: str) -> Any:
    """The validator the node checks that route's body with (``$`` the end of the string, as JSON Schema reads it)."""
    doc = ROUTE_DOCS[(method, rule)]
    assert doc.request is not None, (method, rule)
    return Validator(doc.request)


def schemas_in(node: Any) -> Iterator[dict[str, Any]]:
    """Every schema of an OpenAPI document: parameters', bodies' and answers'."""
    if isinstance(node, dict):
        if isinstance(node.get("schema"), dict):
            yield node["schema"]
        for v in node.values():
            yield from schemas_in(v)
    elif isinstance(node, list):
        for v in node:
            yield from schemas_in(v)


# -- the routes -----------------------------------------------------------------------------


def test_every_public_route_is_described_and_nothing_else() -> None:
    routes = app_routes()
    assert routes - set(ROUTE_DOCS) == set(), "routes of the app with no ROUTE_DOCS entry"
    assert set(ROUTE_DOCS) - routes == set(), "ROUTE_DOCS entries that name no route of the app"


@pytest.mark.parametrize(("method", "rule"), sorted(ROUTE_DOCS))
def test_each_description_is_whole(method: str, rule: str) -> None:
    doc = ROUTE_DOCS[(method, rule)]
    assert doc.summary and "\n" not in doc.summary and len(doc.summary) <= 160
    assert doc.tag in TAGS
    assert any(200 <= s < 300 for s in doc.responses), "it says what a success answers"
    assert all(s in (200, 201, 202) or doc.responses[s] is ERROR for s in doc.responses)
    if method != "POST":
        assert doc.request is None, "only a POST takes a body"
    if doc.request is not None and doc.content_type == "application/json":
        Draft202012Validator.check_schema(doc.request)
    assert set(doc.required_query) <= set(doc.query)


def test_the_open_routes_are_the_apps() -> None:
    from meshnode.api.app import OPEN_PATHS

    assert {rule for (_, rule), d in ROUTE_DOCS.items() if d.open} == set(OPEN_PATHS)


def test_lists_page() -> None:
    for (_, rule), doc in ROUTE_DOCS.items():
        answer = doc.responses.get(200, {})
        if "total_count" in answer.get("properties", {}):
            assert set(doc.query) >= {"limit", "offset"}, rule
            assert {"total_count", "limit", "offset"} <= set(answer["required"]), rule


# -- the document ---------------------------------------------------------------------------


def test_the_document_is_json_and_every_schema_in_it_is_valid() -> None:
    assert json.loads(json.dumps(DOC)) == DOC
    assert DOC["openapi"] == "3.1.0" and DOC["info"]["version"] == "0.1.0"
    found = list(schemas_in(DOC["paths"]))
    assert len(found) > 3 * len(ROUTE_DOCS)
    for schema in found:
        Draft202012Validator.check_schema(schema)


def test_every_operation_has_its_path_parameters_and_a_unique_id() -> None:
    ids = []
    for path, ops in DOC["paths"].items():
        assert "<" not in path and ">" not in path, path
        wanted = set(re.findall(r"\{(\w+)\}", path))
        for method, op in ops.items():
            ids.append(op["operationId"])
            got = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert got == wanted, (method, path)
            if wanted:
                assert "404" in op["responses"], (method, path)
            assert all(s in op["responses"] for s in ("400", "405", "500", "503")), (method, path)
            assert ("401" in op["responses"]) == (op.get("security") != []), (method, path)
    assert len(ids) == len(set(ids)) == len(ROUTE_DOCS)


def test_only_a_body_that_may_be_left_out_is_optional() -> None:
    optional = {(m.upper(), p) for p, ops in DOC["paths"].items() for m, op in ops.items()
                if "requestBody" in op and not op["requestBody"]["required"]}
    assert optional == {("POST", "/models/{name}/register")}


def test_answers_are_json_but_for_pages_metrics_and_streams() -> None:
    ok = {(m, p): {ct for s, r in op["responses"].items() if s.startswith("2") for ct in r["content"]}
          for p, ops in DOC["paths"].items() for m, op in ops.items()}
    assert ok[("get", "/metrics")] == {"text/plain"}
    assert ok[("get", "/")] == ok[("get", "/docs")] == {"text/html"}
    assert ok[("post", "/v1/chat/completions")] == {"application/json", "text/event-stream"}
    assert ok[("get", "/bundles")] == {"application/x-tar"}
    assert sum(cts == {"application/json"} for cts in ok.values()) == len(ok) - 7


def test_a_reader_cannot_change_the_schemas() -> None:
    before = copy.deepcopy(ROUTE_DOCS[("GET", "/transfers")].responses)
    doc = openapi_document("x")
    doc["paths"]["/transfers"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["x"] = 1
    assert ROUTE_DOCS[("GET", "/transfers")].responses == before
    assert openapi_document("x") != doc


def test_openapi_spec_validator_takes_it() -> None:
    import openapi_spec_validator  # a test dependency: the specification's own check

    openapi_spec_validator.validate(DOC)


# -- request bodies: what the handlers take, the schemas take -------------------------------

COMMAND = [sys.executable, "fake_engine.py", "--model-dir", "{model_dir}", "--port", "{port}"]
ENGINE_CONFIG = {"engine": "command", "command": COMMAND}
PIPELINE_DOC = {"name": "x", "description": "", "actions": [
    {"action_id": "a", "action_type": "copy", "model_name": "m", "devices": ["node1:disk", "node9:disk"],
     "dependencies": []},
    {"action_id": "b", "action_type": "serve", "model_name": "m", "devices": ["node1:gpu0"], "dependencies": ["a"],
     "config": {"engine": "command", "command": ["my-engine", "{port}"]}, "port": 8080, "retries": 2,
     "backoff_s": 0.5, "timeout_s": 60},
    {"action_id": "c", "action_type": "health_check", "target_url": "http://x/", "dependencies": ["b"]},
    {"action_id": "d", "action_type": "move", "model_name": "m", "devices": ["node1:disk", "any:dram"],
     "keep_source": True, "dependencies": ["c"]},
    {"action_id": "e", "action_type": "download", "model_name": "acme/m", "source_url": "hf://acme/m",
     "devices": ["disk"], "config": None, "timeout_s": None, "port": None},
], "fail_fast": False, "priority": 5}

# (method, rule) -> bodies its handler takes (past the shape: a name or device may still be unknown).
TAKEN: dict[tuple[str, str], list[Any]] = {
    ("POST", "/models/<model:name>/copy"): [
        {"from_device": "a:disk", "to_device": "c:disk"}, {"to_device": "b:disk"},
        {"from_device": None, "to_device": "b:disk", "priority": "high"},
        {"from_device": "a:disk", "to_device": "b:disk", "keep_source": False},
    ],
    ("POST", "/models/<model:name>/move"): [
        {"from_device": "b:dram", "to_device": "c:disk"},
        {"from_device": "a:disk", "to_device": "b:disk", "keep_source": True},
    ],
    ("POST", "/models/<model:name>/download"): [
        {"source_url": "file:///data/m", "target_device": "a:disk"}, {"target_device": "a:dram"},
        {"source": "a:disk", "target_device": "b:dram"}, {"source": "web", "target_device": "b:disk"},
        {"source_url": "hf://acme/m", "target_device": "a:disk", "revision": "main", "allow_patterns": "*.json",
         "ignore_patterns": ["*.bin"]},
        {"source": "a:disk", "target_device": "b:dram", "revision": 5},  # not a web source: not read
        {"source_url": 7, "target_device": "b:disk"},  # not a URL: the registration's serves
    ],
    ("POST", "/models/<model:name>/register"): [
        None, {}, {"model_type": "llm"}, {"model_type": None, "source_url": "hf://acme/m"},
        {"model_type": "llm", "metadata": {"description": "two", "tags": ["x"]}},
        {"metadata": {"requirements": {"min_vram": 2**63 - 1}}},
        {"metadata": {"requirements": {"gpu_arch": ["sm_80", "sm_90"], "min_memory": 0}, "engine": "vllm",
                      "files": ["a.bin"], "file_count": 1, "revision": "abc"}},
        {"metadata": {"requirements": {"gpu_arch": "sm_80", "min_vram": None}, "tags": None, "engine": None,
                      "description": None, "revision": None, "files": None, "file_count": None}},
    ],
    ("POST", "/models/<model:name>/services"): [
        {"device": "node2:gpu0", "config": ENGINE_CONFIG},
        {"devices": ["node1:gpu0", "node1:gpu1"], "config": ENGINE_CONFIG},
        {"device": "node1:gpu0", "config": {**ENGINE_CONFIG, "completion_probe": True, "startup_timeout_s": 30,
                                              "env": {"A": "b"}, "flags": {"x": 1, "y": True, "z": None},
                                              "args": ["--a"], "health_path": "/h", "models_path": None}},
        {"device": "node1:gpu", "port": 9000, "engine": "vllm"}, {"device": "n:gpu0", "config": None},
        {"device": "n:gpu0", "config": []},  # ``or {}``: no config
        {"devices": ["n:gpu0"], "device": 5},  # devices given: device is not read
        {"target_nodes": ["node1", "node2"], "port": 8000, "config": {"framework": "llamacpp"}},
        {"target_nodes": ["n"], "devices": "x"},  # target_nodes given: the devices are not read
        # Refused by the node (a port outside its --service-ports: PORT_OUT_OF_RANGE), not the schema.
        {"device": "node1:gpu0", "port": 80},
    ],
    ("POST", "/models/<model:name>/serve"): [
        {"device": "gpu0"}, {"device": "gpu"}, {"device": "node1:gpu1", "port": 8000, "config": {"framework": "vllm"}},
        {"device": "n:gpu0", "config": {"framework": "llama_cpp", "args": ["--a"]}},
    ],
    ("POST", "/models/<model:name>/pin"): [
        {"min": 2}, {"min": 1, "max": 3, "tier": "dram", "labels": {"zone": "a"}, "spread": "zone"},
        {"min": -1, "max": -1}, {"min": 0, "max": 1, "spread": None}, {},
    ],
    ("POST", "/v2/catalog/models"): [
        {"id": "acme/m"}, {"id": "m", "digest": "sha256:" + "0" * 64, "source_url": "hf://acme/m"},
        {"id": "m", "digest": None, "source_url": None},
    ],
    ("POST", "/jobs"): [PIPELINE_DOC] + [
        yaml.safe_load(p.read_text()) for p in sorted((ROOT / "meshnode" / "examples").glob("*.yaml"))],
    ("POST", "/jobs/from-yaml"): [yaml.safe_load((ROOT / "meshnode" / "examples" / "deployment.yaml").read_text())],
    ("POST", "/jobs/<jid>/create"): [PIPELINE_DOC],
    ("POST", "/v1/chat/completions"): [{"model": "org/e", "messages": []}, {"model": "m", "stream": True}],
    ("POST", "/v1/completions"): [{"model": "org/nope", "prompt": "x", "max_tokens": 2}],
    ("POST", "/v1/embeddings"): [{"model": "org/e", "input": ["a", "b"]}],
    ("POST", "/ensure"): [{"model": "org/m", "device": "n1:disk"},
                          {"model": "m", "device": "n1:dram", "holder": "vllm-7f9c:0", "lease_s": 1.5}],
    ("POST", "/bundles"): ["a bundle: tar bytes (protocol/bundle.py)"],
}
REFUSED: dict[tuple[str, str], list[Any]] = {
    ("POST", "/models/<model:name>/copy"): [
        [1], {"from_device": "a:disk"}, {"to_device": "b:disk", "keep_source": "yes"}, {"to_device": "b:disk", "x": 1},
        {"to_device": "b:tape"}, {"to_device": "b:gpu0"}, {"to_device": "web"}, {"to_device": ""},
        {"to_device": "a..b:disk"}, {"to_device": "b:disk\n"}, {"to_device": "x" * 65 + ":disk"},
        {"to_device": "b:disk", "from_device": "web"},
    ],
    ("POST", "/models/<model:name>/move"): [{"to_device": "b:disk"}, {"from_device": None, "to_device": "b:disk"}],
    ("POST", "/models/<model:name>/download"): [
        {"source_url": "file:///x"}, {"target_device": "a:disk", "x": 1},
        {"target_device": "b:disk", "source": "b:gpu0"}, {"target_device": "b:disk", "revision": ""},
        {"target_device": "b:disk", "source_url": "gopher://x"}, {"target_device": "b:disk", "source_url": "a\x00"},
        {"target_device": "b:disk", "source_url": "file://remote/x"},
    ],
    ("POST", "/models/<model:name>/register"): [
        [1], "llm", {"bogus": 1}, {"metadata": {"requirements": {"min_vram": "lots"}}}, {"model_type": "x" * 65},
        {"model_type": ""}, {"metadata": {"file_count": 2**64}}, {"metadata": {"x": 1}},
        {"metadata": {"engine": "tensorrt"}}, {"metadata": {"requirements": {"gpu_arch": []}}},
        {"metadata": {"requirements": {"min_vram": -1}}}, {"metadata": {"tags": [""]}},
    ],
    ("POST", "/models/<model:name>/pin"): [
        [], 3, {"min": "2"}, {"min": 1, "tier": "gpu0"}, {"min": 1, "colour": "red"}, {"min": 2000},
        {"labels": {"zone": 5}}, {"min": -2}, {"max": 0}, {"min": 0}, {"min": -1, "max": 3},
        {"labels": {"zone": "a b"}}, {"spread": ""}, {"labels": {str(i): "x" for i in range(17)}},
    ],
    ("POST", "/v2/catalog/models"): [
        [], {}, {"id": 5}, {"id": "m", "digest": "md5:x"}, {"id": "m", "x": 1}, {"id": ""},
        {"id": "a/../b"}, {"id": "a/b/c"}, {"id": "acme/copy"}, {"id": "x" * 201},
    ],
    ("POST", "/models/<model:name>/services"): [
        [], {"port": 8000}, {"device": "n:gpu0", "port": 0}, {"device": "n:gpu0", "port": True},
        {"device": "n:gpu0", "config": "x"}, {"device": "n:gpu0", "shell": 1}, {"devices": []},
        {"devices": "n:gpu0"}, {"device": None}, {"device": "node1:disk"}, {"device": "any:gpu0"},
        {"devices": ["n:gpu0", "gpu1"]}, {"target_nodes": []}, {"target_nodes": ["a..b"]},
        # The engine layer's own refusals, now the schema's (with the same codes).
        {"device": "node1:gpu0", "engine": "tensorrt"}, {"device": "node1:gpu0", "config": {"shell": "x"}},
        {"device": "n:gpu0", "config": {"env": {"CUDA_VISIBLE_DEVICES": "1"}}},
        {"device": "n:gpu0", "config": {"health_path": "h"}}, {"device": "n:gpu0", "config": {"args": ["a\x00"]}},
        {"device": "n:gpu0", "config": {"flags": {"-": True}}}, {"device": "n:gpu0", "config": {"command": []}},
    ],
    ("POST", "/models/<model:name>/serve"): [
        {}, {"device": "any:gpu0"}, {"device": "disk"}, {"device": "n:dram"}, {"device": "gpu0", "x": 1},
        {"device": "gpu0", "config": {"framework": "tensorrt"}},
    ],
    ("POST", "/jobs"): [
        [], {"name": "x"}, {"name": "x", "actions": []}, {"name": "", "actions": PIPELINE_DOC["actions"]},
        {"name": 5, "actions": PIPELINE_DOC["actions"]}, {"name": "x", "actions": PIPELINE_DOC["actions"], "x": 1},
        {"name": "x", "actions": [{"action_id": "a", "action_type": "health_check", "bogus": 1}]},
        {"name": "x", "actions": [{"action_type": "health_check"}]},
        {"name": "x", "actions": [{"action_id": "a", "action_type": "copy", "devices": "n:disk"}]},
        {"name": "x", "priority": 1001, "actions": PIPELINE_DOC["actions"]},
        *({"name": "x", "actions": [{"action_id": "a", **action}]} for action in (
            {"action_type": ""}, {"action_type": "health_check"},
            {"action_type": "download", "model_name": "m", "devices": ["n:disk", "n:dram"]},
            {"action_type": "copy", "model_name": "m", "devices": ["n:disk", "o:disk"], "keep_source": True},
            {"action_type": "copy", "model_name": "m", "devices": ["disk", "o:disk"]},
            {"action_type": "copy", "model_name": "m", "devices": ["n:disk", "o:disk"], "source_url": "hf://a/b"},
            {"action_type": "move", "model_name": "a/../b", "devices": ["n:disk", "o:disk"]},
            {"action_type": "health_check", "devices": ["n:disk"], "target_url": "http://x/"},
            {"action_type": "health_check", "target_url": "http://u@x/"},
            {"action_type": "health_check", "target_url": "http://x:65536/"},
            {"action_type": "serve", "model_name": "m", "devices": ["n:disk"]},
            {"action_type": "serve", "model_name": "m", "config": {"engine": "command", "command": ["x"]}},
            {"action_type": "delete", "model_name": "m", "devices": ["any:disk"]},
            {"action_type": "stop_serve"},
        )),
        {"name": "x", "actions": [{"action_id": "-a", "action_type": "health_check", "target_url": "http://x/"}]},
    ],
    ("POST", "/jobs/from-yaml"): [{"name": "x"}, "name: x"],
    ("POST", "/jobs/<jid>/create"): [{"name": "x"}],
    ("POST", "/v1/completions"): [[], {"prompt": "x"}, {"model": 5}, {"model": ""}, {"model": "x" * 201}],
    ("POST", "/ensure"): [{"model": "m"}, {"model": "m", "device": "n1:gpu0"}, {"model": "m", "device": "n1:disk",
                          "lease_s": 0}, {"model": "m", "device": "n1:disk", "holder": "-x"},
                          {"model": "m", "device": "n1:disk", "x": 1}],
}


def cases(table: dict[tuple[str, str], list[Any]]) -> list[tuple[str, str, Any]]:
    return [(m, r, b) for (m, r), bodies in table.items() for b in bodies]


@pytest.mark.parametrize(("method", "rule", "body"), cases(TAKEN))
def test_the_schema_takes_what_the_handler_takes(method: str, rule: str, body: Any) -> None:
    errors = [e.message for e in body_schema(method, rule).iter_errors(body)]
    assert errors == [], body


@pytest.mark.parametrize(("method", "rule", "body"), cases(REFUSED))
def test_the_schema_refuses_a_wrong_shape(method: str, rule: str, body: Any) -> None:
    assert not body_schema(method, rule).is_valid(body), body


def test_the_hand_written_bodies_are_what_the_parsers_say() -> None:
    """The tables above are right about the bodies the protocol's parsers judge."""
    reg = ("POST", "/models/<model:name>/register")
    for body in TAKEN[reg]:
        parse_registration(body)
    for body in REFUSED[reg]:
        with pytest.raises(InvalidInput):
            parse_registration(body)
    for body in TAKEN[("POST", "/models/<model:name>/pin")]:
        parse_policy(body)
    for body in REFUSED[("POST", "/models/<model:name>/pin")]:
        with pytest.raises(InvalidInput):
            parse_policy(body)
    for doc in TAKEN[("POST", "/jobs")]:
        parse_pipeline(doc)
    for doc in REFUSED[("POST", "/jobs")]:
        with pytest.raises(InvalidPipeline):
            parse_pipeline(doc)


def test_every_route_that_takes_a_body_has_cases() -> None:
    with_body = {k for k, d in ROUTE_DOCS.items() if d.request is not None}
    assert with_body == set(TAKEN)
    assert set(REFUSED) <= with_body


# -- by hypothesis: whatever the protocol's parsers take, the schemas take ---------------------

# Values of every JSON type, good and bad for each field: the parsers decide which is which.
ints = st.sampled_from([0, 1, 5, 64, 65, 1000, 65535, 65536, -1, 2**63 - 1, 2**63, 2**64])
texts = st.sampled_from(["", "x", "llm", "sm_80", "*.bin", "main", "a" * 64, "a" * 65, "hf://acme/m",
                         "https://x/y", "file:///d", "node1:disk", "node1:gpu0", "disk", "any:dram", "{port}"])
leaf = st.one_of(st.none(), st.booleans(), ints, st.sampled_from([0.5, 1.5]), texts)
values = st.recursive(leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.dictionaries(texts, kids, max_size=3)), max_leaves=6)
strings = st.lists(texts, max_size=3)
words = st.lists(st.sampled_from(["x", "--a", "sm_90", "{port}", "*.json"]), max_size=3)  # good in any list


def sometimes(s: st.SearchStrategy[Any], other: st.SearchStrategy[Any], one_in: int) -> st.SearchStrategy[Any]:
    """``s``, or once in ``one_in`` draws ``other``."""
    return st.integers(1, one_in).flatmap(lambda n: other if n == 1 else s)


def fields(known: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects of some of ``known``'s fields, each mostly from its own strategy (good values, and some
    bad), else null or any value; now and then one field more."""
    some = st.fixed_dictionaries({}, optional={
        k: sometimes(s, st.one_of(st.none(), values), 4) for k, s in known.items()})
    return sometimes(some, st.tuples(some, values).map(lambda x: {**x[0], "bogus": x[1]}), 10)


metadata = fields({
    "description": st.text(max_size=5), "tags": st.one_of(words, strings), "revision": texts,
    "files": st.one_of(words, strings), "file_count": ints, "engine": st.sampled_from(ENGINES),
    "digest": st.sampled_from(["sha256:" + "a" * 64, "sha256:" + "A" * 64, "sha256:abc", "md5:" + "a" * 32]),
    "requirements": fields({"min_memory": ints, "min_vram": ints, "gpu_arch": st.one_of(texts, words, strings)}),
})
registrations = sometimes(fields({"model_type": texts, "source_url": texts, "metadata": metadata}), values, 10)


@SETTINGS
@given(registrations)
def test_the_registration_schema_is_parse_registration(body: Any) -> None:
    """Exactly: the checks are the same (integral floats aside, which JSON Schema calls integers)."""
    try:
        parse_registration(body)
        taken = True
    except InvalidInput:
        taken = False
    assert body_schema("POST", "/models/<model:name>/register").is_valid(body) == taken, body


policies = sometimes(fields({
    "min": ints, "max": ints, "tier": st.sampled_from(["disk", "dram", "gpu0"]), "spread": texts,
    "labels": st.dictionaries(texts, texts, max_size=2)}), values, 10)


@SETTINGS
@given(policies)
def test_the_pin_schema_takes_every_policy_parse_policy_takes(body: Any) -> None:
    """One way: the schema cannot say that min is at most max, or which characters a label takes."""
    try:
        parse_policy(body)
    except InvalidInput:
        return
    assert body_schema("POST", "/models/<model:name>/pin").is_valid(body), body


flag_names = st.sampled_from(["x", "max-model-len", "a_b", "", "-", "a b"])
serve_configs = fields({
    "engine": st.sampled_from(ENGINES), "args": st.one_of(words, strings), "command": st.one_of(words, strings),
    "env": st.dictionaries(st.sampled_from(["A", "HF_HOME", "1x"]), texts, max_size=2),
    "flags": st.dictionaries(flag_names, leaf, max_size=3), "health_path": st.sampled_from(["/health", "/v1/models"]),
    "models_path": texts, "startup_timeout_s": st.one_of(ints, st.just(30.0)), "completion_probe": st.booleans(),
    "port": values,
})


@SETTINGS
@given(serve_configs)
def test_the_serve_schema_takes_every_config_validate_config_takes(config: dict[str, Any]) -> None:
    try:
        validate_config(config)
    except ServeError:
        return
    assert body_schema("POST", "/models/<model:name>/services").is_valid({"device": "n:gpu0", "config": config})


ACTION_FIELDS = ["action_id", "action_type", "model_name", "devices", "dependencies", "source_url", "target_url",
                 "port", "keep_source", "config", "retries", "backoff_s", "timeout_s", "bogus"]
DOC_FIELDS = ["name", "description", "actions", "fail_fast", "priority", "bogus"]
some_value = st.one_of(leaf, strings, st.dictionaries(texts, leaf, max_size=2), values)


@st.composite
def pipelines(draw: st.DrawFn) -> Any:
    """Pipelines that parse (the tables' and the examples'), with a few fields changed or left out."""
    doc = copy.deepcopy(draw(st.sampled_from(TAKEN[("POST", "/jobs")])))
    for _ in range(draw(st.integers(0, 2))):
        acts = doc["actions"] if isinstance(doc.get("actions"), list) else []
        acts = [a for a in acts if isinstance(a, dict)]
        if not acts or draw(st.booleans()):
            target, keys = doc, DOC_FIELDS
        else:
            target, keys = draw(st.sampled_from(acts)), ACTION_FIELDS
        key = draw(st.sampled_from(keys))
        if draw(st.integers(0, 3)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(some_value)
    return doc


@SETTINGS
@given(pipelines())
def test_the_pipeline_schema_takes_every_pipeline_parse_pipeline_takes(doc: Any) -> None:
    try:
        parse_pipeline(doc)
    except InvalidPipeline:
        return
    assert body_schema("POST", "/jobs").is_valid(doc), doc


def test_an_answer_of_each_shape_validates() -> None:
    """A few answers as the handlers write them (the live check is schemathesis's)."""
    job = {"job_id": "j", "name": "n", "status": "running", "progress": {"completed": 0, "total": 1},
           "error": None, "coordinator": None, "description": "", "submitted_by": "a", "submitted_ms": 1,
           "finished_ms": None, "fail_fast": True, "priority": 0, "cancelled": False, "actions": [
               {"action_id": "a", "status": "pending", "attempts": 0, "error": None, "action_type": "download",
                "model_name": "m", "devices": ["a:disk"], "dependencies": [], "started_ms": None,
                "finished_ms": None, "parts": [{"node": "a", "device": "a:disk", "status": None, "attempt": 0,
                                                "transfer_id": None, "bytes_done": 0, "bytes_total": 0,
                                                "note": "", "error": None}]}]}
    answers = {
        ("GET", "/jobs/<jid>", 200): job,
        ("POST", "/jobs", 202): {**job, "held_by": ["a"], "mesh_token": "a:1:2"},
        ("GET", "/jobs", 200): {"jobs": [job], "total_count": 1, "limit": 100, "offset": 0},
        ("GET", "/health", 200): {"status": "ok", "node_id": "a", "generation": 1},
        ("DELETE", "/models/<model:name>", 200): {"model_name": "m", "unregistered": True, "purged_locations": [],
                                                  "deleted_copies": [], "pending_copies": [], "mesh_token": "t"},
        ("GET", "/transfers/<tid>", 404): {"error": {"code": "TRANSFER_NOT_FOUND", "message": "no"}},
    }
    for (method, rule, status), body in answers.items():
        Draft202012Validator(ROUTE_DOCS[(method, rule)].responses[status]).validate(body)
    assert not Draft202012Validator(ROUTE_DOCS[("GET", "/jobs")].responses[200]).is_valid({"jobs": []})


# -- names, devices, ids and URLs: the document's patterns are the node's rules -------------------


def _takes(check: Callable[[str], object]) -> Callable[[str], bool]:
    """Whether ``check`` takes a value (returns) or refuses it (raises ``LocalProtocolError`` or ``MeshError``)."""
    def judge(text: str) -> bool:
        try:
            check(text)
        except (LocalProtocolError, MeshError, ValueError):
            return False
        return True
    return judge


def _device_of_a_node(text: str) -> object:
    if parse_device(text).is_web:
        raise InvalidName("web")
    return text


def _store_device(text: str) -> object:
    if _device_of_a_node(text) and parse_device(text).kind not in TIERS:
        raise InvalidName("not a tier")
    return text


def _action_id(text: str) -> object:
    return parse_pipeline({"name": "x", "actions": [{"action_id": text, "action_type": "health_check",
                                                     "target_url": "http://x/"}]})


def _target(text: str) -> object:
    if not text.startswith(("http://", "https://")):  # parse_pipeline asks this first
        raise InvalidName("not http(s)://")
    return parse_target(text)


def _job_id(text: str) -> object:
    """``meshnode.jobs.JOB_ID``, less the ids no URL can name (., ..) or another route has (from-yaml)."""
    if not JOB_ID.fullmatch(text) or text in (".", "..", "from-yaml"):
        raise InvalidName("not a job id")
    return text


def _label(text: str) -> object:
    if text != text.strip():  # parse_labels strips; the document takes no spaces around
        raise InvalidName("spaces")
    return parse_labels({text: "v"})


# (the schema, what the node does with a value)
NAMED: dict[str, tuple[dict[str, Any], Callable[[str], object]]] = {
    "model name": (schemas.MODEL_NAME, validate_model_name),
    "node id": (schemas.NODE_ID, validate_node_id),
    "device": (schemas.DEVICE, _device_of_a_node),
    "store device": (schemas.STORE_DEVICE, _store_device),
    "serve GPU": (schemas.GPU_DEVICE, lambda t: _gpu_devices([t])),
    "gswarm GPU": (schemas.GSWARM_GPU, lambda t: _gpu_devices([t if ":" in t else f"n1:{t}"])),
    "step device": (schemas.STEP_DEVICE, parse_step_device),
    "job id": (schemas.JOB_ID, _job_id),
    "action id": (schemas.PIPELINE["properties"]["actions"]["items"]["properties"]["action_id"], _action_id),
    "health target": (schemas.PIPELINE["properties"]["actions"]["items"]["anyOf"][-1]["properties"]["target_url"],
                      _target),
    "source URL": (schemas.SOURCE_URL, classify),
    "label": (schemas.POLICY_BODY["properties"]["labels"]["anyOf"][0]["propertyNames"]
              if "anyOf" in schemas.POLICY_BODY["properties"]["labels"]
              else schemas.POLICY_BODY["properties"]["labels"]["propertyNames"], _label),
}
PIECES = ["a", "Z", "0", "9", ".", "_", "-", "/", ":", "..", "\n", "\x00", " ", "%00", "@", "[", "]", "é", "any:",
          "disk", "dram", "gpu", "gpu0", "gpu12", "gpu999", "gpu1000", "gpu01", "web", "copy", "serve", "services",
          "http://", "https://", "HTTP://", "hf://", "s3://", "file://", "file:", "localhost", "x" * 64,
          "[::1]", "[::g]", ":8080", ":0", ":65536", "?q", "#f", "from-yaml", "é"]
texts_of_pieces = st.lists(st.sampled_from(PIECES), min_size=1, max_size=7).map("".join)


@pytest.mark.parametrize("what", sorted(NAMED))
@SETTINGS
@given(data=st.data())
def test_a_documented_pattern_is_the_nodes_rule(what: str, data: st.DataObject) -> None:
    """Whatever the document takes the node takes, and the other way round: drawn from the
    pattern itself and from pieces that break names (dots, slashes, reserved words, control
    characters, hosts, ports)."""
    schema, check = NAMED[what]
    pattern = ecma_pattern(schema["pattern"])
    text = data.draw(st.one_of(st.from_regex(pattern, fullmatch=True), texts_of_pieces), label="text")
    documented, taken = Validator(schema).is_valid(text), _takes(check)(text)
    if what == "source URL" and re.search(r"^[\x01-\x20]|[\t\n\r]", text):
        # urlsplit drops leading control characters and spaces, tabs and line breaks anywhere: the
        # document takes the URL without them (one of the spellings the node takes).
        assert not documented
    else:
        assert documented == taken, (what, text)


def test_every_parameter_says_what_it_takes() -> None:
    """Every path and query parameter has a pattern, an enum or a bounded number, but purge (any
    value: true, 1 and yes purge)."""
    for path, ops in DOC["paths"].items():
        for method, op in ops.items():
            for p in op.get("parameters", []):
                s = p["schema"]
                bounded = "pattern" in s or "enum" in s or (s.get("type") == "integer" and "minimum" in s)
                assert bounded or p["name"] == "purge", (method, path, p["name"])


def test_the_error_codes_the_document_names_are_codes() -> None:
    found = [s[ERROR_CODE] for s in _all_schemas(DOC) if ERROR_CODE in s]
    assert len(found) > 10 and set(found) <= set(STATUS), set(found) - set(STATUS)


def _all_schemas(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _all_schemas(v)
    elif isinstance(node, list):
        for v in node:
            yield from _all_schemas(v)


def test_a_pattern_is_read_as_json_schema_reads_it() -> None:
    """``$`` is the end of the string (Python's ``$`` also matches before a final newline)."""
    copy_rule = "/models/<model:name>/copy"
    assert Draft202012Validator(ROUTE_DOCS[("POST", copy_rule)].request).is_valid({"to_device": "b:disk\n"})
    with pytest.raises(MeshError) as e:
        body_problem("POST", copy_rule, {"to_device": "b:disk\n"})
    assert e.value.code == "INVALID_DEVICE" and "node:disk or node:dram" in e.value.message
    assert ecma_pattern("^a(?:b$|c)$").search("ab\n") is None and ecma_pattern("[$]$").search("$")


def test_a_problem_is_answered_with_the_handlers_code() -> None:
    def code(rule: str, body: Any) -> str:
        try:
            return "INVALID_REQUEST" if body_problem("POST", rule, body) else ""
        except MeshError as e:
            return e.code

    serve = "/models/<model:name>/services"
    assert code(serve, {"device": "n:disk"}) == "INVALID_DEVICE"
    assert code(serve, {"device": "n:gpu0", "engine": "tensorrt"}) == "UNKNOWN_ENGINE"
    assert code(serve, {"device": "n:gpu0", "config": {"shell": "x"}}) == "INVALID_CONFIG"
    assert code(serve, {"device": "n:gpu0", "x": 1}) == "INVALID_REQUEST"
    assert code("/v2/catalog/models", {"id": "a/../b"}) == "INVALID_MODEL_NAME"
    assert code("/models/<model:name>/pin", {"max": 0}) == "INVALID_POLICY"
    assert code("/models/<model:name>/pin", {"min": 2}) == ""


def test_a_whole_number_is_an_integer() -> None:
    """JSON Schema's 2.0 is the integer 2: a body the schema takes is what the handlers read."""
    body = {"min": 2.0, "max": 3.0}
    assert body_problem("POST", "/models/<model:name>/pin", body) is None
    assert body == {"min": 2, "max": 3} and all(type(v) is int for v in body.values())
    serve = {"device": "n:gpu0", "port": 8000.0, "config": {"startup_timeout_s": 30.0, "flags": {"x": 1.0}}}
    assert body_problem("POST", "/models/<model:name>/services", serve) is None
    assert type(serve["port"]) is int and serve["config"] == {"startup_timeout_s": 30.0, "flags": {"x": 1.0}}
    assert type(serve["config"]["flags"]["x"]) is float  # a flag's value is passed on as written
    assert parse_pipeline({"name": "x", "priority": 5.0, "actions": [
        {"action_id": "a", "action_type": "health_check", "target_url": "http://x/", "retries": 2.0}]}).priority == 5


def test_a_devices_length_bound_is_its_patterns() -> None:
    """The devices' maxLength: a node id's longest, ':' and the longest kind the pattern takes."""
    from re import _parser  # the width a pattern can match

    assert _parser.parse(DEVICE_KIND_PATTERN).getwidth()[1] == schemas.KIND_CHARS_MAX
    assert schemas.DEVICE["maxLength"] == NODE_ID_MAX + 1 + schemas.KIND_CHARS_MAX
    assert Validator(schemas.DEVICE).is_valid("n" * NODE_ID_MAX + ":gpu999")
