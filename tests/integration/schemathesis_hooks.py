"""schemathesis hooks of test_openapi_live.py, loaded by its schemathesis
process (``SCHEMATHESIS_HOOKS``).  Three kinds, each as narrow as it can be:

1. Hermetic: a URL a generated request carries that the node would fetch
   from outside (``http(s)``, ``s3``, ``hf``, in any field: a download's
   source, a registration's, a pipeline's source or health check) is
   rewritten to one that leads only to loopback before the request is sent,
   so that the node never resolves or reaches a name the generator made up.
   The rewrite keeps the rest of the URL, so one the document refuses for it
   stays refused.

2. Rules the document states in words because JSON Schema cannot say them
   (two fields that differ, min at most max, GPUs of one node, a pipeline's
   dependency graph, at most ARGS_MAX engine arguments from two fields):
   cases that break one are not generated.

3. Answers that come from the node's state, not from the request (a
   download with no URL takes the registration's; an engine program that is
   not installed here; a port outside the node's --service-ports; a pipeline
   naming models or nodes the mesh lacks): a "schema-valid request rejected"
   failure whose answer is exactly that one is dropped.  Each is described in
   the document.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import schemathesis
from schemathesis.openapi.checks import RejectedPositiveData

from protocol.errors import InvalidName
from protocol.pipeline import InvalidPipeline, parse_pipeline, parse_step_device
from protocol.serving import ARGS_MAX
from protocol.sources import InvalidSource, classify

SERVES = (("POST", "/models/{name}/services"), ("POST", "/models/{name}/serve"))
PIPELINES = (("POST", "/jobs"), ("POST", "/jobs/from-yaml"), ("POST", "/jobs/{jid}/create"))
LOOPBACK = "127.0.0.1:9"  # a dead port: the node refuses it as a private source, or cannot connect
S3_BUCKET = "meshnode-test"  # on the node's --s3-endpoint-url, a dead port on loopback too
HUB_REPO = "acme/m"  # on HF_ENDPOINT, the same


def hermetic(value: Any) -> Any:
    """``value`` with every URL in it that the node would fetch from outside
    (``protocol.sources.classify``, as the node reads it) led to loopback; the
    rest of the URL (its scheme as written, user info, path, query) stays, so
    that one the document refuses for those stays refused.  A URL the node
    refuses is left as it is: it is refused before anything is fetched."""
    if isinstance(value, dict):
        return {k: hermetic(v) for k, v in value.items()}
    if isinstance(value, list):
        return [hermetic(v) for v in value]
    if not isinstance(value, str):
        return value
    try:
        outside = classify(value).kind.outside
    except InvalidSource:
        return value
    if not outside:
        return value
    scheme = value.partition(":")[0]
    if scheme.lower() == "hf":
        return f"{scheme}://{HUB_REPO}"
    if scheme.lower() == "s3":
        return f"{scheme}://{S3_BUCKET}/x"  # no query: it could name another endpoint
    parts = urlsplit(value)
    user = parts.netloc.rpartition("@")[0] + "@" if "@" in parts.netloc else ""
    path = parts.path if parts.path.startswith("/") else "/" + parts.path
    return (f"{scheme}://{user}{LOOPBACK}{path}" + (f"?{parts.query}" if parts.query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    if isinstance(case.body, dict | list | str):
        case.body = hermetic(case.body)
    return case


# -- 2. rules JSON Schema cannot state --------------------------------------------------------


def _node(device: Any) -> str | None:
    return device.rpartition(":")[0] if isinstance(device, str) else None


def _min_above_max(policy: Any) -> bool:
    """``protocol.replicas``: min may not be above max (unless max is -1, every node)."""
    if not isinstance(policy, dict):
        return False
    lo = policy.get("min", 1)
    hi = policy.get("max", lo)
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lo, hi))
    return numbers and hi != -1 and lo > hi


def _too_many_args(config: Any) -> bool:
    """``protocol.serving.validate_config``: args and flags make at most ARGS_MAX arguments."""
    if not isinstance(config, dict):
        return False
    args = config.get("args", [])
    flags = config.get("flags", {})
    if not isinstance(args, list) or not isinstance(flags, dict):
        return False
    n = len(args) + sum(1 if v is True else 2 for v in flags.values() if v is not None and v is not False)
    return n > ARGS_MAX


def _step_device(text: Any) -> str | None:
    try:
        return str(parse_step_device(text))
    except InvalidName:
        return None


def _graph_broken(doc: Any) -> bool:
    """A pipeline whose action ids repeat, whose dependencies name no other action
    or go round, or whose devices break a rule between two of them (a move's or
    copy's device named twice, a serve's GPUs on two nodes)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("actions"), list):
        return False
    acts = [a for a in doc["actions"] if isinstance(a, dict)]
    ids = [a.get("action_id") for a in acts]
    if len(set(map(str, ids))) != len(ids):
        return True
    deps: dict[str, list[str]] = {}
    for a in acts:
        raw = a.get("dependencies", [])
        mine = [d for d in raw if isinstance(d, str)] if isinstance(raw, list) else []
        if any(d not in ids or d == a.get("action_id") for d in mine):
            return True
        deps[str(a.get("action_id"))] = mine
        devs = a.get("devices", [])
        names = [_step_device(d) for d in devs] if isinstance(devs, list) else []
        if a.get("action_type") in ("move", "copy") and len(set(names)) != len(names):
            return True
        if a.get("action_type") == "serve" and len({_node(n) for n in names if n}) > 1:
            return True
    done: set[str] = set()
    for _ in range(len(deps)):  # Kahn, by rounds
        ready = {k for k, v in deps.items() if k not in done and all(d in done for d in v)}
        if not ready:
            break
        done |= ready
    return len(done) != len(deps)


