"""Re-verifying the copies a node holds: which chunks to hash next, and when.

Theory of operation
-------------------
A copy that was whole when it was published can go bad where it lies: a
sector rots, a RAM tier flips a bit, a hand rewrites a file and puts its
times back.  The scrub's look at each file's stat (size, mtime, inode,
ctime) catches what a hand does through the file system; only reading the
bytes catches the rest.  So every chunk of every copy is read and checked
against its manifest's xxh3 once per *period* (``--verify-period``, a week),
and a copy a peer reported bad (it banned this node for one of its chunks)
is read *urgently*: from that chunk on, at once.

This module decides which chunks to read and when; the I/O layer reads them
(``meshnode.copies.verifier``).  Every read is paid from token buckets that
may go into debt by at most one chunk (so that a chunk larger than a bucket
is still read, whole):

- the *rate* (``--verify-rate``, bytes per second) bounds every read, the
  urgent ones too: over any window of ``w`` seconds at most
  ``rate * (w + burst_s)`` bytes plus one chunk;
- the *pace*, the copies' total bytes over the period, bounds the round
  robin, so that one round over every copy takes about one period however
  many bytes there are.  When the pace is above the rate, the rate wins and a
  round takes longer (``behind``).

The round robin walks the copies in key order, chunk by chunk, keeping a
cursor ``(key, chunk)`` the caller may save and ``restore`` after a restart,
so that a node restarted every day still reaches its last copies.  A copy
that appears, goes or is replaced (a new key) is met or missed by the cursor
like any other: while the copies stay the same, no chunk is read twice in a
round and every chunk once.

Urgent requests are bounded: at most ``urgent_max`` queued, and one copy at
most once per ``urgent_every_s`` (a peer cannot make a node read its store in
a loop).  ``decide`` serves them first, in the order they came.

Pure: ``now`` is a parameter (seconds, any monotonic origin); nothing here
reads a file or a clock.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import LocalProtocolError
from .manifest import Manifest

__all__ = [
    "BURST_S",
    "KEY_MAX_CHARS",
    "STEP_BYTES_MAX",
    "URGENT_EVERY_S",
    "URGENT_MAX",
    "Decision",
    "Step",
    "VerifySchedule",
]

BURST_S = 1.0  # seconds of rate (and of pace) a bucket holds when nothing was read
STEP_BYTES_MAX = 64 * 1024 * 1024  # one step reads at most this much (or one chunk, when larger)
URGENT_EVERY_S = 600.0  # one copy is read urgently at most once in this long
URGENT_MAX = 16  # urgent requests queued at once
URGENT_SEEN_MAX = 1024  # copies remembered for ``urgent_every_s``
KEY_MAX_CHARS = 512
_WAIT_MIN_S = 1e-3  # a wait is never shorter: a bucket just out of debt may read


@dataclass(frozen=True, slots=True)
class Step:
    """Read and check chunks ``first`` to ``first + count - 1`` of the copy ``key`` now."""

    key: str
    first: int
    count: int
    nbytes: int
    urgent: bool

    @property
    def chunks(self) -> range:
        return range(self.first, self.first + self.count)


@dataclass(frozen=True, slots=True)
class Decision:
    """A step to take now, or none and how long until one may be due
    (``math.inf``: none until the copies change or an urgent request comes)."""

    step: Step | None
    wait_s: float


@dataclass(slots=True)
class _Urgent:
    key: str
    first: int  # the chunk reported bad: read first
    done: int = 0  # chunks read so far, from ``first`` on, wrapping


class _Bucket:
    """Tokens at ``rate`` a second, at most ``rate * BURST_S``; a read may take it into debt."""

    __slots__ = ("last", "tokens")

    def __init__(self) -> None:
        self.tokens = 0.0
        self.last: float | None = None

    def refill(self, rate: float, now: float) -> None:
        if self.last is not None and now > self.last:
            self.tokens = min(rate * BURST_S, self.tokens + rate * (now - self.last))
        elif self.last is None:
            self.tokens = rate * BURST_S
        self.last = now if self.last is None else max(self.last, now)

    def wait_s(self, rate: float) -> float:
        """Seconds until the bucket is out of debt (0 when it is)."""
        return 0.0 if self.tokens >= 0 else -self.tokens / rate + _WAIT_MIN_S


class VerifySchedule:
    def __init__(self, period_s: float, rate_bps: float, *, urgent_every_s: float = URGENT_EVERY_S,
                 urgent_max: int = URGENT_MAX, step_bytes_max: int = STEP_BYTES_MAX) -> None:
        if not (period_s == 0 or 0 < period_s < math.inf):
            raise LocalProtocolError("period_s: 0 (no round robin) or a positive number of seconds")
        if not 0 < rate_bps < math.inf:
            raise LocalProtocolError("rate_bps must be a positive number of bytes per second")
        if not 0 <= urgent_every_s < math.inf or urgent_max < 0 or step_bytes_max < 1:
            raise LocalProtocolError("bad urgent or step bounds")
        self.period_s = period_s
        self.rate_bps = rate_bps
        self.urgent_every_s = urgent_every_s
        self.urgent_max = urgent_max
        self.step_bytes_max = step_bytes_max
        self._rate = _Bucket()
        self._pace = _Bucket()
        self._cursor: tuple[str, int] | None = None  # the round robin's next (copy, chunk)
        self._urgent: list[_Urgent] = []
        self._urgent_seen: dict[str, float] = {}  # key -> when its urgent request was taken
        self.rounds = 0  # round robin rounds completed (wrapped past the last copy)
        self.pace_bps = 0.0  # the round robin's pace at the last ``decide``

    # -- the round robin's place --------------------------------------------------------

    @property
    def cursor(self) -> tuple[str, int] | None:
        """Where the round robin goes on (save it; ``restore`` it after a restart)."""
        return self._cursor

    def restore(self, key: object, chunk: object) -> bool:
        """Go on from a saved cursor; a malformed one is ignored (False)."""
        if not isinstance(key, str) or len(key) > KEY_MAX_CHARS:
            return False
        if not isinstance(chunk, int) or isinstance(chunk, bool) or not 0 <= chunk < 2**62:
            return False
        self._cursor = (key, chunk)
        return True

    @property
    def behind(self) -> bool:
        """The round robin's pace is above the rate: a round takes longer than the period."""
        return self.pace_bps > self.rate_bps

    # -- urgent requests --------------------------------------------------------------------

    def urgent(self, key: str, chunk: int, now: float) -> bool:
        """Read the copy ``key`` whole, from ``chunk`` on, before the round
        robin goes on.  False (nothing queued) when the copy was asked for
        in the last ``urgent_every_s`` or the queue is full."""
        if not isinstance(key, str) or not 0 < len(key) <= KEY_MAX_CHARS:
            raise LocalProtocolError("a copy's key is a non-empty string of at most 512 characters")
        for k, t in list(self._urgent_seen.items()):
            if not now - self.urgent_every_s < t <= now:  # old (or from a clock that went back)
                del self._urgent_seen[k]
        if key in self._urgent_seen or any(u.key == key for u in self._urgent):
            return False
        if len(self._urgent) >= self.urgent_max or len(self._urgent_seen) >= URGENT_SEEN_MAX:
            return False
        first = chunk if isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 0 else 0
        self._urgent_seen[key] = now
        self._urgent.append(_Urgent(key, first))
        return True

    def pending_urgent(self) -> list[str]:
        return [u.key for u in self._urgent]

    # -- the decision ---------------------------------------------------------------------

    def decide(self, copies: Mapping[str, Manifest], now: float) -> Decision:
        """What to read now among ``copies`` (key -> manifest), or how long to wait."""
        total = sum(m.total_bytes for m in copies.values())
        self.pace_bps = total / self.period_s if self.period_s > 0 else 0.0
        self._rate.refill(self.rate_bps, now)
        self._pace.refill(self.pace_bps, now)
        while self._urgent:
            u = self._urgent[0]
            m = copies.get(u.key)
            if m is None or u.done >= m.n_chunks:
                self._urgent.pop(0)
                continue
            if self._rate.tokens < 0:
                return Decision(None, self._rate.wait_s(self.rate_bps))
            n = m.n_chunks
            at = (u.first % n + u.done) % n
            step = self._take(u.key, m, at, min(n, at + n - u.done), self._rate.tokens, urgent=True)
            u.done += step.count
            self._rate.tokens -= step.nbytes
            return Decision(step, 0.0)
        if self.pace_bps <= 0:
            return Decision(None, math.inf)
        place = self._place(copies)
        if place is None:
            return Decision(None, math.inf)
        if self._rate.tokens < 0 or self._pace.tokens < 0:
            return Decision(None, max(self._rate.wait_s(self.rate_bps), self._pace.wait_s(self.pace_bps)))
        key, at, wrapped = place
        m = copies[key]
        step = self._take(key, m, at, m.n_chunks, min(self._rate.tokens, self._pace.tokens), urgent=False)
        self._rate.tokens -= step.nbytes
        self._pace.tokens -= step.nbytes
        self._cursor = (key, at + step.count)
        self.rounds += wrapped
        return Decision(step, 0.0)

    def _place(self, copies: Mapping[str, Manifest]) -> tuple[str, int, bool] | None:
        """The round robin's next (copy, chunk), and whether getting there
        wraps past the last copy (a round ends)."""
        keys = sorted(k for k, m in copies.items() if m.n_chunks > 0)
        if not keys:
            return None
        if self._cursor is None:
            return keys[0], 0, False
        key, at = self._cursor
        m = copies.get(key)
        if m is not None and at < m.n_chunks:
            return key, at, False
        i = bisect.bisect_right(keys, key)
        if i == len(keys):
            return keys[0], 0, True
        return keys[i], 0, False

    def _take(self, key: str, m: Manifest, first: int, end: int, budget: float, *, urgent: bool) -> Step:
        """Chunks from ``first`` (always that one) while they fit ``budget`` and the step's bound."""
        limit = min(budget, self.step_bytes_max)
        nbytes, i = 0, first
        while i < end:
            length = m.chunk(i).length
            if i > first and nbytes + length > limit:
                break
            nbytes += length
            i += 1
        return Step(key, first, i - first, nbytes, urgent)

    def statistics(self) -> dict[str, object]:
        return {"rounds": self.rounds, "pace_bps": self.pace_bps, "rate_bps": self.rate_bps,
                "behind": self.behind, "urgent": len(self._urgent), "cursor": self._cursor}
