"""The default ledger store: one SQLite file in WAL mode, safe across threads and processes on
one machine; every claim is a short ``BEGIN IMMEDIATE`` transaction, never held across HTTP calls.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from prefect_eggapi.safety.ledger.base import (
    DEFAULT_LEDGER_DIR,
    LEDGER_DIR_ENV,
    UNRESOLVED_STATES,
    EntryState,
    LedgerConflictError,
    LedgerEntry,
    lane_free,
    lane_waits,
)


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

    def __reduce__(self) -> tuple[type[SQLiteLedger], tuple[Path]]:
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
        return LedgerEntry.model_validate_json(data).at_version(str(version))

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
        entry.at_version(str(new_version))

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
        for _ in lane_waits(time.monotonic() + 3 * seconds):
            with self.transaction(), self._conn() as conn:
                held = dict(
                    (row[0], (row[1], row[2]))
                    for row in conn.execute(
                        "SELECT slot, owner, until FROM lanes WHERE name = ?", (name,)
                    )
                )
                for candidate in range(width):
                    if lane_free(*held.get(candidate, (None, None))):
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
