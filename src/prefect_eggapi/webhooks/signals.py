"""Wake-up signals for waits, shared across processes on one machine through SQLite.

The webhook receiver (one process) records ``(task_id, status, received_at, task)`` once it has
verified a delivery and re-read the task from the API; flows in other processes wait on it
through ``wait_for_task(..., signals=SQLiteSignals(path))``. The wait takes the receiver's re-read
task instead of reading it a second time (a signal without one is a hint to poll *now*), and
keeps polling on its slow schedule, so a lost webhook still completes. Nothing here talks to
EggAPI.

Waking is cheap: one watcher thread per database file and process reads the rows added since
its last look (``rowid > last``) every ``poll_interval`` seconds (20 ms by default), only while
some wait is pending, and wakes the waiters of the task ids it finds. A signal written in the
same process wakes its waiters at once. Hundreds of concurrent waits cost one indexed query per
interval, not one each.

The table doubles as the receiver's durable deduplication record (:meth:`SQLiteSignals.has`),
also across receiver restarts: a row is written only once a delivery was confirmed, so one that
failed on the way leaves nothing behind and its redelivery counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prefect_eggapi.client.registry import Registry
from prefect_eggapi.client.types import EggAPITask

__all__ = ["SIGNALS_PATH_ENV", "SQLiteSignals", "Signal", "default_signals_path"]

SIGNALS_PATH_ENV = "EGGAPI_WEBHOOK_SIGNALS"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS signals (
    task_id TEXT NOT NULL,
    status TEXT NOT NULL,
    event TEXT,
    received_at REAL NOT NULL,
    task TEXT,
    PRIMARY KEY (task_id, status)
)
"""


def default_signals_path() -> Path:
    """``$EGGAPI_WEBHOOK_SIGNALS``, else ``$EGGAPI_LEDGER_DIR/webhook-signals.sqlite``, else
    ``./.eggapi/webhook-signals.sqlite`` (beside the default ledger)."""
    explicit = os.environ.get(SIGNALS_PATH_ENV)
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("EGGAPI_LEDGER_DIR") or ".eggapi") / "webhook-signals.sqlite"


@dataclass(frozen=True)
class Signal:
    task_id: str
    status: str
    received_at: float
    event: str | None = None
    task: EggAPITask | None = None  # as re-read from the API by the receiver


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


