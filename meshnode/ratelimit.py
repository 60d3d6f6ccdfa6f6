"""A token bucket for bandwidth limits, on trio's clock; and ``LogOnce``, a
bound on how often one kind of log line about one peer is written.

The data plane takes tokens per slice it sends (egress) or per read it makes
(ingress), so that moving weights never starves inference traffic on the same
links.  ``take(n)`` waits until the bucket holds ``min(n, burst_bytes)`` tokens
and then removes ``n``; a request larger than the burst leaves the bucket in
debt, which the next taker waits out, so the long-run rate holds for any slice
size.  Waiters are served in arrival order (a FIFO lock), so one large taker
cannot be overtaken forever by small ones.

Time is ``trio.current_time()``, so tests measure throughput on a MockClock
(``autojump_clock``) deterministically, without wall-clock sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass

import trio

__all__ = ["LogOnce", "TokenBucket", "TokenBucketStatistics"]


@dataclass(frozen=True, slots=True)
class TokenBucketStatistics:
    rate_bytes_per_s: float | None
    burst_bytes: int
    tokens: float
    taken_bytes: int
    waited_s: float
    waiters: int


class TokenBucket:
    """Limit a byte rate; ``rate_bytes_per_s`` of 0 or None means unlimited."""

    def __init__(self, rate_bytes_per_s: float | None, burst_bytes: int) -> None:
        if rate_bytes_per_s is not None and rate_bytes_per_s < 0:
            raise ValueError("rate_bytes_per_s must be >= 0 (0 or None: unlimited)")
        if burst_bytes <= 0:
            raise ValueError("burst_bytes must be > 0")
        self._rate: float | None = rate_bytes_per_s or None
        self._burst = int(burst_bytes)
        self._tokens: float = float(self._burst)
        self._stamp: float | None = None  # trio time of the last refill
        self._lock = trio.Lock()  # FIFO: waiters are served in arrival order
        self._waiters = 0
        self._taken_bytes = 0
        self._waited_s = 0.0

    @property
    def unlimited(self) -> bool:
        return self._rate is None

    @property
    def rate_bytes_per_s(self) -> float | None:
        return self._rate

    def set_rate(self, rate_bytes_per_s: float | None) -> None:
        """Change the rate from now on (0 or None: unlimited)."""
        if rate_bytes_per_s is not None and rate_bytes_per_s < 0:
            raise ValueError("rate_bytes_per_s must be >= 0")
        if self._rate is not None:
            self._refill()
        self._rate = rate_bytes_per_s or None
        self._stamp = None

    def _refill(self) -> None:
        now = trio.current_time()
        if self._stamp is not None and self._rate is not None:
            self._tokens = min(float(self._burst), self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    async def take(self, n: int) -> None:
        """Wait until ``n`` bytes may pass, then account for them."""
        if n < 0:
            raise ValueError("n must be >= 0")
        if self._rate is None:
            self._taken_bytes += n
            await trio.lowlevel.checkpoint()
            return
        self._waiters += 1
        try:
            async with self._lock:
                while True:
                    rate = self._rate
                    if rate is None:
                        break
                    self._refill()
                    need = min(float(n), float(self._burst)) - self._tokens
                    if need < 1.0:  # less than one byte short: float noise
                        break
                    wait_s = need / rate
                    self._waited_s += wait_s
                    await trio.sleep(wait_s)
                if self._rate is not None:
                    self._tokens -= n
                self._taken_bytes += n
        finally:
            self._waiters -= 1

    def statistics(self) -> TokenBucketStatistics:
        if self._rate is not None:
            self._refill()
        return TokenBucketStatistics(
            rate_bytes_per_s=self._rate,
            burst_bytes=self._burst,
            tokens=self._tokens,
            taken_bytes=self._taken_bytes,
            waited_s=self._waited_s,
            waiters=self._waiters,
        )


class LogOnce:
    """Whether to log a line about ``key`` now: once per ``every_s`` per key,
    so that a peer sending junk in a loop costs one line a minute, not one a
    message.  At most ``keys_max`` keys are remembered (then all are forgotten)."""

    def __init__(self, every_s: float = 60.0, keys_max: int = 10_000) -> None:
        self.every_s = every_s
        self.keys_max = keys_max
        self._last: dict[Hashable, float] = {}

    def __call__(self, key: Hashable) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last <= self.every_s:
            return False
        if len(self._last) >= self.keys_max:
            self._last.clear()
        self._last[key] = now
        return True
