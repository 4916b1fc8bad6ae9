"""The submission ledger: request fingerprint + logical key -> EggAPI task id, crash-safe.

EggAPI has no idempotency key, so "did we already pay for this?" must be answered on our side.
An entry is written *before* the POST (state ``submitting``, with an owner and a lease) and
updated right after the 202 (``submitted`` + task id). A retry, a flow retry, a rerun of the same
logical key or a restarted process finds the entry and reconnects instead of posting again; an
entry stuck in ``submitting`` whose owner died is reconciled against ``GET /v1/tasks``.

**Every write is a compare-and-swap.** An entry read from a store carries the version it was
read at; :meth:`LedgerStore.put` writes only if the stored entry is still that version (a new
entry only if none exists) and raises :class:`LedgerConflictError` otherwise. So no path can
overwrite what another worker recorded without having read it: the loser re-reads and re-plans.

**Lanes.** :meth:`LedgerStore.lane` is a lease shared by every worker of the ledger: the
submitter holds the lane of (account, model, type) from just before a POST until its answer is
recorded, so across all workers at most ``width`` POSTs of one lane have an unknown outcome at a
time (the task list shows no prompt; two lost answers in one window could not be told apart).

No Prefect imports. The default store is SQLite in WAL mode (safe across threads and processes on
one machine); claims are short ``BEGIN IMMEDIATE`` transactions, never held across HTTP calls.
Where runs can move between machines or containers, use the S3 store beside the outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from prefect_eggapi.client.registry import Registry
from prefect_eggapi.storage import S3Settings, build_s3_client, put_if, read_object

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from prefect_eggapi.storage import OutputStore

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


def _lane_waits(deadline: float) -> Iterator[None]:
    """Backoff between tries for a held lane: 5 ms growing to 100 ms, jittered; raises at the
    deadline (a holder cannot live past its lease, so this means something is wrong)."""
    delay = 0.005
    while True:
        yield
        if time.monotonic() > deadline:
            raise LaneBusyError("the submit lane stayed held past every lease")
        time.sleep(delay * (0.5 + random.random()))
        delay = min(0.1, delay * 1.5)


def _lane_free(owner: str | None, until: float | None) -> bool:
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


class SQLiteLedger:
    """The default store: one SQLite file, WAL, short immediate transactions.

    ``version`` is a counter per row: an update matches ``WHERE version = ?`` and an insert
    fails if the key exists, so a stale copy can never overwrite a newer entry.
    """

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
                " task_id TEXT, state TEXT, data TEXT NOT NULL, version INTEGER NOT NULL DEFAULT 1)"
            )
            columns = {row[1] for row in conn.execute("PRAGMA table_info(entries)")}
            if "version" not in columns:  # a ledger written by 0.1.0
                with contextlib.suppress(sqlite3.OperationalError):  # a concurrent migration
                    conn.execute(
                        "ALTER TABLE entries ADD COLUMN version INTEGER NOT NULL DEFAULT 1"
                    )
            conn.execute("CREATE INDEX IF NOT EXISTS entries_task ON entries(task_id)")
            # Every task id ever recorded, including earlier attempts of an entry that moved on.
            conn.execute("CREATE TABLE IF NOT EXISTS task_ids (task_id TEXT PRIMARY KEY, key TEXT)")
            conn.execute("CREATE INDEX IF NOT EXISTS entries_scope ON entries(scope)")
            conn.execute("CREATE INDEX IF NOT EXISTS entries_state ON entries(state)")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS lanes (name TEXT, slot INTEGER, owner TEXT,"
                " until REAL, PRIMARY KEY (name, slot))"
            )
            conn.execute(
                "CREATE TABLE IF NOT EXISTS deliveries (nonce TEXT PRIMARY KEY,"
                " task_id TEXT NOT NULL, received_at REAL NOT NULL)"
            )

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

    @staticmethod
    def _load(data: str, version: int) -> LedgerEntry:
        entry = LedgerEntry.model_validate_json(data)
        entry._version = str(version)
        return entry

    def get(self, key: str) -> LedgerEntry | None:
        with self._conn() as conn:
            row = conn.execute("SELECT data, version FROM entries WHERE key = ?", (key,)).fetchone()
        return self._load(*row) if row else None

    def put(self, entry: LedgerEntry) -> None:
        entry.updated_at = datetime.now(UTC)
        data = entry.model_dump_json()
        with self.transaction(), self._conn() as conn:
            if entry.version is None:
                try:
                    conn.execute(
                        "INSERT INTO entries (key, scope, task_id, state, data, version)"
                        " VALUES (?, ?, ?, ?, ?, 1)",
                        (entry.key, entry.scope, entry.task_id, entry.state.value, data),
                    )
                except sqlite3.IntegrityError:
                    raise LedgerConflictError(entry.key) from None
                new_version = 1
            else:
                new_version = int(entry.version) + 1
                changed = conn.execute(
                    "UPDATE entries SET scope = ?, task_id = ?, state = ?, data = ?, version = ?"
                    " WHERE key = ? AND version = ?",
                    (
                        entry.scope,
                        entry.task_id,
                        entry.state.value,
                        data,
                        new_version,
                        entry.key,
                        int(entry.version),
                    ),
                ).rowcount
                if changed != 1:
                    raise LedgerConflictError(entry.key)
            for task_id in filter(None, [entry.task_id, *entry.extra_tasks]):
                conn.execute(
                    "INSERT OR IGNORE INTO task_ids (task_id, key) VALUES (?, ?)",
                    (task_id, entry.key),
                )
        entry._version = str(new_version)

    def find_task(self, task_id: str) -> LedgerEntry | None:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT data, version FROM entries WHERE task_id = ? ORDER BY rowid DESC",
                (task_id,),
            ).fetchone()
        return self._load(*row) if row else None

    def known_task_ids(self) -> set[str]:
        with self._conn() as conn:
            return {r[0] for r in conn.execute("SELECT task_id FROM task_ids")}

    def task_entry_key(self, task_id: str) -> str | None:
        """The entry a task id is indexed to (None: not indexed)."""
        with self._conn() as conn:
            row = conn.execute("SELECT key FROM task_ids WHERE task_id = ?", (task_id,)).fetchone()
        return str(row[0]) if row else None

    def unresolved(self) -> list[LedgerEntry]:
        states = tuple(s.value for s in UNRESOLVED_STATES)
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT data, version FROM entries WHERE state IN (?, ?)", states
            ).fetchall()
        return [self._load(*r) for r in rows]

    def scope_spend(self, scope: str) -> Decimal:
        with self._conn() as conn:
            rows = conn.execute("SELECT data FROM entries WHERE scope = ?", (scope,)).fetchall()
        return sum(
            (LedgerEntry.model_validate_json(r[0]).committed_spend for r in rows), Decimal("0")
        )

    def entries(self, states: set[EntryState] | None = None) -> list[LedgerEntry]:
        with self._conn() as conn:
            rows = conn.execute("SELECT data, version FROM entries ORDER BY rowid").fetchall()
        out = [self._load(*r) for r in rows]
        return [e for e in out if states is None or e.state in states]

    @contextmanager
    def lane(self, name: str, *, width: int, owner: str, seconds: float) -> Iterator[None]:
        slot = None
        for _ in _lane_waits(time.monotonic() + 3 * seconds):
            with self.transaction(), self._conn() as conn:
                held = dict(
                    (row[0], (row[1], row[2]))
                    for row in conn.execute(
                        "SELECT slot, owner, until FROM lanes WHERE name = ?", (name,)
                    )
                )
                for candidate in range(width):
                    if _lane_free(*held.get(candidate, (None, None))):
                        conn.execute(
                            "INSERT OR REPLACE INTO lanes (name, slot, owner, until)"
                            " VALUES (?, ?, ?, ?)",
                            (name, candidate, owner, time.time() + seconds),
                        )
                        slot = candidate
                        break
            if slot is not None:
                break
        try:
            yield
        finally:
            with self._conn() as conn:
                conn.execute(
                    "DELETE FROM lanes WHERE name = ? AND slot = ? AND owner = ?",
                    (name, slot, owner),
                )

    def record_delivery(self, nonce: str, task_id: str) -> str:
        with self.transaction(), self._conn() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO deliveries (nonce, task_id, received_at) VALUES (?, ?, ?)",
                (nonce, task_id, time.time()),
            )
        recorded = self.delivered(nonce)
        assert recorded is not None
        return recorded

    def delivered(self, nonce: str) -> str | None:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT task_id FROM deliveries WHERE nonce = ?", (nonce,)
            ).fetchone()
        return str(row[0]) if row else None


class S3Ledger:
    """Entries as JSON objects in a bucket, shared by every worker on every machine.

    Every write is conditional: ``If-Match`` on the ETag the entry was read (or last written)
    at, ``If-None-Match: *`` for a new entry; the loser of a race gets
    :class:`LedgerConflictError` and re-plans. Around each entry: ``tasks/<id>`` names its entry
    (written before the entry, so a recorded task is never missing from the index);
    ``unresolved/<key>`` marks entries whose POST outcome is open; per-scope spend is kept in
    marker object *names* (``spend/<scope>/<key>.<micro-dollars>``) so one LIST sums a budget;
    ``lanes/<name>/<slot>.json`` are the cross-worker submit leases; ``deliveries/<nonce>``
    names the task a webhook was delivered for (written once, by the receiver).
    """

    def __init__(self, s3_client: S3Client, bucket: str, prefix: str = "eggapi/ledger") -> None:
        self._s3 = s3_client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def __repr__(self) -> str:
        return f"S3Ledger(s3://{self.bucket}/{self.prefix})"

    # -- keys ----------------------------------------------------------------------------------

    def _entry_key(self, key: str) -> str:
        return f"{self.prefix}/entries/{key}.json"

    def _task_key(self, task_id: str) -> str:
        return f"{self.prefix}/tasks/{task_id}"

    def _unresolved_key(self, key: str) -> str:
        return f"{self.prefix}/unresolved/{key}"

    def _spend_prefix(self, scope: str) -> str:
        return f"{self.prefix}/spend/{hashlib.sha256(scope.encode()).hexdigest()[:32]}/"

    def _lane_key(self, name: str, slot: int) -> str:
        return f"{self.prefix}/lanes/{hashlib.sha256(name.encode()).hexdigest()[:32]}/{slot}.json"

    def _delivery_key(self, nonce: str) -> str:
        return f"{self.prefix}/deliveries/{nonce}"

    def _list(self, prefix: str) -> Iterator[str]:
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"]

    # -- conditional reads and writes ----------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Nothing to hold: every put is conditional on the version its entry was read at."""
        yield

    def _read(self, object_key: str) -> tuple[bytes, str] | None:
        return read_object(self._s3, self.bucket, object_key)

    def _put_if(self, object_key: str, body: bytes, version: str | None) -> str:
        """Write only over ``version`` (None: only if absent); the new ETag, or a conflict."""
        etag = put_if(self._s3, self.bucket, object_key, body, version)
        if etag is None:
            raise LedgerConflictError(object_key)
        return etag

    def _load(self, object_key: str) -> LedgerEntry | None:
        found = self._read(object_key)
        if found is None:
            return None
        entry = LedgerEntry.model_validate_json(found[0])
        entry._version = found[1]
        return entry

    def get(self, key: str) -> LedgerEntry | None:
        return self._load(self._entry_key(key))

    def put(self, entry: LedgerEntry) -> None:
        entry.updated_at = datetime.now(UTC)
        for task_id in filter(None, [entry.task_id, *entry.extra_tasks]):
            self._s3.put_object(
                Bucket=self.bucket, Key=self._task_key(task_id), Body=entry.key.encode()
            )
        open_outcome = entry.state in UNRESOLVED_STATES
        if open_outcome:
            self._s3.put_object(Bucket=self.bucket, Key=self._unresolved_key(entry.key), Body=b"")
        old_micros = entry.spend_micros
        entry.spend_micros = int(entry.committed_spend * 1_000_000) if entry.scope else None
        try:
            entry._version = self._put_if(
                self._entry_key(entry.key), entry.model_dump_json().encode(), entry.version
            )
        except LedgerConflictError:
            entry.spend_micros = old_micros
            raise
        if not open_outcome:
            self._s3.delete_object(Bucket=self.bucket, Key=self._unresolved_key(entry.key))
        self._write_spend(entry, old_micros)

    def _write_spend(self, entry: LedgerEntry, old_micros: int | None) -> None:
        if not entry.scope or entry.spend_micros == old_micros:
            return
        prefix = f"{self._spend_prefix(entry.scope)}{entry.key}."
        self._s3.put_object(Bucket=self.bucket, Key=f"{prefix}{entry.spend_micros}", Body=b"")
        if old_micros is not None:
            self._s3.delete_object(Bucket=self.bucket, Key=f"{prefix}{old_micros}")

    def find_task(self, task_id: str) -> LedgerEntry | None:
        found = self._read(self._task_key(task_id))
        return self.get(found[0].decode()) if found else None

    def known_task_ids(self) -> set[str]:
        base = f"{self.prefix}/tasks/"
        return {k[len(base) :] for k in self._list(base)}

    def task_entry_key(self, task_id: str) -> str | None:
        """The entry a task id is indexed to (None: not indexed). The index is written before
        the entry, so a writer killed in between leaves its task indexed to an entry that does
        not record it yet: that task is still the entry's own."""
        found = self._read(self._task_key(task_id))
        return found[0].decode() if found else None

    def unresolved(self) -> list[LedgerEntry]:
        base = f"{self.prefix}/unresolved/"
        out = []
        for object_key in self._list(base):
            entry = self.get(object_key[len(base) :])
            if entry is not None and entry.state in UNRESOLVED_STATES:
                out.append(entry)
        return out

    def scope_spend(self, scope: str) -> Decimal:
        """Sum of the markers; an entry caught between writing its new marker and deleting the
        old one counts once (its newest marker)."""
        newest: dict[str, int] = {}
        for key in self._list(self._spend_prefix(scope)):
            name, _, micros = key.rsplit("/", 1)[1].rpartition(".")
            newest[name] = int(micros) if name not in newest else max(newest[name], int(micros))
        return Decimal(sum(newest.values())) / 1_000_000

    def entries(self, states: set[EntryState] | None = None) -> list[LedgerEntry]:
        out = []
        for object_key in self._list(f"{self.prefix}/entries/"):
            entry = self._load(object_key)
            if entry is not None and (states is None or entry.state in states):
                out.append(entry)
        return out

    @contextmanager
    def lane(self, name: str, *, width: int, owner: str, seconds: float) -> Iterator[None]:
        held: tuple[str, str] | None = None
        for _ in _lane_waits(time.monotonic() + 3 * seconds):
            for slot in range(width):
                object_key = self._lane_key(name, slot)
                found = self._read(object_key)
                if found is not None:
                    state = json.loads(found[0])
                    if not _lane_free(state.get("owner"), state.get("until")):
                        continue
                body = json.dumps({"owner": owner, "until": time.time() + seconds}).encode()
                try:
                    held = (object_key, self._put_if(object_key, body, found[1] if found else None))
                except LedgerConflictError:
                    continue  # another worker took this slot first
                break
            if held is not None:
                break
        assert held is not None
        try:
            yield
        finally:
            # Free it only if it is still ours (after a lease ran out, someone else may hold it).
            with contextlib.suppress(LedgerConflictError):
                self._put_if(held[0], json.dumps({"owner": None}).encode(), held[1])

    def record_delivery(self, nonce: str, task_id: str) -> str:
        with contextlib.suppress(LedgerConflictError):
            self._put_if(self._delivery_key(nonce), task_id.encode(), None)
            return task_id
        recorded = self.delivered(nonce)
        assert recorded is not None
        return recorded

    def delivered(self, nonce: str) -> str | None:
        found = self._read(self._delivery_key(nonce))
        return found[0].decode() if found else None


