"""One wait's state: its deadline, its poll schedule, the last task it saw.

The wait operation (``Operations._wait_op``) asks this object what to do next — how long to
sleep, whether to hand the poll to the account's board — and tells it what each poll saw. It does
no I/O itself, so both clients wait by the same rules.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from prefect_eggapi.client._core import TaskSignals, check_task_id
from prefect_eggapi.client.board import PollBoard
from prefect_eggapi.client.errors import (
    ContentModerationError,
    EggAPIError,
    EmptyOutputError,
    InvalidRequestError,
    NotFoundError,
    TaskAbandonedError,
    TaskFailedError,
)
from prefect_eggapi.client.polling import PollPolicy, PollSchedule
from prefect_eggapi.client.types import EggAPITask, TaskStatus

if TYPE_CHECKING:  # only for the annotation: _ops builds its waits from this module
    from prefect_eggapi.client._ops import Operations

# A task created less than this before its wait began is aged by our clock (see Wait._age).
FRESH_TASK_SECONDS = 2.0
# Longest unaimed sleep of a wait whose polls share list pages (see Wait.next_sleep).
SHARED_POLL_CAP = 2.0
DEFAULT_WAIT_TIMEOUT = 300.0


def check_terminal(task: EggAPITask, raise_on_failure: bool) -> EggAPITask:
    """A terminal task as the caller asked for it: returned, or raised as what went wrong."""
    if not raise_on_failure:
        return task
    if task.status is TaskStatus.FAILED:
        if (task.error or "").lower().startswith("content moderation"):
            raise ContentModerationError(task)
        raise TaskFailedError(task)
    if not task.output_urls:
        raise EmptyOutputError(task)
    return task


class Wait:
    """One wait's state: deadline, poll schedule, last task seen."""

    def __init__(
        self,
        client: Operations,
        task: EggAPITask | str,
        timeout: float,
        poll: PollPolicy | None,
        signals: TaskSignals | None,
    ) -> None:
        if not timeout > 0:
            raise InvalidRequestError([("timeout", "must be > 0 seconds")], what="wait")
        self.task_id = task.id if isinstance(task, EggAPITask) else check_task_id(task)
        self.last = task if isinstance(task, EggAPITask) else None
        self.timeout = timeout
        self.started = time.monotonic()
        # With signals, polling is only the backstop for lost deliveries: slow by default.
        slow = signals is not None and not client._custom_poll
        policy = poll or (PollPolicy.backstop() if slow else client.poll)
        self.schedule = PollSchedule(policy, client.durations)
        self.durations = client.durations
        # A signal wakes the wait once; after that (say the re-read was not terminal yet) the
        # schedule decides, so a recorded signal cannot turn the loop into a busy poll.
        self.signals = signals
        self.board = client._poll_board() if signals is None and policy.batch else None
        self._fresh: bool | None = None  # created just before this wait started (see _age)

    def __enter__(self) -> Wait:
        if self.board is not None:
            self.board.register(self.task_id, self.last.created_at if self.last else None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.board is not None:
            self.board.unregister(self.task_id)

    def batched(self) -> PollBoard | None:
        """The board to hand the next poll to, when other waits of the account are in flight."""
        if self.board is None or self.last is None or not self.board.crowded:
            return None
        return self.board

    @staticmethod
    def slack(delay: float) -> float:
        """How much earlier than planned a poll may run so it can share a list page."""
        return min(0.3 * delay, 2.0)

    def take(self, task: EggAPITask, on_poll: Callable[[EggAPITask], None] | None) -> None:
        """A poll answered by a list page or by a signal's writer rather than by our GET."""
        self.durations.observe(task)
        self.last = task
        if on_poll is not None:
            on_poll(task)

    @property
    def done(self) -> bool:
        return self.last is not None and self.last.is_terminal

    def next_sleep(self) -> float:
        """Seconds to sleep before the next poll; raises once the deadline has passed."""
        status = self.last.status if self.last else None
        delay = self.schedule.next_delay(status, self._age()) if self.last is not None else 0.0
        if not self.schedule.aimed and self.batched() is not None:
            # Nothing learned yet, but polls share list pages: look more often for the first
            # completion, which teaches every wait of the account when to look.
            delay = min(delay, SHARED_POLL_CAP)
        elapsed = time.monotonic() - self.started
        if elapsed >= self.timeout:
            raise TaskAbandonedError(
                self.task_id, last_status=status and status.value, waited_seconds=elapsed
            )
        return min(delay, self.timeout - elapsed)

    def _age(self) -> float | None:
        """Seconds since the task was created.

        Server timestamps may have whole-second resolution, so a task that was only just
        created (the usual submit -> wait) is aged from the start of this wait instead.
        """
        if self._fresh:
            return time.monotonic() - self.started
        created = self.last.created_at if self.last is not None else None
        if created is None:
            return None
        offset = timedelta(seconds=self.durations.clock_offset or 0.0)
        age = max(0.0, (datetime.now(UTC) + offset - created).total_seconds())
        if self._fresh is None:
            self._fresh = age - (time.monotonic() - self.started) < FRESH_TASK_SECONDS
            if self._fresh:
                return time.monotonic() - self.started
        return age

    def signalled(self) -> EggAPITask | None:
        """After a signal: its writer's re-read task, which ends the wait without a GET."""
        confirmed = getattr(self.signals, "confirmed", None)
        self.signals = None
        task = confirmed(self.task_id) if confirmed is not None else None
        return task if isinstance(task, EggAPITask) and task.is_terminal else None

    def failed_poll(self, exc: EggAPIError) -> None:
        """Transient errors keep the wait going until the deadline; others end it."""
        if not exc.retryable or isinstance(exc, NotFoundError):
            raise exc

    def result(self, raise_on_failure: bool) -> EggAPITask:
        assert self.last is not None
        return check_terminal(self.last, raise_on_failure)
