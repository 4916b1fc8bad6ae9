"""The wait tasks: poll one EggAPI task inside one task run until it finishes or the deadline.

The sync task blocks a thread; the async one waits on the event loop (hundreds can wait at once
in one process), so each has its own I/O loop around the same observer, which decides what to
log, record and announce.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from functools import partial

from prefect.cache_policies import NO_CACHE

from prefect_eggapi.client import DEFAULT_WAIT_TIMEOUT, TaskSignals
from prefect_eggapi.client.errors import (
    EggAPIError,
    EmptyOutputError,
    TaskAbandonedError,
    TaskFailedError,
)
from prefect_eggapi.client.polling import PollPolicy
from prefect_eggapi.client.types import EggAPITask, TaskStatus
from prefect_eggapi.credentials import EggAPICredentials
from prefect_eggapi.safety.ledger import LedgerStore, default_ledger
from prefect_eggapi.safety.submitter import record_outcome
from prefect_eggapi.tasks.artifacts import Progress, emit_task_event
from prefect_eggapi.tasks.naming import task_run_name
from prefect_eggapi.tasks.replay import COMPLETED_STATES, recorded_before
from prefect_eggapi.tasks.runtime import in_thread, run_logger
from prefect_eggapi.tasks.twins import twin_tasks

__all__ = ["WaitArgs", "await_for_task", "wait", "wait_for_task"]

#: What a wait raises when the remote task ends badly; each is recorded in the ledger.
_ENDINGS = (TaskAbandonedError, TaskFailedError, EmptyOutputError)


@dataclass(frozen=True)
class WaitArgs:
    """The parameters of the wait tasks (see :func:`wait_for_task`)."""

    task: EggAPITask | str
    _: KW_ONLY
    credentials: EggAPICredentials | None = None
    timeout: float = DEFAULT_WAIT_TIMEOUT
    poll: PollPolicy | None = None
    label: str | None = None
    progress: bool = True
    ledger: LedgerStore | None = None
    signals: TaskSignals | None = None

    @property
    def task_id(self) -> str:
        return self.task.id if isinstance(self.task, EggAPITask) else self.task


class _WaitObserver:
    """Logs and progress on status changes only; counts polls for the ledger and report."""

    def __init__(self, args: WaitArgs) -> None:
        self.logger = run_logger()
        self.task_id = args.task_id
        self.signals = args.signals
        self.ledger = args.ledger or default_ledger()
        self.polls = 0
        self.status: TaskStatus | None = None
        name = " · ".join(p for p in (f"EggAPI task {self.task_id}", args.label or "") if p)
        self.progress = Progress(name) if args.progress else None

    def __call__(self, task: EggAPITask) -> None:
        self.polls += 1
        if task.status is self.status:
            return
        self.status = task.status
        self.logger.info("EggAPI task %s is %s", task.id, task.status.value)
        if self.progress is not None:
            percent = {TaskStatus.PENDING: 10, TaskStatus.PROCESSING: 50}.get(task.status, 100)
            self.progress.update(percent, f"{task.id}: {task.status.value}")

    def _receiver_announced(self, task_id: str) -> bool:
        """The webhook receiver already emitted this task's terminal event (one per task)."""
        is_signalled = getattr(self.signals, "is_signalled", None)  # optional: not every source
        return bool(is_signalled and is_signalled(task_id))

    def finished(self, task: EggAPITask) -> EggAPITask:
        replay = recorded_before(self.ledger.find_task(task.id), task.id, COMPLETED_STATES)
        record_outcome(self.ledger, task.id, task=task, polls=self.polls)
        self.logger.info(
            "EggAPI task %s completed: %d output(s), cost %s, %d poll(s)",
            task.id,
            len(task.output_urls),
            task.cost or "?",
            self.polls,
        )
        if replay:
            # A rerun reconnecting to a task completed earlier: its event went out then, and an
            # automation on eggapi.task.completed must not fire again for the same task.
            self.logger.debug("EggAPI task %s was already completed: no event", task.id)
            return task
        if self._receiver_announced(task.id):
            return task
        emit_task_event(
            "completed",
            task.id,
            task=task,
            polls=self.polls,
            outputs=len(task.output_urls),
            queue_seconds=task.queue_seconds,
            processing_seconds=task.processing_seconds,
        )
        return task

    def failed(self, exc: EggAPIError) -> None:
        record_outcome(self.ledger, self.task_id, error=exc, polls=self.polls)
        if isinstance(exc, TaskAbandonedError):
            self.logger.error("%s", exc)
            emit_task_event(
                "abandoned",
                self.task_id,
                waited_seconds=exc.waited_seconds,
                last_status=exc.last_status,
            )
        elif isinstance(exc, TaskFailedError | EmptyOutputError):
            self.logger.error("%s (%s)", exc, exc.classification.value)
            if self._receiver_announced(self.task_id):
                return
            emit_task_event(
                "failed", self.task_id, task=exc.task, classification=exc.classification.value
            )


def wait(args: WaitArgs) -> EggAPITask:
    """Poll until the task finishes (blocking this thread); record and announce the end."""
    observer = _WaitObserver(args)
    creds = args.credentials or EggAPICredentials()
    with creds.get_client(args.poll) as client:
        try:
            done = client.wait_for_task(
                args.task, timeout=args.timeout, on_poll=observer, signals=args.signals
            )
        except _ENDINGS as exc:
            observer.failed(exc)
            raise
    return observer.finished(done)


async def await_(args: WaitArgs) -> EggAPITask:
    """:func:`wait` on the event loop; the observer's API calls run in worker threads."""
    observer = await in_thread(partial(_WaitObserver, args))
    creds = args.credentials or EggAPICredentials()
    async with creds.get_async_client(args.poll) as client:
        try:
            done = await client.wait_for_task(
                args.task, timeout=args.timeout, on_poll=observer, signals=args.signals
            )
        except _ENDINGS as exc:
            await in_thread(partial(observer.failed, exc))
            raise
    return await in_thread(partial(observer.finished, done))


wait_for_task, await_for_task = twin_tasks(
    WaitArgs,
    wait,
    await_,
    names=("wait_for_task", "await_for_task"),
    docs=(
        """Poll inside this one task run until the EggAPI task finishes or ``timeout`` passes.

        Raises :class:`TaskFailedError` (moderation: :class:`ContentModerationError`),
        :class:`EmptyOutputError`, or :class:`TaskAbandonedError` at the deadline; the ledger
        records each so a later submit knows whether a fresh attempt is due.
        """,
        "Async :func:`wait_for_task`: hundreds can wait concurrently on one event loop.",
    ),
    name="eggapi-wait",
    cache_policy=NO_CACHE,
    task_run_name=task_run_name("wait"),
)
