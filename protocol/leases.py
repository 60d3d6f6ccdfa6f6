"""Leases: a copy handed out by ``ensure`` stays while its reader holds it.

Theory of operation
-------------------
``meshnode ensure MODEL --on NODE:TIER`` makes sure a verified copy of a
model is on a node and prints its path, so that a serving pod's init
container can wait for its weights and its engine can read them.  While the
pod reads the copy, the node must not evict it.  The caller therefore gets a
lease: the copy (model and tier), who holds it (``holder``: a pod's name by
default) and until when (``until_ms``, wall-clock milliseconds).  A copy
with a lease that has not ended is kept (``keep_reason``); the evictor asks
that beside the replica policy and the engines.

A lease ends on its own: the holder renews it by ensuring again before it
ends (the same holder's lease is replaced, never stacked), or gives it back
(``meshnode release``); a holder that died without either stops mattering
at ``until_ms``.  No lease is forever: ``LEASE_MAX_S`` bounds one, and a
node keeps at most ``LEASES_MAX`` (the expired ones are dropped first).

``ensure`` itself is one decision (``plan_ensure``): the copy is here
(ready: a lease and its path), or a transfer here is already making it
(wait for that one), or another node holds a complete copy (copy it from
the mesh), or the model's registration names a source outside the mesh
(fetch it, once per mesh: the transfers' own claim), or nothing can
make it (``NO_SOURCE``, saying why).

Pure: the daemon gives the time and what the catalog and the store say.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidName, LocalProtocolError, RemoteProtocolError
from .names import validate_model_name

__all__ = [
    "HOLDER_PATTERN",
    "LEASES_MAX",
    "LEASE_DEFAULT_S",
    "LEASE_MAX_S",
    "LEASE_MIN_S",
    "EnsurePlan",
    "EnsureStep",
    "InvalidLease",
    "Lease",
    "LeaseBook",
    "lease_seconds",
    "plan_ensure",
    "validate_holder",
]

LEASE_DEFAULT_S = 3600.0
LEASE_MAX_S = 7 * 24 * 3600.0
LEASE_MIN_S = 1.0
LEASES_MAX = 10_000
HOLDER_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
_HOLDER = re.compile(HOLDER_PATTERN + r"\Z")
_TIERS = ("disk", "dram")


class InvalidLease(LocalProtocolError, ValueError):
    """A lease asked with values the rules refuse; ``code`` is the error code to answer."""

    def __init__(self, message: str, code: str = "INVALID_REQUEST") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def validate_holder(holder: object) -> str:
    if not isinstance(holder, str) or _HOLDER.match(holder) is None:
        raise InvalidLease("holder: 1 to 128 letters, digits and . _ : - (a pod's name), starting with a "
                           "letter or digit")
    return holder


def lease_seconds(value: object) -> float:
    if value is None:
        return LEASE_DEFAULT_S
    if isinstance(value, bool) or not isinstance(value, int | float) or not LEASE_MIN_S <= value <= LEASE_MAX_S:
        raise InvalidLease(f"lease_s: {LEASE_MIN_S:g} to {LEASE_MAX_S:g} seconds (default {LEASE_DEFAULT_S:g})")
    return float(value)


@dataclass(frozen=True, slots=True)
class Lease:
    """``holder`` reads ``model``'s copy on ``tier`` until ``until_ms``."""

    model: str
    tier: str
    holder: str
    until_ms: int
    granted_ms: int

    @property
    def key(self) -> tuple[str, str, str]:
        return self.model, self.tier, self.holder

    def active(self, now_ms: int) -> bool:
        return now_ms < self.until_ms

    def to_value(self) -> dict[str, Any]:
        return {"model": self.model, "tier": self.tier, "holder": self.holder, "until_ms": self.until_ms,
                "granted_ms": self.granted_ms}

    @classmethod
    def from_value(cls, raw: Any) -> Lease:
        """A lease as ``to_value`` wrote it; ``RemoteProtocolError`` for anything else."""
        if not isinstance(raw, dict) or set(raw) != {"model", "tier", "holder", "until_ms", "granted_ms"}:
            raise RemoteProtocolError("a lease is {model, tier, holder, until_ms, granted_ms}")
        try:
            model = validate_model_name(raw["model"])
            holder = validate_holder(raw["holder"])
        except (InvalidName, InvalidLease) as e:
            raise RemoteProtocolError(f"a lease: {e}") from None
        if raw["tier"] not in _TIERS:
            raise RemoteProtocolError("a lease's tier is disk or dram")
        until, granted = raw["until_ms"], raw["granted_ms"]
        if type(until) is not int or type(granted) is not int or not 0 <= granted <= until < 2**63:
            raise RemoteProtocolError("a lease's times are milliseconds, granted before until")
        return cls(model, raw["tier"], holder, until, granted)


