"""The emulator's records: a task, a usage line, a key's live balance, the rate limiter.

Plain values with their JSON shapes (the G3 style of ``docs/eggapi-api.md``); the state machine
that changes them is :class:`~.state.EmulatorState`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from .config import ApiKeyConfig
from .validation import GenerateRequest

__all__ = [
    "COMPLETED",
    "FAILED",
    "PENDING",
    "PROCESSING",
    "TERMINAL",
    "ApiError",
    "KeyState",
    "RateLimiter",
    "Task",
    "UsageRecord",
    "money",
    "rfc3339",
]

PENDING = "pending"
PROCESSING = "processing"
COMPLETED = "completed"
FAILED = "failed"
TERMINAL = frozenset({COMPLETED, FAILED})


def rfc3339(ts: float) -> str:
    """UTC RFC 3339 with ``Z`` and no fraction (assumption 17.8)."""
    return datetime.fromtimestamp(int(ts), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def money(value: Decimal) -> str:
    """``"$%.4f"``: the completed-task and usage cost format."""
    return f"${value:.4f}"


class ApiError(Exception):
    """An API error answered with the standard envelope."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class Task:
    id: str
    api_key: str
    request: GenerateRequest
    seq: int
    created_at: float
    unit_price: Decimal
    width: int
    height: int
    status: str = PENDING
    started_at: float | None = None
    completed_at: float | None = None
    error: str | None = None
    num_images: int | None = None
    cost: Decimal | None = None
    output_base: str | None = None
    planned_error: str | None = None
    planned_empty: bool = False
    manual: bool = False
    due: float | None = None
    faults: list[str] = field(default_factory=list)
    # Edit inputs (fetched while processing): sha256s, compact copy of the first, or the error.
    sources: list[str] = field(default_factory=list)
    source_image: bytes | None = None
    input_error: str | None = None
    input_fetches: list[dict[str, Any]] = field(default_factory=list)
    inputs_job: asyncio.Task[None] | None = None
    inputs_ready: bool = False
    awaiting_inputs: bool = False

    @property
    def inputs_pending(self) -> bool:
        return self.inputs_job is not None and not self.inputs_ready

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def type(self) -> str:
        return self.request.task_type

    def urls(self, base: str) -> list[str]:
        root = (self.output_base or base).rstrip("/")
        return [f"{root}/images/{self.id}/{i}.png" for i in range(self.num_images or 0)]

    def to_json(self, base: str) -> dict[str, Any]:
        """The task object in the G3 style: keys appear only once they apply (17.7)."""
        data: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "model": self.model,
            "type": self.type,
        }
        if self.status == COMPLETED:
            urls = self.urls(base)
            data["output"] = {"url": urls[0] if urls else "", "urls": urls}
        if self.status == FAILED:
            data["error"] = self.error or "Task failed"
        if self.status == COMPLETED and self.cost is not None:
            data["cost"] = money(self.cost)
        else:
            data["cost"] = "$0.00"
        data["created_at"] = rfc3339(self.created_at)
        if self.started_at is not None:
            data["started_at"] = rfc3339(self.started_at)
        if self.completed_at is not None:
            data["completed_at"] = rfc3339(self.completed_at)
        return data


@dataclass
class UsageRecord:
    task_id: str
    api_key: str
    model: str
    type: str
    units: int
    cost: Decimal
    created_at: float
    seq: int

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "model": self.model,
            "type": self.type,
            "units": self.units,
            "cost": money(self.cost),
            "created_at": rfc3339(self.created_at),
        }


class RateLimiter:
    """Per-key token bucket: ``rate`` tokens per second, at most ``burst`` stored."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def reset(self) -> None:
        self._buckets.clear()

    def allow(self, api_key: str, rate: float | None, burst: int) -> bool:
        if not rate:
            return True
        now = self._clock()
        tokens, last = self._buckets.get(api_key, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[api_key] = (tokens - 1.0, now)
            return True
        self._buckets[api_key] = (tokens, now)
        return False


@dataclass
class KeyState:
    config: ApiKeyConfig
    balance: Decimal
