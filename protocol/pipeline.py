"""Pipelines: gswarm's YAML/JSON format, parsed and validated whole.

Theory of operation
-------------------
A pipeline is ``name``, ``description`` and ``actions[]``; each action has an
``action_id``, an ``action_type`` (download, move, copy, serve, stop_serve,
delete, health_check), a ``model_name`` (all but health_check), ``devices``
and ``dependencies``, and what its type needs (``source_url``, ``port``,
``target_url``, ``keep_source``, ``config``).  Beyond gswarm, an action may
say ``retries``, ``backoff_s`` and ``timeout_s``, and the pipeline
``fail_fast`` (default true) and ``priority``.

``parse_pipeline`` takes the loaded document (a dict, from YAML or JSON) and
either returns a typed ``Pipeline`` or raises ``InvalidPipeline`` with every
problem at once, each naming its action and field.  It checks what can be
checked without the mesh: types, unknown fields, duplicate ids, missing and
cyclic dependencies (Kahn's algorithm, iterative: a chain of any depth costs
O(actions + edges)), device names and what each action type allows.  What
needs the mesh (does node1 exist? is the model registered?) is
``check_against``, with the catalog's facts handed in.

Devices are today's names (``node:disk``, ``node:dram``, ``node:gpuN``) plus
gswarm's unambiguous forms: ``node:gpu`` is ``node:gpu0``; a device without a
node (``disk``, ``gpu``) or on ``any`` (``any:disk``) asks placement to pick
the node (``placement.py``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidName, LocalProtocolError
from .healthcheck import TargetRefused, parse_target
from .names import validate_model_name, validate_node_id
from .sources import InvalidSource, classify

__all__ = [
    "ACTION_TYPES",
    "LIMITS",
    "InvalidPipeline",
    "Pipeline",
    "PipelineStep",
    "Problem",
    "StepDevice",
    "check_against",
    "parse_pipeline",
    "parse_step_device",
]

ACTION_TYPES = ("download", "move", "copy", "serve", "stop_serve", "delete", "health_check")
_ACTION_FIELDS = frozenset({
    "action_id", "action_type", "model_name", "devices", "dependencies", "source_url", "port",
    "target_url", "keep_source", "config", "retries", "backoff_s", "timeout_s",
})
_DOC_FIELDS = frozenset({"name", "description", "actions", "fail_fast", "priority"})
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_KIND = re.compile(r"(disk|dram|gpu(0|[1-9][0-9]{0,2})?)\Z")


@dataclass(frozen=True, slots=True)
class Limits:
    actions: int = 256  # a pipeline's actions (a job record is gossiped whole)
    dependencies: int = 64  # one action's
    devices: int = 16  # one action's
    text: int = 2048  # any one string
    config_items: int = 64
    retries: int = 10
    backoff_s: float = 3600.0
    timeout_s: float = 7 * 86400.0
    problems: int = 100  # listed at most; the count says how many more


LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Problem:
    action_id: str | None  # None: the document itself
    field: str
    message: str

    def to_value(self) -> dict[str, Any]:
        return {"action_id": self.action_id, "field": self.field, "message": self.message}


class InvalidPipeline(LocalProtocolError, ValueError):
    def __init__(self, problems: list[Problem], total: int | None = None) -> None:
        self.problems = problems
        self.total = len(problems) if total is None else total
        first = problems[0] if problems else Problem(None, "", "invalid")
        where = f"action {first.action_id!r}" if first.action_id else "the pipeline"
        more = f" (and {self.total - 1} more)" if self.total > 1 else ""
        super().__init__(f"{where}, {first.field}: {first.message}{more}")


@dataclass(frozen=True, slots=True)
class StepDevice:
    """One device an action names.  ``node`` None: placement picks it."""

    node: str | None
    kind: str  # disk, dram, gpuN

    @property
    def tier(self) -> str:
        return "gpu" if self.kind.startswith("gpu") else self.kind

    def __str__(self) -> str:
        return f"{self.node or 'any'}:{self.kind}"


def parse_step_device(text: object) -> StepDevice:
    """``node:disk``, ``node:dram``, ``node:gpuN``, ``node:gpu`` (= gpu0),
    ``any:<kind>`` or a bare ``<kind>`` (placement picks the node)."""
    if not isinstance(text, str) or not text or len(text) > 100:
        raise InvalidName("a device is a string such as node1:disk, node1:gpu0 or any:disk")
    node, sep, kind = text.rpartition(":")
    if not _KIND.match(kind):
        raise InvalidName(f"bad device {text[:80]!r}: the kind is disk, dram, gpu or gpuN")
    if kind == "gpu":
        kind = "gpu0" if sep and node != "any" else "gpu"
    if not sep or node == "any":
        return StepDevice(None, kind)
    validate_node_id(node)
    return StepDevice(node, kind)


@dataclass(frozen=True, slots=True)
class PipelineStep:
    """One entry of a pipeline's ``actions[]`` (gswarm calls them actions): a
    step of a job, not a ``protocol.actions.PeerAction`` (what one node hands
    another to run), which a step may lead to."""

    action_id: str
    action_type: str
    model_name: str | None
    devices: tuple[StepDevice, ...]
    dependencies: tuple[str, ...]
    source_url: str | None = None
    port: int | None = None
    target_url: str | None = None
    keep_source: bool = False
    config: Mapping[str, Any] = field(default_factory=dict)
    retries: int = 0
    backoff_s: float = 1.0
    timeout_s: float | None = None

    def to_value(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "action_id": self.action_id, "action_type": self.action_type, "model_name": self.model_name,
            "devices": [str(d) for d in self.devices], "dependencies": list(self.dependencies),
            "keep_source": self.keep_source, "config": dict(self.config), "retries": self.retries,
            "backoff_s": self.backoff_s,
        }
        for k in ("source_url", "port", "target_url", "timeout_s"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


@dataclass(frozen=True, slots=True)
class Pipeline:
    name: str
    description: str
    actions: tuple[PipelineStep, ...]
    fail_fast: bool = True
    priority: int = 0

    def action(self, action_id: str) -> PipelineStep:
        for a in self.actions:
            if a.action_id == action_id:
                return a
        raise KeyError(action_id)

    def to_value(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "fail_fast": self.fail_fast,
                "priority": self.priority, "actions": [a.to_value() for a in self.actions]}


class _Problems:
    def __init__(self) -> None:
        self.items: list[Problem] = []
        self.total = 0

    def add(self, action_id: str | None, fld: str, message: str) -> None:
        self.total += 1
        if len(self.items) < LIMITS.problems:
            self.items.append(Problem(action_id, fld, message))

    def raise_if_any(self) -> None:
        if self.total:
            raise InvalidPipeline(self.items, self.total)


def _text(p: _Problems, aid: str | None, fld: str, v: Any, *, required: bool) -> str | None:
    if v is None:
        if required:
            p.add(aid, fld, "is required")
        return None
    if not isinstance(v, str):
        p.add(aid, fld, f"must be a string, not {type(v).__name__}")
        return None
    if len(v) > LIMITS.text:
        p.add(aid, fld, f"is longer than {LIMITS.text} characters")
        return None
    return v


def _whole(v: Any) -> Any:
    """An integral float as its int: JSON's ``2.0`` is the integer 2, as JSON Schema reads it."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _number(p: _Problems, aid: str, fld: str, v: Any, lo: float, hi: float, *, integer: bool) -> Any:
    v = _whole(v) if integer else v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        p.add(aid, fld, f"must be {'an integer' if integer else 'a number'}")
        return None
    if not (lo <= v <= hi) or (isinstance(v, float) and not math.isfinite(v)):
        p.add(aid, fld, f"must be between {lo:g} and {hi:g}")
        return None
    return v


