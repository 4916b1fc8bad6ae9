"""The submitter's decision table, with no I/O: given what the ledger, the lane and
reconciliation say, what happens next.

What the ledger entry says (:func:`plan`; a POST must also fit the scope's budget,
:func:`budget_refusal`):

=================  ===========================================================================
no entry           POST (claim ``submitting``, POST, record the task id)
submitted & later  RECONNECT to the recorded task; never POST again
rejected           the API refused the POST, nothing exists: POST again
failed, terminal   FAIL (moderation): raise without paying
failed, retryable  a fresh attempt (its task, cost and nonces cleared): POST
ambiguous          RECONCILE again (the list may have caught up)
submitting         ours, or its owner provably dead, or its lease over: RECONCILE; else WAIT
=================  ===========================================================================

Inside the lane (:func:`step`): a WAIT that outlasted every lease is settled like a RECONCILE.

What reconciliation says (:func:`judge_siblings`, then :func:`verdict`): a candidate made inside
an unresolved sibling's window waits for that sibling while it is still posting, then is not
adopted; a lone candidate is ADOPTED; a window proven empty is POSTED AGAIN once, and after that
re-post it is NOTHING CREATED (rejected, raised); anything else is ambiguous: with webhooks the
entry AWAITS its DELIVERY, without them it FAILS loudly.

Every function here takes the clock and the "is that owner dead" probe as arguments, so each row
is testable without servers (``tests/test_submitter_decisions.py``); the submitter does the I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum

from prefect_eggapi.client.errors import BudgetExceededError, ContentModerationError
from prefect_eggapi.client.types import EggAPITask, TaskStatus
from prefect_eggapi.safety.ledger import LIVE_STATES, EntryState, LedgerEntry
from prefect_eggapi.safety.reconcile import DEFAULT_SKEW, UNKNOWN_OFFSET_SKEW, Span

#: Whether an owner id is provably dead (``ledger.owner_is_dead`` in production).
OwnerProbe = Callable[[str | None], bool]


class Action(StrEnum):
    """What the ledger entry says to do."""

    POST = "post"
    RECONNECT = "reconnect"
    RECONCILE = "reconcile"
    WAIT = "wait"
    FAIL = "fail"


@dataclass(frozen=True)
class Plan:
    action: Action
    entry: LedgerEntry


def plan(
    entry: LedgerEntry | None,
    fresh: LedgerEntry,
    *,
    me: str,
    now: float,
    is_dead: OwnerProbe,
) -> Plan:
    """The row of the table for ``entry`` (None: not in the ledger, ``fresh`` is posted).

    A retryable failure is turned into the next attempt on ``entry`` itself (in memory: the
    caller writes it when it claims).
    """
    if entry is None:
        return Plan(Action.POST, fresh)
    if entry.state in LIVE_STATES:
        return Plan(Action.RECONNECT, entry)
    if entry.state is EntryState.REJECTED:
        return Plan(Action.POST, entry)
    if entry.state is EntryState.FAILED:
        if not entry.retryable:
            return Plan(Action.FAIL, entry)
        fresh_attempt(entry)
        return Plan(Action.POST, entry)
    if entry.state is EntryState.AMBIGUOUS:
        return Plan(Action.RECONCILE, entry)
    # SUBMITTING: someone may be mid-POST.
    if entry.owner == me or is_dead(entry.owner) or entry.lease_expired(now):
        return Plan(Action.RECONCILE, entry)
    return Plan(Action.WAIT, entry)


def budget_refusal(
    entry: LedgerEntry, cap: Decimal | None, scope_spend: Callable[[str], Decimal]
) -> BudgetExceededError | None:
    """The refusal when posting ``entry`` would take its scope past ``cap`` (None: it fits).

    What the scope holds counts this entry's own committed spend once: an entry already in the
    ledger (a re-post) is not charged twice. ``scope_spend`` is read only when a cap applies.
    """
    if cap is None or not entry.scope:
        return None
    held = scope_spend(entry.scope)
    held -= entry.committed_spend if entry.version is not None else Decimal(0)
    if held + entry.estimate > cap:
        return BudgetExceededError(
            scope=entry.scope, cap=cap, committed=held, estimate=entry.estimate
        )
    return None


def fresh_attempt(entry: LedgerEntry) -> None:
    """Start the next attempt of an entry whose task failed retryably."""
    entry.attempt += 1
    entry.history.append(f"attempt {entry.attempt}: fresh submit after retryable failure")
    entry.task_id = None
    entry.cost = None
    # Nonces attribute within one attempt only: the failed attempt's delivery names the
    # failed task, which must never be taken for the new attempt's.
    if entry.nonces:
        entry.history.append(f"attempt {entry.attempt - 1} nonces retired")
        entry.nonces = []


def terminal_failure(entry: LedgerEntry) -> ContentModerationError:
    """The error a FAIL row raises: the failed task as the ledger recorded it."""
    error = entry.error or {}
    failed = EggAPITask(
        id=entry.task_id or "unknown",
        status=TaskStatus.FAILED,
        error=error.get("task_error") or error.get("message"),
    )
    return ContentModerationError(failed)


class Step(StrEnum):
    """What the submitter does with a plan inside the lane."""

    POST = "post"
    SETTLE = "settle"
    RECONNECT = "reconnect"
    SLEEP = "sleep"  # another live owner is posting: look again later, outside the lane


def step(action: Action, *, waited_out: bool) -> Step:
    """A WAIT past every lease (``waited_out``) is settled: its owner cannot still be posting."""
    if action is Action.POST:
        return Step.POST
    if action is Action.RECONCILE or (action is Action.WAIT and waited_out):
        return Step.SETTLE
    if action is Action.RECONNECT:
        return Step.RECONNECT
    if action is Action.WAIT:
        return Step.SLEEP
    raise ValueError(f"{action} has no step: it is raised before the lane is used")


# ------------------------------------------------------------------------ the POST's window


def post_ended(entry: LedgerEntry, now: datetime) -> datetime:
    """Our clock: when the POST gave up, or the latest it can still be in flight."""
    if entry.failed_at is not None:
        return entry.failed_at
    if entry.lease_until is not None:
        return min(now, datetime.fromtimestamp(entry.lease_until, UTC))
    return now


def span(entry: LedgerEntry, fallback_offset: float | None, now: datetime) -> Span:
    """The server-time window in which ``entry``'s POST could have created its task."""
    offset = entry.clock_offset if entry.clock_offset is not None else fallback_offset
    skew = DEFAULT_SKEW if offset is not None else UNKNOWN_OFFSET_SKEW
    shift = timedelta(seconds=offset or 0)
    end = post_ended(entry, now)
    return (entry.sent_at or end) + shift - skew, end + shift + skew


