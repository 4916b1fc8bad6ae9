"""A token bucket shared by every request a client makes, sync or async.

Hundreds of concurrent waits polling on their own would trip the account's rate limit (429 storms
are a top complaint against peers); one bucket per client keeps the sum under the limit. Slots are
reserved under a lock and slept for outside it, so threads and coroutines share one bucket.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Protocol


class RateLimiter:
    """At most ``rate`` requests per second on average, bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: int | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0 requests per second")
        self.rate = float(rate)
        self.burst = max(1, int(burst if burst is not None else max(1, rate)))
        self._lock = threading.Lock()
        self._tokens = float(self.burst)
        self._updated = time.monotonic()

    def __repr__(self) -> str:
        return f"RateLimiter(rate={self.rate}, burst={self.burst})"

    def slow_to(self, rate: float) -> None:
        """Lower the rate (never raise it): the account's most careful setting wins."""
        if rate <= 0:
            raise ValueError("rate must be > 0 requests per second")
        with self._lock:
            if rate < self.rate:
                self.rate = float(rate)
                self.burst = min(self.burst, max(1, int(rate)))
                self._tokens = min(self._tokens, float(self.burst))

    def reserve(self) -> float:
        """Take one slot; return how long the caller must wait before using it."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
            self._tokens -= 1.0
            if self._tokens >= 0:
                return 0.0
            return -self._tokens / self.rate

    def acquire(self) -> None:
        delay = self.reserve()
        if delay > 0:
            time.sleep(delay)

    async def aacquire(self) -> None:
        delay = self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)


class Limiter(Protocol):
    """What a client needs from a limiter: one slot per request, sync or async."""

    def acquire(self) -> None: ...

    async def aacquire(self) -> None: ...


class CombinedLimiter:
    """All of several limiters, e.g. this process's bucket plus a limit shared by all workers."""

    def __init__(self, *limiters: Limiter) -> None:
        self.limiters = limiters

    def __repr__(self) -> str:
        return f"CombinedLimiter{self.limiters!r}"

    def acquire(self) -> None:
        for limiter in self.limiters:
            limiter.acquire()

    async def aacquire(self) -> None:
        for limiter in self.limiters:
            await limiter.aacquire()