def _url(p: _Problems, aid: str, fld: str, v: Any, schemes: tuple[str, ...]) -> str | None:
    s = _text(p, aid, fld, v, required=False)
    if s is not None and not s.startswith(tuple(f"{x}://" for x in schemes)):
        p.add(aid, fld, f"must be a URL ({', '.join(schemes)})")
        return None
    return s


def _source_url(p: _Problems, aid: str, v: Any) -> str | None:
    """A download's source: any kind ``protocol.sources.classify`` knows."""
    s = _text(p, aid, "source_url", v, required=False)
    if s is None:
        return None
    try:
        classify(s)
    except InvalidSource as e:
        p.add(aid, "source_url", str(e))
        return None
    return s


def _bounded_list(p: _Problems, aid: str, fld: str, v: Any, limit: int, of: str) -> list[Any]:
    """``v`` when it is a list of at most ``limit`` items, else a problem and ``[]``."""
    if not isinstance(v, list):
        p.add(aid, fld, f"must be a list of {of}")
        return []
    if len(v) > limit:
        p.add(aid, fld, f"more than {limit}")
        return []
    return v


def _action(p: _Problems, raw: Any, index: int) -> PipelineStep | None:
    if not isinstance(raw, Mapping):
        p.add(None, f"actions[{index}]", "must be a mapping")
        return None
    aid_raw = raw.get("action_id")
    aid = aid_raw if isinstance(aid_raw, str) and _ID.match(aid_raw) else None
    if aid is None:
        p.add(None, f"actions[{index}].action_id",
              "is required: 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    who = aid or f"actions[{index}]"
    for k in raw:
        if k not in _ACTION_FIELDS:
            p.add(who, str(k)[:64], f"unknown field (an action has {', '.join(sorted(_ACTION_FIELDS))})")
    atype = raw.get("action_type")
    if atype not in ACTION_TYPES:
        p.add(who, "action_type", f"must be one of {', '.join(ACTION_TYPES)}")
        atype = None
    model = None
    if atype != "health_check" or raw.get("model_name") is not None:  # a health_check may name its model
        m = raw.get("model_name")
        if m is None:
            p.add(who, "model_name", "is required")
        else:
            try:
                model = validate_model_name(m)
            except InvalidName as e:
                p.add(who, "model_name", str(e))
    devices: list[StepDevice] = []
    for i, d in enumerate(_bounded_list(p, who, "devices", raw.get("devices", []), LIMITS.devices, "devices")):
        try:
            devices.append(parse_step_device(d))
        except InvalidName as e:
            p.add(who, f"devices[{i}]", str(e))
    deps: list[str] = []
    raw_deps = _bounded_list(p, who, "dependencies", raw.get("dependencies", []), LIMITS.dependencies, "action ids")
    for i, d in enumerate(raw_deps):
        if not isinstance(d, str) or not _ID.match(d):
            p.add(who, f"dependencies[{i}]", "must be an action id")
        elif d in deps:
            p.add(who, f"dependencies[{i}]", f"{d!r} is listed twice")
        else:
            deps.append(d)
    source_url = _source_url(p, who, raw.get("source_url"))
    target_url = _url(p, who, "target_url", raw.get("target_url"), ("http", "https"))
    port = None if raw.get("port") is None else _number(p, who, "port", raw.get("port"), 1, 65535, integer=True)
    keep = raw.get("keep_source", False)
    if not isinstance(keep, bool):
        p.add(who, "keep_source", "must be true or false")
        keep = False
    config = raw.get("config", {})
    if config is None:
        config = {}
    if not isinstance(config, Mapping) or len(config) > LIMITS.config_items or not all(
            isinstance(k, str) for k in config):
        p.add(who, "config", f"must be a mapping of at most {LIMITS.config_items} named settings")
        config = {}
    retries = _number(p, who, "retries", raw.get("retries", 0), 0, LIMITS.retries, integer=True)
    backoff = _number(p, who, "backoff_s", raw.get("backoff_s", 1.0), 0, LIMITS.backoff_s, integer=False)
    timeout = None if raw.get("timeout_s") is None else _number(
        p, who, "timeout_s", raw.get("timeout_s"), 0.001, LIMITS.timeout_s, integer=False)
    if atype is not None:
        _check_type(p, who, atype, devices, source_url, target_url, port, keep, model, config)
    if aid is None or atype is None:
        return None
    return PipelineStep(aid, atype, model, tuple(devices), tuple(deps), source_url, port, target_url, keep,
                  dict(config), retries or 0, float(backoff if backoff is not None else 1.0),
                  None if timeout is None else float(timeout))


def _check_type(p: _Problems, who: str, atype: str, devices: list[StepDevice], source_url: str | None,
                target_url: str | None, port: int | None, keep_source: bool, model: str | None = None, config: Mapping[str, Any] | None = None) -> None:
    n = len(devices)
    if atype == "download":
        if n != 1:
            p.add(who, "devices", "a download names one device: its target")
    elif atype in ("move", "copy"):
        if n < 2:
            p.add(who, "devices", f"a {atype} names its source, then one or more targets: [src, dst, ...]")
        elif devices[0].node is None:
            p.add(who, "devices[0]", f"the source of a {atype} names its node")
        elif len({str(d) for d in devices[1:]}) != n - 1 or str(devices[0]) in {str(d) for d in devices[1:]}:
            p.add(who, "devices", "a device is named twice")
    elif atype == "serve":
        config = config or {}
        if any(d.tier != "gpu" for d in devices):
            p.add(who, "devices", "a serve names GPUs (node:gpuN), or none for placement to pick")
        if len({d.node for d in devices}) > 1:
            p.add(who, "devices", "one serve runs on one node: its GPUs share a node")
        cmd = config.get("command") if config.get("engine") == "command" else None
        if port is None and isinstance(cmd, list) and not any("{port}" in str(c) for c in cmd):
            # Every template is told its port (the node's range gives one); a command that takes none needs it named.
            p.add(who, "port", "a command engine that takes no {port} needs the port it listens on")
    elif atype == "delete":
        if n < 1:
            p.add(who, "devices", "a delete names the devices to free")
        elif any(d.node is None for d in devices):
            p.add(who, "devices", "a delete names the node of each device it frees")
    elif atype == "stop_serve":
        if any(d.tier != "gpu" for d in devices):
            p.add(who, "devices", "a stop_serve names GPUs (node:gpuN)")
    elif atype == "health_check":
        if n:
            p.add(who, "devices", "a health_check names no devices")
        if target_url is None and model is None:
            p.add(who, "target_url", "a health_check needs the URL it checks, or the model whose service it checks")
        elif target_url is not None:
            try:
                parse_target(target_url)  # what the URL says only: where it leads is judged when the check runs
            except TargetRefused as e:
                p.add(who, "target_url", str(e))
    if keep_source and atype != "move":
        p.add(who, "keep_source", "only a move keeps or drops its source")
    if source_url is not None and atype != "download":
        p.add(who, "source_url", "only a download has a source URL")


def _cycles(p: _Problems, actions: list[PipelineStep]) -> None:
    ids = {a.action_id for a in actions}
    for a in actions:
        for d in a.dependencies:
            if d not in ids:
                p.add(a.action_id, "dependencies", f"depends on {d!r}, which is not an action of this pipeline")
            elif d == a.action_id:
                p.add(a.action_id, "dependencies", "depends on itself")
    # Kahn: whatever is never freed lies on a cycle or behind one.
    indeg = {a.action_id: 0 for a in actions}
    users: dict[str, list[str]] = {a.action_id: [] for a in actions}
    for a in actions:
        for d in a.dependencies:
            if d in ids and d != a.action_id:
                indeg[a.action_id] += 1
                users[d].append(a.action_id)
    ready = [k for k, v in indeg.items() if v == 0]
    seen = 0
    while ready:
        k = ready.pop()
        seen += 1
        for u in users[k]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    if seen < len(actions):
        stuck = sorted(k for k, v in indeg.items() if v > 0)
        p.add(stuck[0], "dependencies",
              f"a dependency cycle (or waits on one): {', '.join(stuck[:10])}{' ...' if len(stuck) > 10 else ''}")


def parse_pipeline(doc: Any) -> Pipeline:
    """The typed pipeline, or ``InvalidPipeline`` listing every problem."""
    p = _Problems()
    if not isinstance(doc, Mapping):
        p.add(None, "", "a pipeline is a mapping with name, description and actions")
        p.raise_if_any()
    assert isinstance(doc, Mapping)
    for k in doc:
        if k not in _DOC_FIELDS:
            p.add(None, str(k)[:64], f"unknown field (a pipeline has {', '.join(sorted(_DOC_FIELDS))})")
    name = _text(p, None, "name", doc.get("name"), required=True) or ""
    if name == "" and isinstance(doc.get("name"), str):
        p.add(None, "name", "must not be empty")
    description = _text(p, None, "description", doc.get("description", ""), required=False) or ""
    fail_fast = doc.get("fail_fast", True)
    if not isinstance(fail_fast, bool):
        p.add(None, "fail_fast", "must be true or false")
        fail_fast = True
    priority = _whole(doc.get("priority", 0))
    if isinstance(priority, bool) or not isinstance(priority, int) or not -1000 <= priority <= 1000:
        p.add(None, "priority", "must be an integer between -1000 and 1000")
        priority = 0
    raw_actions = doc.get("actions")
    actions: list[PipelineStep] = []
    if not isinstance(raw_actions, list) or not raw_actions:
        p.add(None, "actions", "must be a non-empty list")
    elif len(raw_actions) > LIMITS.actions:
        p.add(None, "actions", f"{len(raw_actions)} actions: at most {LIMITS.actions} in one pipeline")
    else:
        seen: set[str] = set()
        for i, raw in enumerate(raw_actions):
            a = _action(p, raw, i)
            if a is None:
                continue
            if a.action_id in seen:
                p.add(a.action_id, "action_id", "is used by another action")
                continue
            seen.add(a.action_id)
            actions.append(a)
        _cycles(p, actions)
    p.raise_if_any()
    return Pipeline(name, description, tuple(actions), fail_fast, priority)


def check_against(pipe: Pipeline, *, known_node: Callable[[str], bool], registered: Callable[[str], bool],
                  gpus_of: Callable[[str], Collection[int] | None] = lambda _n: None) -> None:
    """What needs the mesh: every node named is a member; every GPU named is
    one its node reports (``gpus_of``: its GPU indexes, None when the node
    has reported none yet); every model is registered or downloaded by an
    action before it is used.  Raises ``InvalidPipeline`` with every problem."""
    p = _Problems()
    def fetchable(a: PipelineStep) -> bool:  # an owner/name model with no URL is a Hugging Face repo
        return a.action_type == "download" and a.model_name is not None and (
            a.source_url is not None or "/" in a.model_name)

    downloaded = {a.model_name for a in pipe.actions if fetchable(a)}
    for a in pipe.actions:
        for i, d in enumerate(a.devices):
            if d.node is not None and not known_node(d.node):
                p.add(a.action_id, f"devices[{i}]", f"no node {d.node!r} in this mesh")
            elif d.node is not None and d.tier == "gpu":
                have = gpus_of(d.node)
                index = int(d.kind[3:] or 0)
                if have is not None and index not in have:
                    p.add(a.action_id, f"devices[{i}]", f"{d.node} has no GPU {index} (it reports "
                          + (", ".join(f"gpu{g}" for g in sorted(have)) or "no GPU") + ")")
        if a.model_name is not None and not registered(a.model_name) and a.model_name not in downloaded:
            if a.action_type == "download":
                p.add(a.action_id, "source_url", f"{a.model_name!r} is not registered: give its source_url")
            else:
                p.add(a.action_id, "model_name",
                      f"{a.model_name!r} is not registered, and no download in this pipeline fetches it")
    p.raise_if_any()
