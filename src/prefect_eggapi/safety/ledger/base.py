"""The ledger's vocabulary: what an entry is, the states it moves through, the store protocol
every backend implements, and the helpers all backends share (keys, owners, conflict retry,
lane waits).

Backends (:mod:`.sqlite`, :mod:`.s3`) and the submitter depend on this module only, so a new
backend needs nothing else.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

T = TypeVar("T")

DEFAULT_LEDGER_DIR = Path(".eggapi")
LEDGER_DIR_ENV = "EGGAPI_LEDGER_DIR"
LEDGER_URI_ENV = "EGGAPI_LEDGER_URI"


class EntryState(StrEnum):
    SUBMITTING = "submitting"  # POST may be in flight; owner + lease say whether it still is
    REJECTED = "rejected"  # the API refused the POST: nothing exists, a new POST is fine
    AMBIGUOUS = "ambiguous"  # POST outcome unknown and reconciliation could not decide
    SUBMITTED = "submitted"
    COMPLETED = "completed"
    FAILED = "failed"  # the remote task failed (billed $0); see ``retryable``
    ABANDONED = "abandoned"  # we stopped waiting; it may still complete and bill
    PERSISTED = "persisted"  # outputs stored


# States in which a task exists remotely and must be reconnected to, never posted again.
LIVE_STATES = frozenset(
    {EntryState.SUBMITTED, EntryState.COMPLETED, EntryState.ABANDONED, EntryState.PERSISTED}
)
# States whose POST outcome is not known yet: their task, if any, is in nobody's index.
UNRESOLVED_STATES = frozenset({EntryState.SUBMITTING, EntryState.AMBIGUOUS})


def ledger_key(logical_key: str, fingerprint: str) -> str:
    """The same logical key with a changed request is a different piece of work."""
    return hashlib.sha256(f"{logical_key}\n{fingerprint}".encode()).hexdigest()[:32]


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str | None) -> bool:
    """True only when provably dead: same host and the pid is gone."""
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class LedgerEntry(BaseModel):
    """One logical piece of paid work and what we know about it."""

    model_config = ConfigDict(extra="ignore")

    key: str
    logical_key: str
    fingerprint: str
    scope: str = ""
    attempt: int = 1
    state: EntryState
    task_id: str | None = None
    model: str
    task_type: str
    prompt_sha256: str
    prompt: str = ""  # first 200 characters, for reports
    label: str = ""
    polls: int = 0
    estimate: Decimal = Decimal("0")
    cost: Decimal | None = None
    owner: str | None = None
    lease_until: float | None = None
    sent_at: datetime | None = None
    # When the POST gave up (timeout, 5xx, dropped): with sent_at, the window its task was made in.
    failed_at: datetime | None = None
    # Server clock minus ours when the POST was sent: a resuming process uses the same window.
    clock_offset: float | None = None
    # Server time of the newest task seen before the POST was sent: older tasks provably existed
    # before it and can never be its task.
    floor: datetime | None = None
    floor_ids: list[str] = Field(default_factory=list)  # tasks seen at ``floor`` exactly
    # Tasks this entry paid for beyond ``task_id`` (a late answer after another worker took over):
    # kept so that every billed task is explained and recovery can collect it.
    extra_tasks: list[str] = Field(default_factory=list)
    # The per-submission webhook nonces of this entry's POSTs, newest last (webhooks on only):
    # a signed delivery to ``.../s/<nonce>`` names the task that POST created, exactly.
    nonces: list[str] = Field(default_factory=list)
    spend_micros: int | None = None  # the spend marker the S3 store wrote last
    updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    retryable: bool | None = None
    error: dict[str, Any] | None = None
    outputs: list[dict[str, Any]] = Field(default_factory=list)
    history: list[str] = Field(default_factory=list)

    # The stored version this copy was read at (None: not in the store yet). ``put`` compares it.
    _version: str | None = PrivateAttr(default=None)

    @property
    def version(self) -> str | None:
        return self._version

    def at_version(self, version: str | None) -> LedgerEntry:
        """This copy as read (or last written) at ``version``: only the backends call it."""
        self._version = version
        return self

    @property
    def committed_spend(self) -> Decimal:
        """Money this entry holds against a budget: actual cost if known, else the estimate."""
        if self.state in (EntryState.REJECTED, EntryState.FAILED):
            return self.cost or Decimal("0")
        return self.cost if self.cost is not None else self.estimate

    def lease_expired(self, now: float | None = None) -> bool:
        return self.lease_until is None or (now or time.time()) > self.lease_until


class LedgerStore(Protocol):
    """Where entries live. Every ``put`` is a compare-and-swap against the version the entry was
    read at (see the module docstring); ``lane`` is the one cross-worker lease."""

    def get(self, key: str) -> LedgerEntry | None: ...

    def put(self, entry: LedgerEntry) -> None: ...

    def find_task(self, task_id: str) -> LedgerEntry | None: ...

    def known_task_ids(self) -> set[str]: ...

    def task_entry_key(self, task_id: str) -> str | None: ...

    def unresolved(self) -> list[LedgerEntry]: ...

    def scope_spend(self, scope: str) -> Decimal: ...

    def entries(self, states: set[EntryState] | None = None) -> list[LedgerEntry]: ...

    def transaction(self) -> AbstractContextManager[None]: ...

    def lane(
        self, name: str, *, width: int, owner: str, seconds: float
    ) -> AbstractContextManager[None]: ...

    def record_delivery(self, nonce: str, task_id: str) -> str: ...

    def delivered(self, nonce: str) -> str | None: ...


class DeliveryLog(Protocol):
    """Where the webhook receiver writes which task a submission's nonce was delivered for.

    First write wins and is never changed: ``record_delivery`` returns the task id on record.
    """

    def record_delivery(self, nonce: str, task_id: str) -> str: ...

    def delivered(self, nonce: str) -> str | None: ...


class LedgerConflictError(Exception):
    """Another writer changed the entry between our read and our write; re-read and retry."""


class LaneBusyError(TimeoutError):
    """A lane stayed held by live owners for longer than any POST can last."""


def lane_waits(deadline: float) -> Iterator[None]:
    """Backoff between tries for a held lane: 5 ms growing to 100 ms, jittered; raises at the
    deadline (a holder cannot live past its lease, so this means something is wrong)."""
    delay = 0.005
    while True:
        yield
        if time.monotonic() > deadline:
            raise LaneBusyError("the submit lane stayed held past every lease")
        time.sleep(delay * (0.5 + random.random()))
        delay = min(0.1, delay * 1.5)


def lane_free(owner: str | None, until: float | None) -> bool:
    return owner is None or until is None or time.time() > until or owner_is_dead(owner)


def with_conflict_retry(fn: Callable[[], T], attempts: int = 20) -> T:
    """Run a read-modify-write against the ledger, again on optimistic-concurrency conflicts."""
    for attempt in range(attempts):
        try:
            return fn()
        except LedgerConflictError:
            if attempt == attempts - 1:
                raise
            time.sleep(min(0.5, 0.01 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")