def default_ledger(beside: OutputStore | None = None) -> LedgerStore:
    """The ledger this configuration names, one instance per process and location.

    In order: ``EGGAPI_LEDGER_URI`` (``s3://bucket/prefix``, shared by every machine);
    ``EGGAPI_LEDGER_DIR`` (SQLite, one machine); with outputs going to S3 (``beside``) and
    nothing else configured, ``{prefix}/ledger`` in the outputs' bucket, so that a run retried in
    a fresh container (no local files) finds what it paid for; else SQLite in ``./.eggapi``.
    """
    uri = os.environ.get(LEDGER_URI_ENV, "").strip()
    directory = os.environ.get(LEDGER_DIR_ENV, "").strip()
    if uri:
        if not uri.startswith("s3://") or len(uri) <= len("s3://"):
            raise ValueError(f"{LEDGER_URI_ENV} must look like s3://bucket/prefix, got {uri!r}")
        return ledger_at(uri)
    if not directory and beside is not None:
        prefix = "/".join(p for p in (beside.prefix, "ledger") if p)
        ident = f"s3://{beside.bucket}/{prefix}"
        return _DEFAULTS.get(ident, lambda: S3Ledger(beside.client, beside.bucket, prefix))
    return ledger_at(directory or DEFAULT_LEDGER_DIR)


def ledger_at(location: str | Path) -> LedgerStore:
    """The ledger at ``s3://bucket/prefix`` (S3 settings from the environment) or in a
    directory (SQLite), one instance per process and location."""
    text = str(location)
    ident: str | Path = text if text.startswith("s3://") else Path(text).resolve()

    def make() -> LedgerStore:
        if isinstance(ident, Path):
            return SQLiteLedger(ident / "ledger.sqlite3")
        bucket, _, prefix = text[len("s3://") :].partition("/")
        client = build_s3_client(S3Settings.from_env(bucket=bucket))
        return S3Ledger(client, bucket, prefix or "eggapi/ledger")

    return _DEFAULTS.get(ident, make)


_DEFAULTS: Registry[str | Path, LedgerStore] = Registry("default ledgers by location")
