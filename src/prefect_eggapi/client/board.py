"""One ``GET /v1/tasks`` page instead of a ``GET /v1/tasks/{id}`` per wait, when waits crowd.

A batch keeps dozens of waits of one account in flight, each polling on its own schedule: that
is most of its requests and most of its rate limit. Every wait of an account in this process
hands its next poll to the account's board, with the time it is due and how much earlier it may
run (its slack). When the earliest poll falls due, the board serves every poll whose slack has
begun with one list page (newest first, 100 tasks; more pages only while the wanted tasks may be
further down). A poll the page does not answer, or that a failed list could not (the board's
client does not retry), gets ``None`` and its wait reads the task itself, so the board can only
save requests, never lose a task. A lone poll is not batched.

Section 17 of the API notes assumes list items have the shape of ``GET /v1/tasks/{id}`` and come
newest first. Should the real API disagree (pages that never hold the wanted tasks, or completed
items without output URLs), the board stops batching for the account for a while after a few
pages that reached back past the wanted tasks without holding them.

No Prefect imports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from pydantic import ValidationError

from prefect_eggapi.client.registry import Registry
from prefect_eggapi.client.types import (
    EggAPITask,
    JSONObject,
    JSONValue,
    Pagination,
    TaskStatus,
)

log = logging.getLogger(__name__)

PER_PAGE = 100
MAX_PAGES = 3
MAX_MISSES = 3  # consecutive lists answering none of the wanted tasks before pausing
PAUSE_SECONDS = 300.0  # how long batching pauses after that
IDLE_EXIT_SECONDS = 30.0
GRACE_SECONDS = 15.0  # a poll not served this long after it fell due is handed back
# Listed tasks newer than this before a wanted one's creation still count as "not past it yet".
CREATED_SKEW = timedelta(seconds=5)


@dataclass(frozen=True)
class RawTaskPage:
    """A ``GET /v1/tasks`` page with its items left as JSON objects.

    A page holds 100 tasks and the board wants a few of them: validating every item as an
    :class:`EggAPITask` was the steepest per-image cost of a batch as it grew (issue 16), so the
    board validates only the items whose ids are waited for (and the last one, for its date).
    """

    items: list[JSONObject]
    total_pages: int

    @classmethod
    def from_data(cls, data: JSONValue) -> RawTaskPage:
        """The envelope's ``data`` (as :class:`TaskPage` reads it: missing keys are empty)."""
        if not isinstance(data, dict):
            raise ValueError(f"a task list page is a JSON object, got {type(data).__name__}")
        items = data.get("items") or []
        if not isinstance(items, list):
            raise ValueError("a task list page's items are a list")
        pagination = Pagination.model_validate(data.get("pagination") or {})
        return cls([i for i in items if isinstance(i, dict)], pagination.total_pages)


def _task_of(item: JSONObject) -> EggAPITask | None:
    """The item as the task a GET would show, or None when it does not parse (its wait then
    reads the task itself, where the same problem surfaces as it always did)."""
    try:
        return EggAPITask.model_validate(item)
    except ValidationError:
        return None


class Lister(Protocol):
    """What the board reads pages with: a sync client of the account, used by its thread only."""

    def list_task_dicts(self, page: int, per_page: int) -> RawTaskPage: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class _Ask:
    task_id: str
    due: float  # time.monotonic() when the wait wants its poll
    earliest: float  # it may be served from here on
    deliver: Callable[[EggAPITask | None], None]


@dataclass
class BoardStats:
    lists: int = 0  # list requests made
    served: int = 0  # polls answered from a list page
    unanswered: int = 0  # polls handed back to their wait (alone, not listed, or an error)
    paused_until: float = 0.0  # time.monotonic() until which batching is off

    @property
    def disabled(self) -> bool:
        return time.monotonic() < self.paused_until


def _usable(task: EggAPITask) -> bool:
    """Items missing what a GET would show (URLs, the error) are read with GET instead."""
    if task.status is TaskStatus.COMPLETED:
        return bool(task.output_urls)
    if task.status is TaskStatus.FAILED:
        return bool(task.error)
    return True


