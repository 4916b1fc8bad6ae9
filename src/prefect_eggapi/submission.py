"""Submit at most once per logical piece of work, whatever retries or crashes happen.

The decision table (ledger state -> action) is the heart of "no money lost to duplicate jobs":

=================  ===========================================================================
no entry           claim (``submitting``), POST, record the task id
submitted & later  reconnect to the recorded task; never POST again
rejected           the API refused the POST, nothing exists: POST again
failed             terminal failure (moderation): raise without paying; else a fresh attempt
submitting         another live owner is posting: wait for it; owner dead/lease over: reconcile
ambiguous          reconcile again (the list may have caught up)
=================  ===========================================================================

The task list shows no prompt, so a lost 202 can only be matched by model, type and time. Two
POSTs of one model whose answers are lost together could not be told apart, so each *lane*
(account, model, type) lets one POST at a time be in flight with an unknown outcome, from the
claim until the ledger knows the answer (``lane_width`` > 1 trades that for submit throughput:
such overlaps then fail loudly, never with a wrong image or a second payment).

No Prefect imports: the Prefect tasks add names, logs, events and retries around this.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from prefect_eggapi.client import EggAPIClient
from prefect_eggapi.errors import (
    AmbiguousSubmitError,
    BudgetExceededError,
    ContentModerationError,
    EggAPIError,
    EmptyOutputError,
    ReconciliationError,
    TaskAbandonedError,
    TaskFailedError,
    describe,
)
from prefect_eggapi.ledger import (
    LIVE_STATES,
    EntryState,
    LedgerEntry,
    LedgerStore,
    ledger_key,
    owner_id,
    owner_is_dead,
    with_conflict_retry,
)
from prefect_eggapi.models import GenerateRequest, Task, TaskStatus
from prefect_eggapi.pricing import estimate_cost
from prefect_eggapi.reconcile import DEFAULT_SKEW, UNKNOWN_OFFSET_SKEW, reconcile


@dataclass
class SubmitOutcome:
    task: Task
    entry: LedgerEntry
    reconnected: bool = False  # an already recorded task was reused: nothing paid now
    adopted: bool = False  # found by reconciliation after an ambiguous submit


@dataclass
class _Plan:
    action: str  # post | reconnect | reconcile | wait
    entry: LedgerEntry


class Lane:
    """POSTs of one (account, model, type) in flight in this process, whose answers a lost 202
    could confuse with each other. Each submitter brings its own width: it enters only while
    fewer than that many POSTs (anyone's) are in flight."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._in_flight = 0

    @contextmanager
    def hold(self, width: int) -> Iterator[None]:
        with self._cond:
            while self._in_flight >= width:
                self._cond.wait()
            self._in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()


_LANES: dict[tuple[str, str, str], Lane] = {}
_LANES_LOCK = threading.Lock()


def submit_lane(account: str, model: str, task_type: str) -> Lane:
    """The process's lane of ``(account, model, type)``."""
    ident = (account, model, task_type)
    with _LANES_LOCK:
        if ident not in _LANES:
            _LANES[ident] = Lane()
        return _LANES[ident]


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


class Submitter:
    """Ledger-guarded submits for one client and one ledger."""

    def __init__(
        self,
        client: EggAPIClient,
        ledger: LedgerStore,
        *,
        lease_seconds: float | None = None,
        settle_seconds: float = 2.0,
        owner_wait_poll: float = 0.25,
        sibling_wait_seconds: float = 10.0,
        lane_width: int = 1,
    ) -> None:
        if lane_width < 1:
            raise ValueError("lane_width must be at least 1")
        self.client = client
        self.ledger = ledger
        timeout = client.timeout
        # A POST cannot be in flight longer than connect + write + read (+ margin).
        self.lease_seconds = lease_seconds or (
            (timeout.connect or 5) + (timeout.write or 30) + (timeout.read or 30) + 10
        )
        self.settle_seconds = settle_seconds
        self.owner_wait_poll = owner_wait_poll
        self.sibling_wait_seconds = sibling_wait_seconds
        self.lane_width = lane_width
        self.owner = owner_id()

    # ------------------------------------------------------------------ decisions

    def _plan(self, entry: LedgerEntry | None, fresh: LedgerEntry) -> _Plan:
        if entry is None:
            return _Plan("post", fresh)
        if entry.state in LIVE_STATES:
            return _Plan("reconnect", entry)
        if entry.state is EntryState.REJECTED:
            return _Plan("post", entry)
        if entry.state is EntryState.FAILED:
            if not entry.retryable:
                error = entry.error or {}
                failed = Task(
                    id=entry.task_id or "unknown",
                    status=TaskStatus.FAILED,
                    error=error.get("task_error") or error.get("message"),
                )
                raise ContentModerationError(failed)
            entry.attempt += 1
            entry.history.append(f"attempt {entry.attempt}: fresh submit after retryable failure")
            entry.task_id = None
            entry.cost = None
            return _Plan("post", entry)
        if entry.state is EntryState.AMBIGUOUS:
            return _Plan("reconcile", entry)
        # SUBMITTING: someone may be mid-POST.
        if entry.owner == self.owner or owner_is_dead(entry.owner) or entry.lease_expired():
            return _Plan("reconcile", entry)
        return _Plan("wait", entry)

    def _siblings(self, entry: LedgerEntry, start: datetime, end: datetime) -> list[LedgerEntry]:
        """Other unresolved submits of the same model and type whose POST overlapped ours."""
        now = datetime.now(UTC)
        out = []
        for other in self.ledger.entries({EntryState.SUBMITTING, EntryState.AMBIGUOUS}):
            if other.key == entry.key or other.sent_at is None:
                continue
            if other.model != entry.model or other.task_type != entry.task_type:
                continue
            other_end = datetime.fromtimestamp(other.lease_until, UTC) if other.lease_until else now
            if other.sent_at <= end and other_end >= start:
                out.append(other)
        return out

    def _check_budget(self, entry: LedgerEntry, cap: Decimal | None) -> None:
        if cap is None or not entry.scope:
            return
        held = self.ledger.scope_spend(entry.scope)
        existing = self.ledger.get(entry.key)
        if existing is not None:
            held -= existing.committed_spend
        if held + entry.estimate > cap:
            raise BudgetExceededError(
                scope=entry.scope, cap=cap, committed=held, estimate=entry.estimate
            )

    def _claim(self, entry: LedgerEntry) -> None:
        entry.state = EntryState.SUBMITTING
        entry.owner = self.owner
        entry.sent_at = datetime.now(UTC)
        entry.lease_until = time.time() + self.lease_seconds
        entry.error = None
        self.ledger.put(entry)

    # ------------------------------------------------------------------ public

    def submit(
        self,
        request: GenerateRequest,
        *,
        logical_key: str,
        scope: str = "",
        budget: Decimal | None = None,
        label: str = "",
    ) -> SubmitOutcome:
        fingerprint = request.fingerprint()
        key = ledger_key(logical_key, fingerprint)
        fresh = LedgerEntry(
            key=key,
            logical_key=logical_key,
            fingerprint=fingerprint,
            scope=scope,
            state=EntryState.SUBMITTING,
            model=request.model,
            task_type=request.task_type,
            prompt_sha256=_sha(request.prompt),
            prompt=request.prompt[:200],
            label=label,
            estimate=estimate_cost(request),
        )
        wait_until = time.monotonic() + self.lease_seconds + 5
        lane = submit_lane(self.client.account, request.model, request.task_type)

        def decide() -> _Plan:
            with self.ledger.transaction():
                plan = self._plan(self.ledger.get(key), fresh.model_copy(deep=True))
                if plan.action == "post":
                    self._check_budget(plan.entry, budget)
                    self._claim(plan.entry)
                return plan

        while True:
            # Claim inside the lane, so the lease and the reconciliation window start when the
            # POST really can, not while queueing behind other submits.
            with lane.hold(self.lane_width):
                plan = with_conflict_retry(decide)
                if plan.action == "post":
                    return self._post(request, plan.entry, resubmit=True)
                if plan.action == "reconcile" or (
                    plan.action == "wait" and time.monotonic() > wait_until
                ):
                    return self._reconcile_entry(request, plan.entry)
            if plan.action == "reconnect":
                break
            time.sleep(self.owner_wait_poll)  # another live owner is posting this key

        entry = plan.entry
        assert entry.task_id is not None
        return SubmitOutcome(self.client.get_task(entry.task_id), entry, reconnected=True)

    def _reconcile_entry(self, request: GenerateRequest, entry: LedgerEntry) -> SubmitOutcome:
        """Settle an entry whose POST was left unresolved (crash, expired lease, ambiguity)."""
        window_end = (
            datetime.fromtimestamp(entry.lease_until, UTC)
            if entry.lease_until
            else datetime.now(UTC)
        )
        return self._reconcile(
            request, entry, entry.sent_at or window_end, window_end, resubmit=True
        )

    def _post(
        self, request: GenerateRequest, entry: LedgerEntry, *, resubmit: bool
    ) -> SubmitOutcome:
        try:
            task = self.client.generate(request)
        except AmbiguousSubmitError as exc:
            entry.history.append(f"ambiguous submit: {exc.cause!r}")
            return self._reconcile(request, entry, exc.sent_at, exc.failed_at, resubmit=resubmit)
        except EggAPIError as exc:
            # 4xx, or 429/connection errors after retries: provably nothing was created.
            entry.state = EntryState.REJECTED
            entry.error = describe(exc)
            entry.owner = None
            self.ledger.put(entry)
            raise
        self._record_submitted(entry, task, "submitted")
        return SubmitOutcome(task, entry)

    def _record_submitted(self, entry: LedgerEntry, task: Task, how: str) -> None:
        entry.state = EntryState.SUBMITTED
        entry.task_id = task.id
        entry.owner = None
        entry.lease_until = None
        entry.history.append(f"task {task.id} {how} (attempt {entry.attempt})")
        self.ledger.put(entry)

    def _reconcile(
        self,
        request: GenerateRequest,
        entry: LedgerEntry,
        sent_at: datetime,
        failed_at: datetime,
        *,
        resubmit: bool,
    ) -> SubmitOutcome:
        offset = self.client.clock_offset
        shift = timedelta(seconds=offset or 0)
        skew = DEFAULT_SKEW if offset is not None else UNKNOWN_OFFSET_SKEW
        deadline = time.monotonic() + self.sibling_wait_seconds
        while True:
            result = reconcile(
                self.client,
                model=request.model,
                task_type=request.task_type,
                prompt=request.prompt,
                sent_at=sent_at + shift,
                failed_at=failed_at + shift,
                exclude=self.ledger.known_task_ids(),
                settle_seconds=self.settle_seconds,
                skew=skew,
            )
            siblings = self._siblings(entry, sent_at - skew, failed_at + skew)
            if result.task is None or not siblings:
                break
            in_flight = any(other.state is EntryState.SUBMITTING for other in siblings)
            # The one candidate may belong to a concurrent submit of ours whose answer has not
            # been recorded yet (or that is itself ambiguous): the task list shows no prompt, so
            # adopting now could give this item another item's image. Let them settle first.
            if not in_flight or time.monotonic() > deadline:  # ambiguous ones stay ambiguous
                result.task = None
                result.evidence.note = (
                    f"{len(siblings)} concurrent submit(s) of the same model are unresolved "
                    "in this window; adopting could take another item's task"
                )
                break
            time.sleep(self.owner_wait_poll)
        if result.task is not None:
            self._record_submitted(entry, result.task, "adopted by reconciliation")
            return SubmitOutcome(result.task, entry, adopted=True)
        if result.nothing_created and resubmit:
            entry.history.append(f"reconciliation proved nothing was created ({result.evidence})")
            with self.ledger.transaction():
                self._claim(entry)
            return self._post(request, entry, resubmit=False)
        entry.state = EntryState.AMBIGUOUS
        entry.owner = None
        entry.error = {"message": "submit outcome unknown", "evidence": str(result.evidence)}
        self.ledger.put(entry)
        raise ReconciliationError(
            "could not tell whether the lost submit created a task",
            evidence=str(result.evidence),
            sent_at=sent_at,
            failed_at=failed_at,
            model=request.model,
            prompt=request.prompt,
            task_type=request.task_type,
        )


def record_outcome(
    ledger: LedgerStore,
    task_id: str,
    *,
    task: Task | None = None,
    error: BaseException | None = None,
    outputs: list[dict[str, Any]] | None = None,
    polls: int = 0,
) -> LedgerEntry | None:
    """Move the ledger entry of ``task_id`` forward after a wait or a persist."""
    return with_conflict_retry(
        lambda: _record_outcome(ledger, task_id, task, error, outputs, polls)
    )


def _record_outcome(
    ledger: LedgerStore,
    task_id: str,
    task: Task | None,
    error: BaseException | None,
    outputs: list[dict[str, Any]] | None,
    polls: int,
) -> LedgerEntry | None:
    with ledger.transaction():
        entry = ledger.find_task(task_id)
        if entry is None or entry.task_id != task_id:
            return entry  # not ours, or an older attempt of an entry that moved on
        entry.polls += polls
        if outputs is not None:
            entry.state = EntryState.PERSISTED
            entry.outputs = outputs
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
            return entry
        ledger.put(entry)
        return entry