def _breaks_an_unstated_rule(method: str, path: str, body: Any) -> bool:
    if not isinstance(body, dict):
        return False
    if (method, path) in (("POST", "/models/{name}/copy"), ("POST", "/models/{name}/move")):
        return isinstance(body.get("to_device"), str) and body.get("from_device") == body["to_device"]
    if (method, path) == ("POST", "/models/{name}/download"):
        return body.get("source") not in (None, "web") and body.get("source") == body.get("target_device")
    if (method, path) == ("POST", "/models/{name}/pin"):
        return _min_above_max(body)
    if (method, path) == ("POST", "/models/{name}/register"):
        return _min_above_max(body.get("replicas"))
    if (method, path) in SERVES:
        devices = body.get("devices") if "target_nodes" not in body else None
        nodes = {_node(d) for d in devices} if isinstance(devices, list) else set()
        return len(nodes) > 1 or _too_many_args(body.get("config"))
    if (method, path) in PIPELINES:
        return _graph_broken(body)
    return False


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    return not _breaks_an_unstated_rule(case.operation.method.upper(), case.operation.path, case.body)


# -- 3. answers that come from the node's state -----------------------------------------------


def _error(response: Any) -> tuple[str, str]:
    try:
        err = json.loads(response.content)["error"]
        return str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        return "", ""


def from_state(method: str, path: str, body: Any, status: int, code: str, message: str) -> bool:
    """Whether a schema-valid request's refusal comes from the node's state (see the module's docstring)."""
    if (method, path) == ("POST", "/models/{name}/download") and (status, code) == (400, "INVALID_REQUEST"):
        # No URL given (a copy's source is a device): the registration's serves, or none is there.
        url = body.get("source_url") if isinstance(body, dict) else None
        return isinstance(body, dict) and body.get("source", "web") == "web" and not (isinstance(url, str) and url)
    if (method, path) in SERVES:
        return ((status, code) in ((424, "ENGINE_NOT_FOUND"), (400, "PORT_OUT_OF_RANGE"))
                or ((status, code) == (400, "INVALID_CONFIG") and ".gguf" in message))  # the copy's files
    if (method, path) in PIPELINES and (status, code) == (422, "INVALID_PIPELINE"):
        try:
            parse_pipeline(body)  # the pipeline itself is right: the mesh lacks what it names
        except InvalidPipeline:
            return False
        return True
    return False


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    if not isinstance(failure, RejectedPositiveData):
        return True
    code, message = _error(response)
    return not from_state(case.operation.method.upper(), case.operation.path, case.body, response.status_code,
                          code, message)
