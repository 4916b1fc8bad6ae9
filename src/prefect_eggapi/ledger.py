"""The submission ledger: request fingerprint + logical key -> EggAPI task id, crash-safe.

EggAPI has no idempotency key, so "did we already pay for this?" must be answered on our side.
An entry is written *before* the POST (state ``submitting``, with an owner and a lease) and
updated right after the 202 (``submitted`` + task id). A retry, a flow retry, a rerun of the same
logical key or a restarted process finds the entry and reconnects instead of posting again; an
entry stuck in ``submitting`` whose owner died is reconciled against ``GET /v1/tasks``.

No Prefect imports. The default store is SQLite in WAL mode (safe across threads and processes on
one machine); claims are short ``BEGIN IMMEDIATE`` transactions, never held across HTTP calls.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_LEDGER_DIR = Path(".eggapi")
LEDGER_DIR_ENV = "EGGAPI_LEDGER_DIR"


class EntryState(str, Enum):
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
    updated_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    retryable: bool | None = None
    error: dict[str, Any] | None = None
    outputs: list[dict[str, Any]] = Field(default_factory=list)
    history: list[str] = Field(default_factory=list)

    @property
    def committed_spend(self) -> Decimal:
        """Money this entry holds against a budget: actual cost if known, else the estimate."""
        if self.state in (EntryState.REJECTED, EntryState.FAILED):
            return self.cost or Decimal("0")
        return self.cost if self.cost is not None else self.estimate

    def lease_expired(self, now: float | None = None) -> bool:
        return self.lease_until is None or (now or time.time()) > self.lease_until


class LedgerStore(Protocol):
    """Where entries live. ``claim`` is the only place that needs atomicity."""

    def get(self, key: str) -> LedgerEntry | None: ...

    def put(self, entry: LedgerEntry) -> None: ...

    def find_task(self, task_id: str) -> LedgerEntry | None: ...

    def known_task_ids(self) -> set[str]: ...

    def scope_spend(self, scope: str) -> Decimal: ...

    def entries(self, states: set[EntryState] | None = None) -> list[LedgerEntry]: ...

    @contextmanager
    def transaction(self) -> Iterator[None]: ...


class SQLiteLedger:
    """The default store: one SQLite file, WAL, short immediate transactions."""

    def __init__(self, path: str | Path | None = None) -> None:
        if path is None:
            path = Path(os.environ.get(LEDGER_DIR_ENV) or DEFAULT_LEDGER_DIR) / "ledger.sqlite3"
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, scope TEXT,"
                " task_id TEXT, state TEXT, data TEXT NOT NULL)"
            )
            conn.execute("CREATE INDEX IF NOT EXISTS entries_task ON entries(task_id)")
            # Every task id ever recorded, including earlier attempts of an entry that moved on.
            conn.execute("CREATE TABLE IF NOT EXISTS task_ids (task_id TEXT PRIMARY KEY, key TEXT)")
            conn.execute("CREATE INDEX IF NOT EXISTS entries_scope ON entries(scope)")

    def __repr__(self) -> str:
        return f"SQLiteLedger({str(self.path)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (SQLiteLedger, (self.path,))

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        yield conn

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Serialise read-modify-write across threads and processes (a few ms at most)."""
        with self._conn() as conn:
            if getattr(self._local, "depth", 0):
                self._local.depth += 1
                try:
                    yield
                finally:
                    self._local.depth -= 1
                return
            conn.execute("BEGIN IMMEDIATE")
            self._local.depth = 1
            try:
                yield
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")
            finally:
                self._local.depth = 0

    def get(self, key: str) -> LedgerEntry | None:
        with self._conn() as conn:
            row = conn.execute("SELECT data FROM entries WHERE key = ?", (key,)).fetchone()
        return LedgerEntry.model_validate_json(row[0]) if row else None

    def put(self, entry: LedgerEntry) -> None:
        entry.updated_at = datetime.now(timezone.utc)
        with self._conn() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO entries (key, scope, task_id, state, data)"
                " VALUES (?, ?, ?, ?, ?)",
                (entry.key, entry.scope, entry.task_id, entry.state.value, entry.model_dump_json()),
            )
            if entry.task_id:
                conn.execute(
                    "INSERT OR IGNORE INTO task_ids (task_id, key) VALUES (?, ?)",
                    (entry.task_id, entry.key),
                )

    def find_task(self, task_id: str) -> LedgerEntry | None:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT data FROM entries WHERE task_id = ? ORDER BY rowid DESC", (task_id,)
            ).fetchone()
        return LedgerEntry.model_validate_json(row[0]) if row else None

    def known_task_ids(self) -> set[str]:
        with self._conn() as conn:
            return {r[0] for r in conn.execute("SELECT task_id FROM task_ids")}

    def scope_spend(self, scope: str) -> Decimal:
        with self._conn() as conn:
            rows = conn.execute("SELECT data FROM entries WHERE scope = ?", (scope,)).fetchall()
        return sum(
            (LedgerEntry.model_validate_json(r[0]).committed_spend for r in rows), Decimal("0")
        )

    def entries(self, states: set[EntryState] | None = None) -> list[LedgerEntry]:
        with self._conn() as conn:
            rows = conn.execute("SELECT data FROM entries ORDER BY rowid").fetchall()
        out = [LedgerEntry.model_validate_json(r[0]) for r in rows]
        return [e for e in out if states is None or e.state in states]


def default_ledger() -> SQLiteLedger:
    """One store per process and path, so threads share connections per thread."""
    path = Path(os.environ.get(LEDGER_DIR_ENV) or DEFAULT_LEDGER_DIR).resolve()
    with _DEFAULTS_LOCK:
        if path not in _DEFAULTS:
            _DEFAULTS[path] = SQLiteLedger(path / "ledger.sqlite3")
        return _DEFAULTS[path]


_DEFAULTS: dict[Path, SQLiteLedger] = {}
_DEFAULTS_LOCK = threading.Lock()
