"""A request-rate limit shared by every worker, on Prefect global concurrency limits.

One client's token bucket keeps one process under the account's rate; many workers on many
machines need a shared counter. Prefect's global concurrency limits with slot decay are exactly
that. Slots are taken in small batches so the Prefect API sees one call per few EggAPI requests.
"""

from __future__ import annotations

import asyncio
import threading

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import rate_limit
from prefect.exceptions import ObjectNotFound


def ensure_global_rate_limit(
    name: str, requests_per_second: float, burst: int | None = None
) -> None:
    """Create (or reset) the limit ``name``: at most ``burst`` requests at once (default: one
    second's worth), refilled at ``requests_per_second``."""
    if requests_per_second <= 0:
        raise ValueError("requests_per_second must be > 0")
    limit = burst if burst is not None else max(1, int(requests_per_second))
    if limit < 1:
        raise ValueError("burst must be >= 1")
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            existing = None
        if existing is not None:
            client.delete_global_concurrency_limit_by_name(name)
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(
                name=name, limit=limit, slot_decay_per_second=requests_per_second, active=True
            )
        )


class GlobalRateLimiter:
    """Draws request slots from the Prefect global concurrency limit ``name``, ``batch`` at a time.

    The limit must exist with a slot decay (see :func:`ensure_global_rate_limit`); a missing one
    is an error rather than silently unlimited.
    """

    def __init__(self, name: str, batch: int = 4, timeout_seconds: float | None = 300) -> None:
        if batch < 1:
            raise ValueError("batch must be >= 1")
        self.name = name
        self.batch = batch
        self.timeout_seconds = timeout_seconds
        self._tokens = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"GlobalRateLimiter({self.name!r}, batch={self.batch})"

    def acquire(self) -> None:
        with self._lock:
            if self._tokens == 0:
                rate_limit(
                    self.name, occupy=self.batch, timeout_seconds=self.timeout_seconds, strict=True
                )
                self._tokens = self.batch
            self._tokens -= 1

    async def aacquire(self) -> None:
        await asyncio.to_thread(self.acquire)
