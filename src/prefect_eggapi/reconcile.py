"""Decide what an ambiguous submit did, from ``GET /v1/tasks`` (newest first).

The API has no idempotency key, so after a timeout or 5xx on ``POST /v1/generate`` the only
evidence is the task list. A candidate must match model and type, have been created inside the
window in which our request was in flight (widened for clock skew), match the prompt where the
server shows it, and not already belong to another ledger entry. One candidate is adopted; none,
seen twice a settle interval apart, proves nothing was created; anything else fails loudly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from prefect_eggapi.client import EggAPIClient
from prefect_eggapi.models import Task

# Our clock against the server's: widened further by the offset the client measured, if any.
# created_at has whole seconds, so the learned offset is good to about a second.
DEFAULT_SKEW = timedelta(seconds=1.5)
UNKNOWN_OFFSET_SKEW = timedelta(seconds=60)


@dataclass
class Evidence:
    """What reconciliation saw; carried by the error when it cannot decide."""

    window_start: datetime
    window_end: datetime
    scanned: int = 0
    candidates: list[str] = field(default_factory=list)
    note: str = ""

    def __str__(self) -> str:
        ids = ", ".join(self.candidates) or "none"
        text = (
            f"scanned {self.scanned} tasks created between {self.window_start.isoformat()} and "
            f"{self.window_end.isoformat()}; candidates: {ids}"
        )
        return f"{text}; {self.note}" if self.note else text


@dataclass
class Reconciliation:
    task: Task | None
    nothing_created: bool
    evidence: Evidence

    @property
    def decided(self) -> bool:
        return self.task is not None or self.nothing_created


def _matches(task: Task, *, model: str, task_type: str, prompt: str) -> bool:
    if task.model and task.model != model:
        return False
    if task.type and task.type != task_type:
        return False
    shown = (task.model_extra or {}).get("prompt")
    return shown is None or shown == prompt


def scan(
    client: EggAPIClient,
    *,
    model: str,
    task_type: str,
    prompt: str,
    sent_at: datetime,
    failed_at: datetime,
    exclude: set[str],
    skew: timedelta = DEFAULT_SKEW,
    max_pages: int = 20,
) -> tuple[list[Task], Evidence]:
    """Candidates created while the request was in flight, newest first."""
    evidence = Evidence(sent_at - skew, failed_at + skew)
    found: list[Task] = []
    for task in client.iter_tasks(per_page=100, max_pages=max_pages):
        evidence.scanned += 1
        if task.created_at is None:
            continue
        if task.created_at < evidence.window_start:
            break  # newest first: everything after this is older still
        if task.created_at > evidence.window_end or task.id in exclude:
            continue
        if _matches(task, model=model, task_type=task_type, prompt=prompt):
            found.append(task)
    evidence.candidates = [t.id for t in found]
    return found, evidence


def reconcile(
    client: EggAPIClient,
    *,
    model: str,
    task_type: str,
    prompt: str,
    sent_at: datetime,
    failed_at: datetime,
    exclude: set[str],
    settle_seconds: float = 2.0,
    skew: timedelta = DEFAULT_SKEW,
) -> Reconciliation:
    """Adopt a unique candidate, prove absence with two empty scans, or report ambiguity."""

    def look() -> tuple[list[Task], Evidence]:
        return scan(
            client,
            model=model,
            task_type=task_type,
            prompt=prompt,
            sent_at=sent_at,
            failed_at=failed_at,
            exclude=exclude,
            skew=skew,
        )

    found, evidence = look()
    if not found:
        # The list may lag the write; look again before calling it proof.
        time.sleep(settle_seconds)
        found, evidence = look()
        if not found:
            return Reconciliation(None, True, evidence)
    if len(found) == 1:
        return Reconciliation(found[0], False, evidence)
    return Reconciliation(None, False, evidence)
