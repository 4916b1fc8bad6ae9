"""safety.outcomes: which state a waited-for or persisted task moves its ledger entry to.

``apply_outcome`` row by row (no I/O), then ``record_outcome`` on a SQLite ledger in a temp dir
(no servers): only the entry whose current task is this one moves.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from prefect_eggapi.client.errors import (
    ContentModerationError,
    EmptyOutputError,
    TaskAbandonedError,
    TaskFailedError,
)
from prefect_eggapi.client.types import EggAPITask, TaskStatus
from prefect_eggapi.safety.ledger import EntryState, LedgerEntry, SQLiteLedger
from prefect_eggapi.safety.outcomes import apply_outcome, record_outcome


def entry(state: EntryState = EntryState.SUBMITTED, task_id: str = "gen_1") -> LedgerEntry:
    return LedgerEntry(
        key="k1",
        logical_key="item-1",
        fingerprint="fp",
        state=state,
        task_id=task_id,
        model="nanobanana",
        task_type="generate",
        prompt_sha256="0" * 64,
        estimate=Decimal("0.04"),
    )


def task(status: TaskStatus, cost: str | None = "0.039", error: str | None = None) -> EggAPITask:
    return EggAPITask(id="gen_1", status=status, cost=cost, error=error)


def test_stored_outputs_persist_the_entry() -> None:
    current = entry(EntryState.COMPLETED)
    outputs = [{"key": "eggapi/gen_1/0.png", "size": 10}]
    assert apply_outcome(current, outputs=outputs) is True
    assert current.state is EntryState.PERSISTED and current.outputs == outputs


def test_an_abandoned_wait_keeps_the_task_for_recovery() -> None:
    current = entry()
    abandoned = TaskAbandonedError("gen_1", last_status="processing", waited_seconds=30)
    assert apply_outcome(current, error=abandoned) is True
    assert current.state is EntryState.ABANDONED
    assert current.error is not None and current.error["type"] == "TaskAbandonedError"


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (TaskFailedError(task(TaskStatus.FAILED, cost="0", error="upstream hiccup")), True),
        (ContentModerationError(task(TaskStatus.FAILED, cost="0", error="refused")), False),
        (EmptyOutputError(task(TaskStatus.COMPLETED, cost="0.039")), True),
    ],
)
def test_a_failed_task_records_its_cost_and_whether_to_try_again(
    error: TaskFailedError | EmptyOutputError, retryable: bool
) -> None:
    current = entry()
    assert apply_outcome(current, error=error) is True
    assert current.state is EntryState.FAILED and current.retryable is retryable
    assert current.cost == error.task.cost_amount
    assert current.error is not None and current.error["task_error"] == error.task.error


def test_a_completed_task_records_its_cost() -> None:
    current = entry()
    assert apply_outcome(current, task=task(TaskStatus.COMPLETED)) is True
    assert current.state is EntryState.COMPLETED and current.cost == Decimal("0.039")


def test_a_persisted_entry_stays_persisted_when_its_completion_arrives_late() -> None:
    current = entry(EntryState.PERSISTED)
    assert apply_outcome(current, task=task(TaskStatus.COMPLETED)) is True
    assert current.state is EntryState.PERSISTED and current.cost == Decimal("0.039")


@pytest.mark.parametrize(
    ("seen", "error"),
    [
        (None, None),
        (task(TaskStatus.PROCESSING), None),
        (None, RuntimeError("not an outcome")),
    ],
)
def test_anything_else_changes_nothing(seen: EggAPITask | None, error: Exception | None) -> None:
    current = entry()
    before = current.model_dump()
    assert apply_outcome(current, task=seen, error=error) is False
    assert current.model_dump() == before


def test_record_outcome_moves_only_the_entry_of_its_current_task(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "ledger.sqlite3")
    ledger.put(entry())
    moved = record_outcome(ledger, "gen_1", task=task(TaskStatus.COMPLETED), polls=3)
    assert moved is not None and moved.state is EntryState.COMPLETED
    stored = ledger.get("k1")
    assert stored is not None and stored.state is EntryState.COMPLETED and stored.polls == 3
    assert record_outcome(ledger, "gen_unknown", task=task(TaskStatus.COMPLETED)) is None

    # The entry moved on to a fresh attempt: the old task's outcome must not touch it.
    stored.state, stored.task_id = EntryState.SUBMITTED, "gen_2"
    stored.extra_tasks.append("gen_1")
    ledger.put(stored)
    record_outcome(ledger, "gen_1", error=EmptyOutputError(task(TaskStatus.COMPLETED)))
    again = ledger.get("k1")
    assert again is not None
    assert again.state is EntryState.SUBMITTED and again.task_id == "gen_2"