class _Watcher:
    """One per (process, database file): notices rows other processes add and wakes waiters."""

    def __init__(self, path: str, poll_interval: float) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self._cond = threading.Condition()
        self._waiters: dict[str, list[Callable[[], None]]] = {}
        self._last_rowid = 0
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None

    def add(self, task_id: str, wake: Callable[[], None]) -> None:
        with self._cond:
            self._waiters.setdefault(task_id, []).append(wake)
            if self._thread is None or not self._thread.is_alive():
                self._last_rowid = self._max_rowid()
                self._thread = threading.Thread(
                    target=self._run, name=f"eggapi-signals:{Path(self.path).name}", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def remove(self, task_id: str, wake: Callable[[], None]) -> None:
        with self._cond:
            waiters = self._waiters.get(task_id)
            if waiters and wake in waiters:
                waiters.remove(wake)
                if not waiters:
                    del self._waiters[task_id]

    def notify(self, task_id: str) -> None:
        with self._cond:
            waiters = list(self._waiters.get(task_id, ()))
        for wake in waiters:
            wake()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = _connect(self.path)
        return self._conn

    def _max_rowid(self) -> int:
        conn = _connect(self.path)  # the caller's thread: not the watcher's connection
        try:
            row = conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM signals").fetchone()
        except sqlite3.Error:
            return 0
        finally:
            conn.close()
        return int(row[0])

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiters:
                    self._cond.wait()
            try:
                rows = (
                    self._db()
                    .execute(
                        "SELECT rowid, task_id FROM signals WHERE rowid > ? ORDER BY rowid",
                        (self._last_rowid,),
                    )
                    .fetchall()
                )
            except sqlite3.Error:
                rows = []
            for rowid, task_id in rows:
                self._last_rowid = max(self._last_rowid, int(rowid))
                self.notify(str(task_id))
            time.sleep(self.poll_interval)


_WATCHERS: Registry[str, _Watcher] = Registry("signal watchers by file")


def _watcher(path: str, poll_interval: float) -> _Watcher:
    watcher = _WATCHERS.get(path, lambda: _Watcher(path, poll_interval))
    watcher.poll_interval = min(watcher.poll_interval, poll_interval)
    return watcher


class SQLiteSignals:
    """A :class:`~prefect_eggapi.client.TaskSignals` backed by a SQLite file on this machine.

    Args:
        path: database file shared by the receiver and the waiting flows; created if missing.
            Defaults to :func:`default_signals_path`.
        poll_interval: how often the watcher looks for rows written by other processes.
    """

    def __init__(self, path: str | Path | None = None, *, poll_interval: float = 0.02) -> None:
        resolved = Path(path) if path is not None else default_signals_path()
        resolved.parent.mkdir(parents=True, exist_ok=True)
        self.path = resolved
        self.poll_interval = poll_interval
        self._local = threading.local()
        with self._db() as conn:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(signals)")}
            if "task" not in columns:  # a file written by an older version
                try:
                    conn.execute("ALTER TABLE signals ADD COLUMN task TEXT")
                except sqlite3.OperationalError as exc:  # another process just added it
                    if "duplicate column" not in str(exc):
                        raise
        self._watcher = _watcher(str(resolved.resolve()), poll_interval)

    def __repr__(self) -> str:
        return f"SQLiteSignals({str(self.path)!r})"

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(str(self.path))
        yield conn

    # ------------------------------------------------------------------ writing

    def signal(
        self,
        task_id: str,
        status: str,
        *,
        event: str | None = None,
        received_at: float | None = None,
        task: EggAPITask | None = None,
    ) -> bool:
        """Record a signal and wake local waiters; False if ``(task_id, status)`` was known.

        ``task`` is the task as just re-read from the API: waits use it instead of a GET.
        """
        if task is not None and (task.id != task_id or task.status.value != status):
            raise ValueError(f"task {task.id} ({task.status.value}) is not {task_id} ({status})")
        with self._db() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO signals (task_id, status, event, received_at, task) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    task_id,
                    status,
                    event,
                    time.time() if received_at is None else received_at,
                    task.model_dump_json() if task is not None else None,
                ),
            )
            new = cursor.rowcount == 1
        if new:
            self._watcher.notify(task_id)
        return new

    # ------------------------------------------------------------------ reading

    def get(self, task_id: str) -> list[Signal]:
        with self._db() as conn:
            rows = conn.execute(
                "SELECT task_id, status, received_at, event, task FROM signals "
                "WHERE task_id = ? ORDER BY rowid",
                (task_id,),
            ).fetchall()
        return [
            Signal(
                str(r[0]),
                str(r[1]),
                float(r[2]),
                r[3],
                EggAPITask.model_validate_json(r[4]) if r[4] else None,
            )
            for r in rows
        ]

    def confirmed(self, task_id: str) -> EggAPITask | None:
        """The terminal task as the receiver re-read it, if it recorded one."""
        for signal in self.get(task_id):
            if signal.task is not None and signal.task.is_terminal:
                return signal.task
        return None

    def has(self, task_id: str, status: str) -> bool:
        """Whether ``(task_id, status)`` was recorded (the receiver's durable dedupe)."""
        with self._db() as conn:
            row = conn.execute(
                "SELECT 1 FROM signals WHERE task_id = ? AND status = ? LIMIT 1", (task_id, status)
            )
            return row.fetchone() is not None

    def is_signalled(self, task_id: str) -> bool:
        with self._db() as conn:
            row = conn.execute("SELECT 1 FROM signals WHERE task_id = ? LIMIT 1", (task_id,))
            return row.fetchone() is not None

    def wait(self, task_id: str, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True as soon as ``task_id`` has a signal."""
        if self.is_signalled(task_id):
            return True
        if timeout <= 0:
            return False
        event = threading.Event()
        self._watcher.add(task_id, event.set)
        try:
            if self.is_signalled(task_id):  # written between the first look and add()
                return True
            return event.wait(timeout)
        finally:
            self._watcher.remove(task_id, event.set)

    async def await_signal(self, task_id: str, timeout: float) -> bool:
        """Async twin of :meth:`wait`; many waits share the one watcher thread."""
        if self.is_signalled(task_id):
            return True
        if timeout <= 0:
            return False
        loop = asyncio.get_running_loop()
        event = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(event.set)

        self._watcher.add(task_id, wake)
        try:
            if self.is_signalled(task_id):
                return True
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except TimeoutError:
                return False
            return True
        finally:
            self._watcher.remove(task_id, wake)
