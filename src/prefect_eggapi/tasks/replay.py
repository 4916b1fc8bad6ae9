"""Whether a step replays what the ledger already recorded: then it announces nothing.

A rerun reconnects to a task completed (or persisted) earlier; its event went out then, and an
automation on ``eggapi.task.completed`` must not fire twice for the same task.
"""

from __future__ import annotations

from collections.abc import Collection

from prefect_eggapi.safety.ledger import EntryState, LedgerEntry

__all__ = ["COMPLETED_STATES", "recorded_before"]

#: Ledger states in which a task's completion was already recorded (and announced).
COMPLETED_STATES = frozenset({EntryState.COMPLETED, EntryState.PERSISTED})


def recorded_before(
    entry: LedgerEntry | None, task_id: str, states: Collection[EntryState]
) -> bool:
    """The ledger had ``task_id`` in one of ``states`` before this step: a replay, not news."""
    return entry is not None and entry.task_id == task_id and entry.state in states
