"""The API's edge rules on a live request: the ``Host`` and ``Origin`` and
body-type rules of ``protocol.httpguard``, and the rate of writes per
client.  The decisions are the protocol's; this module reads the request's
headers and the clock, and turns a refusal into a ``MeshError``."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from protocol.httpguard import HostPolicy, WriteLimiter, check_request, is_write, limit_key

from ..errors import MeshError
from ..ratelimit import LogOnce

__all__ = ["ApiGuard"]

log = logging.getLogger("meshnode.api")


class HeaderGetter(Protocol):
    """A request's headers (werkzeug's ``Headers``, a dict): case-insensitive ``get``."""

    def get(self, key: str) -> str | None: ...

BURST_PER_RATE = 10  # a client may write this many seconds' worth at once
INFERENCE_PREFIX = "/v1/"  # inference is not a write to the mesh: its engines bound it


@dataclass
class ApiGuard:
    """What a node answers (``policy``) and how fast one client may write
    (``limiter``; None: unlimited).  ``tokens``: whether the node has API
    tokens (then a client is its token, else its address)."""

    policy: HostPolicy = field(default_factory=HostPolicy)
    limiter: WriteLimiter | None = None
    tokens: bool = False
    clock: Callable[[], float] = time.monotonic
    _log_once: LogOnce = field(default_factory=LogOnce)

    @classmethod
    def of(cls, names: tuple[str, ...], http_hosts: tuple[str, ...], api_tokens: tuple[str, ...],
           write_rate: float) -> ApiGuard:
        """From the configuration: the ``Host`` rule holds on a node without
        API tokens (a rebinding page has no token), or when the operator
        lists names (``--http-hosts``)."""
        policy = HostPolicy.of(names, enforce=not api_tokens or bool(http_hosts))
        limiter = WriteLimiter(write_rate, max(1.0, BURST_PER_RATE * write_rate)) if write_rate > 0 else None
        return cls(policy, limiter, bool(api_tokens))

    def check(self, method: str, path: str, headers: HeaderGetter, scheme: str, remote: str) -> None:
        """Raise the ``MeshError`` a request gets from the Host, Origin and body-type rules, if any."""
        refusal = check_request(method, path, host=headers.get("host"), origin=headers.get("origin"),
                                content_type=headers.get("content-type"), scheme=scheme, policy=self.policy)
        if refusal is not None:
            if self._log_once((remote, refusal.code)):
                log.warning("refused %s %s from %s: %s", method, path[:100], remote, refusal.message)
            raise MeshError(refusal.code, refusal.message)

    def limit(self, method: str, path: str, authorization: str | None, remote: str) -> None:
        """Take one write for the client; ``MeshError(RATE_LIMITED)`` with
        ``retry_after_s`` when it has none left.  Call it once the client's
        token has been checked."""
        if self.limiter is None or not is_write(method, path) or path.startswith(INFERENCE_PREFIX):
            return
        token = None
        if self.tokens and authorization and authorization.startswith("Bearer "):
            token = authorization[len("Bearer "):].strip()
        wait_s = self.limiter.take(limit_key(token, remote), self.clock())
        if wait_s > 0:
            retry_s = max(1, math.ceil(wait_s))
            if self._log_once((remote, "RATE_LIMITED")):
                log.warning("rate limited writes from %s (%s)", remote, "a token" if token else "no token")
            raise MeshError("RATE_LIMITED", f"too many writes: at most {self.limiter.rate_per_s:g} a second "
                                            f"(--write-rate), in bursts of {self.limiter.burst:g}; retry in "
                                            f"{retry_s} s", details={"retry_after_s": retry_s})
