"""Where an inference request goes: by load, and to where its prefix is warm.

Theory of operation
-------------------
Every node answers ``/v1/*`` for every model served anywhere, and all of
them should send alike requests alike, without asking each other per
request.  So the decision reads only what every node has:

* the healthy services of the model, from the catalog;
* each engine's own load (requests running and waiting), which its node
  reads from the engine (vLLM's ``/metrics``, llama.cpp's ``/slots``,
  SGLang's ``/get_load``: ``parse_load``) with its health probes and
  publishes in the service's record when it changes, so it travels at the
  probe rate, like GPU figures;
* what this node itself has in flight to each service (fresh, per request).

``route`` orders the candidates.  Without an affinity key: the least loaded
first (engine load plus in flight from here), this node's own service first
among equals (no hop), then node and port, so every node breaks ties alike.
With one (a session id, or the start of a long prompt: ``affinity_key``):
the service that rendezvous hashing of the key picks first, the same on
every node, so requests sharing a prefix find its KV cache warm, unless it
is overloaded (more than ``slack`` requests above the least loaded), when
load decides.  When a service dies, rendezvous hashing moves only the keys
that were its own.  Pure: hashing is blake2b of the key and the service.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Container, Iterable, Mapping
from typing import Any

from .serving import ServiceRecord, ServiceState

__all__ = ["AFFINITY_MIN_CHARS", "PREFIX_CHARS", "SLACK", "affinity_key", "load_of", "parse_load", "route"]

PREFIX_CHARS = 256  # the start of a prompt that decides where it goes
AFFINITY_MIN_CHARS = PREFIX_CHARS  # a shorter prompt has no prefix worth a cache: load alone decides
SLACK = 4  # requests above the least loaded that a warm service may carry before load decides
LOAD_MAX = 1_000_000

_VLLM = re.compile(r"^vllm:num_requests_(running|waiting)(?:\{[^}]*\})?\s+([0-9.eE+]+)\s*$", re.M)


def _weight(key: str, rec: ServiceRecord) -> bytes:
    return hashlib.blake2b(f"{key}\0{rec.node}\0{rec.port}".encode(), digest_size=8).digest()


def load_of(rec: ServiceRecord, inflight: Mapping[tuple[str, int], int], routers: int = 1) -> int:
    """A service's load as this node sees it: what its engine last reported
    (running + waiting), and what this node has in flight to it now, which,
    until the engine's next report, stands for what each of the ``routers``
    nodes that route alike has sent it since."""
    reported = rec.load[0] + rec.load[1] if rec.load is not None else 0
    return reported + routers * inflight.get((rec.node, rec.port), 0)


def route(services: Iterable[ServiceRecord], model: str, me: str, reachable: Container[str],
          inflight: Mapping[tuple[str, int], int], key: str | None = None, slack: int = SLACK,
          draw: int | None = None, routers: int = 1) -> list[ServiceRecord]:
    """Where a request for ``model`` goes, best first: healthy services on
    reachable nodes (this node's own always counts as reachable).

    Loads are published at the probe rate, so every node reads the same
    figures, up to an interval old, and "the least loaded" alone sends every
    node's requests to one engine until its next report (``python -m sim
    routing`` measures that herd).  Two things keep it even: ``routers``
    (how many nodes route; the caller's live members) weighs what this node
    has in flight as if each of them had sent as much (``load_of``), and
    ``draw`` (a random number per request) sends a request that load decides
    to the less loaded of two services the draw picks: the power of two
    choices, which stays even on stale figures (Mitzenmacher, "How useful is
    old information?"); equals go in the draw's order.  Without a draw,
    strictly by load, this node's own service first among equals."""
    ok = [s for s in services if s.model == model and s.state is ServiceState.HEALTHY
          and (s.node == me or s.node in reachable)]
    if not ok:
        return []

    def load(s: ServiceRecord) -> int:
        return load_of(s, inflight, routers)

    by_load = sorted(ok, key=lambda s: (load(s), s.node != me, s.node, s.port))
    if key is not None:
        warm = max(ok, key=lambda s: _weight(key, s))
        if load(warm) <= load(by_load[0]) + slack:
            return [warm, *[s for s in by_load if s is not warm]]
    if draw is None or len(by_load) < 3:
        return by_load
    two = sorted(ok, key=lambda s: _weight(f"draw\0{draw}", s))[:2]
    first = two[1] if load(two[1]) < load(two[0]) else two[0]  # equals: the draw's order, not the names'
    return [first, *[s for s in by_load if s is not first]]


def affinity_key(body: Any, session: str | None) -> str | None:
    """What a request's route sticks to: its ``X-Session-Id``, else the part
    of its prompt that other requests share and an engine caches: a chat's
    messages before the last one (the system prompt, the conversation so
    far) or a completion's prompt, its first ``PREFIX_CHARS`` characters
    (requests that share them share a cached prefix at least that long);
    None (load alone decides) when that part is shorter."""
    if session:
        return "s:" + session[:256]
    if not isinstance(body, dict):
        return None
    text = ""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        text = prompt[0]
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        parts: list[str] = []
        size = 0
        for m in messages[:-1]:
            if size >= PREFIX_CHARS or not isinstance(m, dict):
                break
            content = m.get("content")
            piece = content if isinstance(content, str) else json.dumps(content, sort_keys=True)[:PREFIX_CHARS]
            parts.append(f"{m.get('role')}:{piece}")
            size += len(parts[-1])
        text = "\n".join(parts)
    if len(text) < AFFINITY_MIN_CHARS:
        return None
    return "p:" + text[:PREFIX_CHARS]


def parse_load(engine: str, text: str) -> tuple[int, int] | None:
    """An engine's load answer as ``(running, waiting)``, or None when it
    says nothing usable.  ``text``: vLLM's Prometheus ``/metrics``;
    llama.cpp's ``/slots`` (JSON, each slot processing or not); SGLang's
    ``/get_load`` (JSON).  Hostile input gives None, never an error."""
    try:
        if engine == "vllm":
            got: dict[str, float] = {}
            for m in _VLLM.finditer(text[:1_000_000]):
                got[m.group(1)] = got.get(m.group(1), 0.0) + float(m.group(2))
            if not got:
                return None
            return _bounded(got.get("running", 0.0)), _bounded(got.get("waiting", 0.0))
        doc = json.loads(text[:1_000_000])
        if engine == "llama.cpp" and isinstance(doc, list):
            busy = sum(1 for s in doc if isinstance(s, dict) and (s.get("is_processing") is True or s.get("state") == 1))
            return _bounded(busy), 0
        if engine == "sglang":
            items = doc if isinstance(doc, list) else [doc]
            total = 0.0
            for it in items:
                if isinstance(it, dict):
                    v = it.get("load", it.get("num_reqs", 0))
                    total += v if isinstance(v, int | float) and not isinstance(v, bool) else 0
            return _bounded(total), 0
    except (ValueError, RecursionError, OverflowError):
        return None
    return None


def _bounded(v: float) -> int:
    if v != v:  # NaN
        return 0
    return int(min(max(v, 0), LOAD_MAX))
