"""Decide what an ambiguous submit did, from ``GET /v1/tasks`` (newest first).

The API has no idempotency key, so after a timeout or 5xx on ``POST /v1/generate`` the only
evidence is the task list, which shows no prompt. A task can be ours only if it matches model and
type, was created inside the window our request was in flight (server time, widened for clock
skew), is in no ledger entry's index, and did not provably exist before the POST was sent (it
is older than the newest task seen before sending: the entry's ``floor``).

Same-model tasks that no entry knows *outside* the window, and that no unresolved sibling
submit can explain, are someone else's traffic on the key: then a lone candidate could be theirs
as well as ours, so adoption is suspended and the submit fails loudly with the evidence. A window
seen empty twice, a settle interval apart, proves nothing was created whatever else uses the key.

:func:`classify` is the whole decision on one page of evidence; it has no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from prefect_eggapi.client import EggAPIClient
from prefect_eggapi.client.types import EggAPITask

# Our clock against the server's, once the offset is known: created_at has whole seconds, so the
# learned offset is good to about a second. Unknown offset: a much wider window.
DEFAULT_SKEW = timedelta(seconds=1.5)
UNKNOWN_OFFSET_SKEW = timedelta(seconds=60)
# How far before the window unknown same-model tasks count as other traffic on the key.
LOOKBACK = timedelta(seconds=60)

Span = tuple[datetime, datetime]


@dataclass
class Evidence:
    """What reconciliation saw; carried by the error when it cannot decide."""

    window_start: datetime
    window_end: datetime
    scanned: int = 0
    candidates: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    note: str = ""

    def __str__(self) -> str:
        ids = ", ".join(self.candidates) or "none"
        text = (
            f"scanned {self.scanned} tasks created between {self.window_start.isoformat()} and "
            f"{self.window_end.isoformat()}; candidates: {ids}"
        )
        if self.foreign:
            text += (
                f"; tasks no ledger knows near the window (other traffic on the key): "
                f"{', '.join(self.foreign[:10])}"
            )
        return f"{text}; {self.note}" if self.note else text


@dataclass
class Reconciliation:
    task: EggAPITask | None
    nothing_created: bool
    evidence: Evidence


def _matches(task: EggAPITask, *, model: str, task_type: str, prompt: str) -> bool:
    if task.model and task.model != model:
        return False
    if task.type and task.type != task_type:
        return False
    shown = (task.model_extra or {}).get("prompt")
    return shown is None or shown == prompt


def classify(
    tasks: Sequence[EggAPITask],
    *,
    window: Span,
    known: set[str],
    floor: datetime | None,
    floor_ids: Collection[str] = (),
    siblings: Sequence[Span] = (),
) -> tuple[list[EggAPITask], list[EggAPITask]]:
    """Split matching tasks no entry knows into (candidates in the window, other traffic).

    A task older than ``floor``, or seen at ``floor`` before the POST (``floor_ids``), existed
    before the POST and is never a candidate; a task inside an unresolved sibling's window may
    be that sibling's and is not counted as other traffic.
    """
    candidates: list[EggAPITask] = []
    foreign: list[EggAPITask] = []
    for task in tasks:
        if task.id in known or task.created_at is None:
            continue
        in_window = window[0] <= task.created_at <= window[1]
        existed = task.id in floor_ids or (floor is not None and task.created_at < floor)
        if in_window and not existed:
            candidates.append(task)
        elif not any(start <= task.created_at <= end for start, end in siblings):
            foreign.append(task)
    return candidates, foreign


def scan(
    client: EggAPIClient,
    *,
    model: str,
    task_type: str,
    prompt: str,
    since: datetime,
    max_pages: int = 20,
) -> tuple[list[EggAPITask], int]:
    """Matching tasks created at or after ``since``, newest first, and how many were scanned."""
    found: list[EggAPITask] = []
    scanned = 0
    for task in client.iter_tasks(per_page=100, max_pages=max_pages):
        scanned += 1
        if task.created_at is None:
            continue
        if task.created_at < since:
            break  # newest first: everything after this is older still
        if _matches(task, model=model, task_type=task_type, prompt=prompt):
            found.append(task)
    return found, scanned


def reconcile(
    client: EggAPIClient,
    *,
    model: str,
    task_type: str,
    prompt: str,
    window: Span,
    known: Callable[[], set[str]],
    floor: datetime | None = None,
    floor_ids: Collection[str] = (),
    siblings: Sequence[Span] = (),
    settle_seconds: float = 2.0,
    own: Callable[[str], bool] = lambda task_id: False,
) -> Reconciliation:
    """Adopt a lone candidate when nothing else unknown is near; prove absence with two empty
    looks; otherwise report what was seen. ``known`` is read after each scan, so a task recorded
    by another worker while we scanned is never taken for ours; a known task in the window that
    ``own`` says is indexed to this very entry (its writer died between the index and the entry)
    stays a candidate."""
    evidence = Evidence(*window)

    def look() -> tuple[list[EggAPITask], list[EggAPITask]]:
        tasks, evidence.scanned = scan(
            client, model=model, task_type=task_type, prompt=prompt, since=window[0] - LOOKBACK
        )
        seen = known()
        seen -= {
            t.id
            for t in tasks
            if t.id in seen
            and t.created_at is not None
            and window[0] <= t.created_at <= window[1]
            and own(t.id)
        }
        candidates, foreign = classify(
            tasks,
            window=window,
            known=seen,
            floor=floor,
            floor_ids=floor_ids,
            siblings=siblings,
        )
        evidence.candidates = [t.id for t in candidates]
        evidence.foreign = [t.id for t in foreign]
        return candidates, foreign

    candidates, foreign = look()
    if not candidates:
        # The list may lag the write; look again before calling it proof.
        time.sleep(settle_seconds)
        candidates, foreign = look()
        if not candidates:
            return Reconciliation(None, True, evidence)
    if len(candidates) == 1 and not foreign:
        return Reconciliation(candidates[0], False, evidence)
    if len(candidates) == 1:
        evidence.note = "adoption suspended: another client is creating tasks on this key"
    return Reconciliation(None, False, evidence)