class LeaseBook:
    """The leases one node has handed out.  Every call takes ``now_ms``."""

    def __init__(self, leases: Iterable[Lease] = (), *, leases_max: int = LEASES_MAX) -> None:
        self.leases_max = leases_max
        self._by_key: dict[tuple[str, str, str], Lease] = {}
        for lease in leases:
            self._by_key[lease.key] = lease

    def __len__(self) -> int:
        return len(self._by_key)

    def grant(self, model: str, tier: str, holder: str, lease_s: object, now_ms: int) -> Lease:
        """A lease for ``holder`` (a new one, or its earlier one renewed)."""
        validate_model_name(model)
        validate_holder(holder)
        if tier not in _TIERS:
            raise InvalidLease(f"a lease is on disk or dram, not {tier[:20]!r}")
        seconds = lease_seconds(lease_s)
        lease = Lease(model, tier, holder, now_ms + round(seconds * 1000), now_ms)
        if lease.key not in self._by_key and len(self._by_key) >= self.leases_max:
            self.expire(now_ms)
            if len(self._by_key) >= self.leases_max:
                raise InvalidLease(f"this node holds {len(self._by_key)} leases, the most it keeps: release some "
                                   "(meshnode release) or let them end", "TOO_MANY_LEASES")
        self._by_key[lease.key] = lease
        return lease

    def release(self, model: str, tier: str, holder: str | None) -> list[Lease]:
        """Give back ``holder``'s lease on the copy (every holder's, with None): what ended."""
        gone = [x for x in self._by_key.values()
                if x.model == model and x.tier == tier and (holder is None or x.holder == holder)]
        for x in gone:
            del self._by_key[x.key]
        return gone

    def expire(self, now_ms: int) -> list[Lease]:
        """Drop the leases that ended: what was dropped."""
        gone = [x for x in self._by_key.values() if not x.active(now_ms)]
        for x in gone:
            del self._by_key[x.key]
        return gone

    def active(self, now_ms: int) -> list[Lease]:
        return sorted((x for x in self._by_key.values() if x.active(now_ms)), key=lambda x: x.key)

    def holding(self, model: str, tier: str, now_ms: int) -> list[Lease]:
        return [x for x in self.active(now_ms) if x.model == model and x.tier == tier]

    def keep_reason(self, model: str, tier: str, now_ms: int) -> str | None:
        """Why the copy may not be evicted now (a lease holds it), or None."""
        held = self.holding(model, tier, now_ms)
        if not held:
            return None
        last = max(held, key=lambda x: x.until_ms)
        more = f" and {len(held) - 1} more" if len(held) > 1 else ""
        return (f"leased by ensure to {last.holder}{more} for {max(0, last.until_ms - now_ms) // 1000} s more "
                "(meshnode release ends it)")

    def to_value(self) -> dict[str, Any]:
        return {"v": 1, "leases": [x.to_value() for x in sorted(self._by_key.values(), key=lambda x: x.key)]}

    @classmethod
    def from_value(cls, raw: Any, *, leases_max: int = LEASES_MAX) -> LeaseBook:
        """The book ``to_value`` wrote; the leases that do not parse are left out."""
        book = cls(leases_max=leases_max)
        items = raw.get("leases") if isinstance(raw, dict) and raw.get("v") == 1 else None
        for item in (items if isinstance(items, list) else [])[:leases_max]:
            try:
                lease = Lease.from_value(item)
            except RemoteProtocolError:
                continue
            book._by_key[lease.key] = lease
        return book


# -- ensure ------------------------------------------------------------------------------


class EnsureStep(enum.Enum):
    READY = "ready"  # the copy is here: a lease and its path
    WAIT = "copying"  # a transfer here is making it already: follow that one
    COPY = "copy"  # another node holds it: copy it from the mesh
    FETCH = "fetch"  # from its source outside the mesh (once per mesh)
    NO_SOURCE = "no_source"


@dataclass(frozen=True, slots=True)
class EnsurePlan:
    step: EnsureStep
    why: str = ""


def plan_ensure(model: str, device: str, *, here: bool, making: bool, holders: Iterable[str],
                registered: bool, source_url: str | None, web_schemes: tuple[str, ...],
                down_holders: Mapping[str, str] | None = None) -> EnsurePlan:
    """What ``ensure`` does for ``model`` on ``device`` (``node:tier``).

    ``here``: the node holds the copy on that tier; ``making``: a transfer
    there is making it; ``holders``: the nodes up that hold a complete copy
    (any tier, this node's other tier too); ``down_holders``: holders that
    cannot be reached, and their state, for the message.
    """
    if here:
        return EnsurePlan(EnsureStep.READY)
    if making:
        return EnsurePlan(EnsureStep.WAIT, "a transfer here is making it")
    up = sorted(holders)
    if up:
        return EnsurePlan(EnsureStep.COPY, f"copying it from {', '.join(up[:3])}{' ...' if len(up) > 3 else ''}")
    if source_url and source_url.startswith(web_schemes):
        return EnsurePlan(EnsureStep.FETCH, f"fetching it from {source_url[:200]}")
    down = ", ".join(f"{n} ({s})" for n, s in sorted((down_holders or {}).items())[:5])
    if not registered:
        why = f"{model!r} is not registered and no node holds a copy"
        hint = "register it with its source (meshnode register NAME --url URL) or import a bundle"
    elif down:
        why = f"every node that holds {model!r} is out of reach: {down}"
        hint = "bring one back, or import a bundle"
    else:
        why = f"no node holds a copy of {model!r} and its registration names no source to fetch it from"
        hint = "register it again with --url, or import a bundle (meshnode import)"
    return EnsurePlan(EnsureStep.NO_SOURCE, f"{why}; nothing can put it on {device}: {hint}")