class PollBoard:
    """The batched polls of one account in this process (see the module docstring).

    Args:
        connect: opens the client the board's thread lists with; closed when the thread exits
            after ``IDLE_EXIT_SECONDS`` without waits.
    """

    def __init__(self, connect: Callable[[], Lister]) -> None:
        self._connect = connect
        self._cond = threading.Condition()
        # registered task id -> (waits on it, created_at)
        self._waits: dict[str, tuple[int, datetime | None]] = {}
        self._asks: list[_Ask] = []
        self._thread: threading.Thread | None = None
        self._misses = 0
        self.stats = BoardStats()

    # ------------------------------------------------------------------ waits

    def register(self, task_id: str, created_at: datetime | None) -> None:
        with self._cond:
            count, known = self._waits.get(task_id, (0, None))
            self._waits[task_id] = (count + 1, created_at or known)

    def unregister(self, task_id: str) -> None:
        with self._cond:
            count, created = self._waits.pop(task_id, (0, None))
            if count > 1:
                self._waits[task_id] = (count - 1, created)

    @property
    def crowded(self) -> bool:
        """Worth batching: two or more waits of the account are in flight here."""
        return not self.stats.disabled and sum(n for n, _ in self._waits.values()) >= 2

    def poll(self, task_id: str, delay: float, slack: float) -> EggAPITask | None:
        """Block until the poll is served: the task from a list page, or None (GET it)."""
        done = threading.Event()
        box: list[EggAPITask | None] = []

        def deliver(task: EggAPITask | None) -> None:
            box.append(task)
            done.set()

        ask = self._ask(task_id, delay, slack, deliver)
        if not done.wait(delay + GRACE_SECONDS):  # never hang a wait on a stuck board
            self._cancel(ask)
            return None
        return box[0]

    async def apoll(self, task_id: str, delay: float, slack: float) -> EggAPITask | None:
        """Async twin of :meth:`poll`; the event loop is free while the poll is pending."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[EggAPITask | None] = loop.create_future()

        def deliver(task: EggAPITask | None) -> None:
            def settle() -> None:
                if not future.done():
                    future.set_result(task)

            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(settle)

        ask = self._ask(task_id, delay, slack, deliver)
        try:
            return await asyncio.wait_for(future, delay + GRACE_SECONDS)
        except TimeoutError:
            return None
        finally:
            self._cancel(ask)

    # ------------------------------------------------------------------ the thread

    def _ask(
        self, task_id: str, delay: float, slack: float, deliver: Callable[[EggAPITask | None], None]
    ) -> _Ask:
        now = time.monotonic()
        ask = _Ask(task_id, now + delay, now + max(0.0, delay - slack), deliver)
        with self._cond:
            self._asks.append(ask)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="eggapi-poll-board", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return ask

    def _cancel(self, ask: _Ask) -> None:
        with self._cond, contextlib.suppress(ValueError):
            self._asks.remove(ask)

    def _run(self) -> None:
        lister: Lister | None = None
        try:
            lister = self._connect()
            self._loop(lister)
        except Exception:  # the waits read their tasks themselves
            log.exception("the poll board stopped")
            with self._cond:
                self._thread = None
                stranded, self._asks = self._asks, []
            for ask in stranded:
                with contextlib.suppress(Exception):
                    ask.deliver(None)
        finally:
            if lister is not None:
                with contextlib.suppress(Exception):
                    lister.close()

    def _loop(self, lister: Lister) -> None:
        idle_since = time.monotonic()
        while True:
            with self._cond:
                now = time.monotonic()
                if not self._asks:
                    if now - idle_since > IDLE_EXIT_SECONDS and not self._waits:
                        self._thread = None
                        return
                    self._cond.wait(IDLE_EXIT_SECONDS)
                    continue
                first_due = min(ask.due for ask in self._asks)
                if first_due > now:
                    self._cond.wait(first_due - now)
                    continue
                batch = [ask for ask in self._asks if ask.earliest <= now]
                self._asks = [ask for ask in self._asks if ask.earliest > now]
                created = {ask.task_id: self._waits.get(ask.task_id, (0, None))[1] for ask in batch}
            self._serve(lister, batch, created)
            idle_since = time.monotonic()

    def _serve(
        self, lister: Lister, batch: list[_Ask], created: dict[str, datetime | None]
    ) -> None:
        found: dict[str, EggAPITask] = {}
        if len(created) >= 2 and not self.stats.disabled:
            found = self._list(lister, created)
        for ask in batch:
            task = found.get(ask.task_id)
            if task is None:
                self.stats.unanswered += 1
            else:
                self.stats.served += 1
            try:
                ask.deliver(task)
            except Exception:  # a waiter's problem must not stop the others
                log.exception("could not hand a poll back to its wait")

    def _list(self, lister: Lister, created: dict[str, datetime | None]) -> dict[str, EggAPITask]:
        wanted = set(created)
        known = [c for c in created.values() if c is not None]
        oldest = min(known) - CREATED_SKEW if known else None
        found: dict[str, EggAPITask] = {}
        reached_back = False  # the pages read went past every wanted task's creation
        for page in range(1, MAX_PAGES + 1):
            try:
                result = lister.list_task_dicts(page, PER_PAGE)
            except Exception as exc:  # the waits read their tasks themselves
                log.debug("list page %d failed: %r", page, exc)
                return found  # an outage is not evidence against the list
            self.stats.lists += 1
            for item in result.items:
                item_id = item.get("id")
                if isinstance(item_id, str) and item_id in wanted and item_id not in found:
                    task = _task_of(item)
                    if task is not None and task.id == item_id and _usable(task):
                        found[item_id] = task
            tail = _task_of(result.items[-1]) if result.items else None
            last = tail.created_at if tail is not None else None
            reached_back = page >= result.total_pages or (
                last is not None and oldest is not None and last < oldest
            )
            if len(found) == len(wanted) or reached_back or last is None or oldest is None:
                break
        if found:
            self._misses = 0
        elif reached_back:
            self._misses += 1
            if self._misses >= MAX_MISSES:
                self._misses = 0
                self.stats.paused_until = time.monotonic() + PAUSE_SECONDS
                log.warning(
                    "GET /v1/tasks pages did not hold the tasks being waited for %d times in a "
                    "row; polling each task with GET /v1/tasks/{id} for %.0f s",
                    MAX_MISSES,
                    PAUSE_SECONDS,
                )
        return found


_BOARDS: Registry[str, PollBoard] = Registry("poll boards by account")


def board_for(account: str, make: Callable[[], PollBoard]) -> PollBoard:
    """The process's board of ``account``, made by ``make`` the first time."""
    return _BOARDS.get(account, make)
