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
import random
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

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
    updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
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


class LedgerConflictError(Exception):
    """Another writer changed the entry between our read and our write; re-read and retry."""


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
        entry.updated_at = datetime.now(UTC)
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


class S3Ledger:
    """Entries as JSON objects in a bucket, shared by every worker on every machine.

    Writes are compare-and-swap (``If-Match`` on the ETag read in the same transaction, or
    ``If-None-Match: *`` for a new entry), so two workers claiming the same work cannot both win:
    the loser gets :class:`LedgerConflictError` and re-plans. Per-scope spend is kept in marker
    object *names* (``spend/<scope>/<key>.<micro-dollars>``) so one LIST sums a budget.
    """

    def __init__(self, s3_client: S3Client, bucket: str, prefix: str = "eggapi/ledger") -> None:
        self._s3 = s3_client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"S3Ledger(s3://{self.bucket}/{self.prefix})"

    # -- keys ----------------------------------------------------------------------------------

    def _entry_key(self, key: str) -> str:
        return f"{self.prefix}/entries/{key}.json"

    def _task_key(self, task_id: str) -> str:
        return f"{self.prefix}/tasks/{task_id}"

    def _spend_prefix(self, scope: str) -> str:
        return f"{self.prefix}/spend/{hashlib.sha256(scope.encode()).hexdigest()[:32]}/"

    def _list(self, prefix: str) -> Iterator[str]:
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"]

    # -- transactions: remember what we read, write only if unchanged -----------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        outer = getattr(self._local, "seen", None)
        if outer is None:
            self._local.seen = {}
        try:
            yield
        finally:
            if outer is None:
                self._local.seen = None

    def _read(self, object_key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        try:
            obj = self._s3.get_object(Bucket=self.bucket, Key=object_key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return obj["Body"].read(), obj["ETag"]

    def get(self, key: str) -> LedgerEntry | None:
        found = self._read(self._entry_key(key))
        seen = getattr(self._local, "seen", None)
        if seen is not None:
            seen[key] = found[1] if found else None
        return LedgerEntry.model_validate_json(found[0]) if found else None

    def put(self, entry: LedgerEntry) -> None:
        from botocore.exceptions import ClientError

        entry.updated_at = datetime.now(UTC)
        seen = getattr(self._local, "seen", None)
        condition: dict[str, str] = {}
        if seen is not None and entry.key in seen:
            etag = seen[entry.key]
            condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            result = self._s3.put_object(
                Bucket=self.bucket,
                Key=self._entry_key(entry.key),
                Body=entry.model_dump_json().encode(),
                ContentType="application/json",
                **condition,  # type: ignore[arg-type]
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise LedgerConflictError(entry.key) from exc
            raise
        if seen is not None:
            seen[entry.key] = result["ETag"]
        if entry.task_id:
            self._s3.put_object(
                Bucket=self.bucket, Key=self._task_key(entry.task_id), Body=entry.key.encode()
            )
        self._write_spend(entry)

    def _write_spend(self, entry: LedgerEntry) -> None:
        if not entry.scope:
            return
        prefix = f"{self._spend_prefix(entry.scope)}{entry.key}."
        micros = int(entry.committed_spend * 1_000_000)
        marker = f"{prefix}{micros}"
        stale = [k for k in self._list(prefix) if k != marker]
        self._s3.put_object(Bucket=self.bucket, Key=marker, Body=b"")
        for old in stale:
            self._s3.delete_object(Bucket=self.bucket, Key=old)

    def find_task(self, task_id: str) -> LedgerEntry | None:
        found = self._read(self._task_key(task_id))
        return self.get(found[0].decode()) if found else None

    def known_task_ids(self) -> set[str]:
        base = f"{self.prefix}/tasks/"
        return {k[len(base) :] for k in self._list(base)}

    def scope_spend(self, scope: str) -> Decimal:
        total = Decimal(0)
        for key in self._list(self._spend_prefix(scope)):
            total += Decimal(int(key.rsplit(".", 1)[1])) / 1_000_000
        return total

    def entries(self, states: set[EntryState] | None = None) -> list[LedgerEntry]:
        out = []
        for object_key in self._list(f"{self.prefix}/entries/"):
            found = self._read(object_key)
            if found:
                entry = LedgerEntry.model_validate_json(found[0])
                if states is None or entry.state in states:
                    out.append(entry)
        return out


def default_ledger() -> LedgerStore:
    """The store named by ``EGGAPI_LEDGER_URI`` (``s3://bucket/prefix`` to share it across
    machines), else SQLite under ``EGGAPI_LEDGER_DIR`` (default ``./.eggapi``). One instance
    per process and location, so threads reuse connections.
    """
    uri = os.environ.get(LEDGER_URI_ENV, "").strip()
    if uri:
        if not uri.startswith("s3://") or len(uri) <= len("s3://"):
            raise ValueError(f"{LEDGER_URI_ENV} must look like s3://bucket/prefix, got {uri!r}")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        ident: str | Path = uri
    else:
        ident = Path(os.environ.get(LEDGER_DIR_ENV) or DEFAULT_LEDGER_DIR).resolve()
    with _DEFAULTS_LOCK:
        if ident not in _DEFAULTS:
            if isinstance(ident, Path):
                _DEFAULTS[ident] = SQLiteLedger(ident / "ledger.sqlite3")
            else:
                from prefect_eggapi.storage import S3Settings, build_s3_client

                client = build_s3_client(S3Settings.from_env(bucket=bucket))
                _DEFAULTS[ident] = S3Ledger(client, bucket, prefix or "eggapi/ledger")
        return _DEFAULTS[ident]


_DEFAULTS: dict[str | Path, LedgerStore] = {}
_DEFAULTS_LOCK = threading.Lock()