# ------------------------------------------------------------------------ after reconciliation


class Siblings(StrEnum):
    """What the unresolved submits around a candidate allow."""

    CLEAR = "clear"  # no sibling could have made it: the verdict stands
    WAIT = "wait"  # a sibling that could have made it is still posting: look again soon
    SUSPEND = "suspend"  # a sibling could have made it: adopting could take its task


def judge_siblings(
    made: datetime | None,
    siblings: Sequence[tuple[LedgerEntry, Span]],
    *,
    now: float,
    is_dead: OwnerProbe,
    past_deadline: bool,
) -> tuple[Siblings, int]:
    """Only a sibling whose own window holds the candidate (created at ``made``) could have made
    it; the second value counts those. The task list shows no prompt, so while one of them is
    still posting its answer may yet claim the candidate; ambiguous ones stay ambiguous, and
    after ``past_deadline`` nobody is waited for."""
    overlapping = [
        other for other, window in siblings if made is not None and window[0] <= made <= window[1]
    ]
    if not overlapping:
        return Siblings.CLEAR, 0
    in_flight = any(
        other.state is EntryState.SUBMITTING
        and not is_dead(other.owner)
        and not other.lease_expired(now)
        for other in overlapping
    )
    if in_flight and not past_deadline:
        return Siblings.WAIT, len(overlapping)
    return Siblings.SUSPEND, len(overlapping)


class Verdict(StrEnum):
    """What a settled reconciliation means for the entry."""

    ADOPT = "adopt"  # the one candidate is this POST's task: record it
    POST_AGAIN = "post again"  # proven empty, first time: claim and POST once more
    NOTHING_CREATED = "nothing created"  # proven empty after the re-post: reject and raise
    AWAIT_DELIVERY = "await delivery"  # ambiguous, but this POST's webhook will name its task
    FAIL = "fail"  # ambiguous: record it and fail loudly with the evidence


def verdict(
    *,
    found: bool,
    nothing_created: bool,
    may_post: bool,
    resubmit: bool,
    webhook: bool,
    delivery_wait_seconds: float,
) -> Verdict:
    """``found``: reconciliation names a task; ``may_post``: a request is at hand (False for a
    late attribution, which never posts or waits); ``resubmit``: this POST was not itself the
    re-post; ``webhook``: the request has a webhook URL and the entry has nonces."""
    if found:
        return Verdict.ADOPT
    if nothing_created and may_post:
        return Verdict.POST_AGAIN if resubmit else Verdict.NOTHING_CREATED
    if may_post and webhook and delivery_wait_seconds > 0:
        return Verdict.AWAIT_DELIVERY
    return Verdict.FAIL
