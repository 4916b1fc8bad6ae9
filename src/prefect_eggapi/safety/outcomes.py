"""Move a ledger entry forward once its task is waited for or its outputs are stored.

:func:`apply_outcome` is the table (which state an outcome leads to) and has no I/O;
:func:`record_outcome` reads, applies and writes it under a compare-and-swap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prefect_eggapi.client.errors import (
    EmptyOutputError,
    TaskAbandonedError,
    TaskFailedError,
    describe,
)
from prefect_eggapi.client.types import EggAPITask, TaskStatus
from prefect_eggapi.safety.ledger import EntryState, LedgerEntry, LedgerStore, with_conflict_retry


def apply_outcome(
    entry: LedgerEntry,
    *,
    task: EggAPITask | None = None,
    error: BaseException | None = None,
    outputs: Sequence[Mapping[str, object]] | None = None,
) -> bool:
    """Change ``entry`` for this outcome; False when the outcome changes nothing.

    Stored outputs -> persisted; abandoned -> abandoned; the task failed (or completed with no
    output) -> failed, with its cost and whether a fresh attempt may fix it; completed ->
    completed with its cost (a persisted entry stays persisted).
    """
    if outputs is not None:
        entry.state = EntryState.PERSISTED
        entry.outputs = [dict(output) for output in outputs]
    elif isinstance(error, TaskAbandonedError):
        entry.state = EntryState.ABANDONED
        entry.error = describe(error)
    elif isinstance(error, TaskFailedError | EmptyOutputError):
        entry.state = EntryState.FAILED
        entry.retryable = error.retryable
        entry.error = {**describe(error), "task_error": error.task.error}
        entry.cost = error.task.cost_amount
    elif task is not None and task.status is TaskStatus.COMPLETED:
        if entry.state is not EntryState.PERSISTED:
            entry.state = EntryState.COMPLETED
        entry.cost = task.cost_amount
    else:
        return False
    return True


def record_outcome(
    ledger: LedgerStore,
    task_id: str,
    *,
    task: EggAPITask | None = None,
    error: BaseException | None = None,
    outputs: Sequence[Mapping[str, object]] | None = None,
    polls: int = 0,
) -> LedgerEntry | None:
    """Move the ledger entry of ``task_id`` forward after a wait or a persist."""

    def attempt() -> LedgerEntry | None:
        with ledger.transaction():
            entry = ledger.find_task(task_id)
            if entry is None or entry.task_id != task_id:
                return entry  # not ours, or an older attempt of an entry that moved on
            entry.polls += polls
            if apply_outcome(entry, task=task, error=error, outputs=outputs):
                ledger.put(entry)
            return entry

    return with_conflict_retry(attempt)
