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

With webhooks on (the request has a ``webhook_url``), every POST sends its own URL, the user's
with ``/s/<nonce>`` appended, and keeps the nonce in its entry. A signed delivery to that URL,
recorded by the receiver in the ledger's delivery log, names exactly the task that POST made:
a lost answer that the task list cannot attribute (other traffic on the key, overlapping
submits) is then settled by waiting for the delivery instead of failing.

No Prefect imports: the Prefect tasks add names, logs, events and retries around this.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from prefect_eggapi.client import EggAPIClient
from prefect_eggapi.client.errors import (
    AmbiguousSubmitError,
    BudgetExceededError,
    ContentModerationError,
    EggAPIError,
    EmptyOutputError,
    InvalidRequestError,
    NothingCreatedError,
    ReconciliationError,
    TaskAbandonedError,
    TaskFailedError,
    describe,
)
from prefect_eggapi.client.pricing import estimate_cost
from prefect_eggapi.client.registry import Registry
from prefect_eggapi.client.types import (
    MAX_WEBHOOK_URL_CHARS,
    EggAPITask,
    GenerateRequest,
    TaskStatus,
)
from prefect_eggapi.safety.ledger import (
    LIVE_STATES,
    EntryState,
    LedgerEntry,
    LedgerStore,
    ledger_key,
    owner_id,
    owner_is_dead,
    with_conflict_retry,
)
from prefect_eggapi.safety.reconcile import DEFAULT_SKEW, UNKNOWN_OFFSET_SKEW, Span, reconcile
from prefect_eggapi.webhooks.verify import NONCE_SUFFIX_CHARS, new_nonce, with_nonce


@dataclass
class SubmitOutcome:
    task: EggAPITask
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


_LANES: Registry[tuple[str, str, str], Lane] = Registry("submit lanes by account, model, type")


def submit_lane(account: str, model: str, task_type: str) -> Lane:
    """The process's lane of ``(account, model, type)``."""
    return _LANES.get((account, model, task_type), Lane)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class _AwaitDelivery(Exception):
    """The list cannot attribute a lost answer, but the POST's webhook delivery will."""

    def __init__(self, entry: LedgerEntry, error: ReconciliationError) -> None:
        super().__init__(entry.key)
        self.entry = entry
        self.error = error


class _Replan(Exception):
    """Our claim was taken over (our lease ran out): read the entry again and re-plan."""


def _post_ended(entry: LedgerEntry) -> datetime:
    """Our clock: when the POST gave up, or the latest it can still be in flight."""
    if entry.failed_at is not None:
        return entry.failed_at
    now = datetime.now(UTC)
    if entry.lease_until is not None:
        return min(now, datetime.fromtimestamp(entry.lease_until, UTC))
    return now


def _span(entry: LedgerEntry, fallback_offset: float | None) -> Span:
    """The server-time window in which ``entry``'s POST could have created its task."""
    offset = entry.clock_offset if entry.clock_offset is not None else fallback_offset
    skew = DEFAULT_SKEW if offset is not None else UNKNOWN_OFFSET_SKEW
    shift = timedelta(seconds=offset or 0)
    end = _post_ended(entry)
    return (entry.sent_at or end) + shift - skew, end + shift + skew


class Submitter:
    """Ledger-guarded submits for one client and one ledger.

    Every change to an entry is a compare-and-swap on what was just read (see ``ledger``), and
    only the owner of a ``submitting`` claim moves it on; another worker takes a claim over only
    when its owner is provably dead or its lease ran out. POSTs and reconciliations run inside
    the lane of (account, model, type), held in this process and in the ledger, so every other
    task of this lane made by any worker of the ledger is recorded before a window is judged.
    """

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
        delivery_wait_seconds: float = 900.0,
        delivery_poll: float = 0.5,
    ) -> None:
        if lane_width < 1:
            raise ValueError("lane_width must be at least 1")
        if delivery_wait_seconds < 0:
            raise ValueError("delivery_wait_seconds must not be negative")
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
        # With webhooks on, how long a lost answer may wait for its delivery (which comes when the
        # task is over: queue + processing time) before it fails as unattributable.
        self.delivery_wait_seconds = delivery_wait_seconds
        self.delivery_poll = delivery_poll
        # The lane is held across a POST and, at worst, two reconciliations.
        self.lane_seconds = self.lease_seconds + 4 * settle_seconds + sibling_wait_seconds + 30
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
                failed = EggAPITask(
                    id=entry.task_id or "unknown",
                    status=TaskStatus.FAILED,
                    error=error.get("task_error") or error.get("message"),
                )
                raise ContentModerationError(failed)
            entry.attempt += 1
            entry.history.append(f"attempt {entry.attempt}: fresh submit after retryable failure")
            entry.task_id = None
            entry.cost = None
            # Nonces attribute within one attempt only: the failed attempt's delivery names the
            # failed task, which must never be taken for the new attempt's.
            if entry.nonces:
                entry.history.append(f"attempt {entry.attempt - 1} nonces retired")
                entry.nonces = []
            return _Plan("post", entry)
        if entry.state is EntryState.AMBIGUOUS:
            return _Plan("reconcile", entry)
        # SUBMITTING: someone may be mid-POST.
        if entry.owner == self.owner or owner_is_dead(entry.owner) or entry.lease_expired():
            return _Plan("reconcile", entry)
        return _Plan("wait", entry)

    def _siblings(self, entry: LedgerEntry) -> list[tuple[LedgerEntry, Span]]:
        """Other unresolved submits of the same model and type, with their windows."""
        out = []
        for other in self.ledger.unresolved():
            if other.key == entry.key or other.sent_at is None:
                continue
            if other.model != entry.model or other.task_type != entry.task_type:
                continue
            out.append((other, _span(other, self.client.clock_offset)))
        return out

    def _check_budget(self, entry: LedgerEntry, cap: Decimal | None) -> None:
        if cap is None or not entry.scope:
            return
        held = self.ledger.scope_spend(entry.scope)
        held -= entry.committed_spend if entry.version is not None else Decimal(0)
        if held + entry.estimate > cap:
            raise BudgetExceededError(
                scope=entry.scope, cap=cap, committed=held, estimate=entry.estimate
            )

    def _claim(self, entry: LedgerEntry, request: GenerateRequest) -> None:
        """Mark ``entry`` as being posted by us now (the caller writes it)."""
        floor, floor_ids = self.client.durations.horizon()
        if request.webhook_url:
            entry.nonces.append(new_nonce())
        entry.state = EntryState.SUBMITTING
        entry.owner = self.owner
        entry.sent_at = datetime.now(UTC)
        entry.failed_at = None
        entry.lease_until = time.time() + self.lease_seconds
        entry.clock_offset = self.client.clock_offset
        entry.floor, entry.floor_ids = floor, floor_ids
        entry.error = None

    def _take_over(self, entry: LedgerEntry) -> None:
        """Own an unresolved entry to reconcile it; its POST's window stays as recorded."""
        entry.state = EntryState.SUBMITTING
        entry.owner = self.owner
        entry.lease_until = time.time() + self.lease_seconds
        entry.failed_at = _post_ended(entry)  # a dead owner's POST ended by now at the latest

    def _transition(self, entry: LedgerEntry, change: Callable[[LedgerEntry], None]) -> LedgerEntry:
        """Apply ``change`` to the stored entry if our claim on it still stands, else re-plan."""

        def attempt() -> LedgerEntry:
            with self.ledger.transaction():
                current = self.ledger.get(entry.key)
                if (
                    current is None
                    or current.state is not EntryState.SUBMITTING
                    or current.owner != self.owner
                ):
                    raise _Replan(entry.key)
                change(current)
                self.ledger.put(current)
                return current

        return with_conflict_retry(attempt)

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
        room = MAX_WEBHOOK_URL_CHARS - NONCE_SUFFIX_CHARS
        if request.webhook_url and len(request.webhook_url) > room:
            raise InvalidRequestError(
                [("webhook_url", f"must be at most {room} characters (room for /s/<nonce>)")]
            )
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
        lane_name = f"{self.client.account}|{request.model}|{request.task_type}"

        def decide() -> _Plan:
            with self.ledger.transaction():
                plan = self._plan(self.ledger.get(key), fresh.model_copy(deep=True))
                if plan.action == "post":
                    self._check_budget(plan.entry, budget)
                    self._claim(plan.entry, request)
                    self.ledger.put(plan.entry)
                elif plan.action == "reconcile":
                    self._take_over(plan.entry)
                    self.ledger.put(plan.entry)
                return plan

        while True:
            current = self.ledger.get(key)
            if current is not None and current.state in LIVE_STATES:
                return self._reconnect(current)
            if self.client.clock_offset is None:
                self.client.probe_clock()  # before anything is paid: a failure costs nothing
            # Claim inside the lane, so the lease and the reconciliation window start when the
            # POST really can, not while queueing behind other submits.
            try:
                with (
                    lane.hold(self.lane_width),
                    self.ledger.lane(
                        lane_name,
                        width=self.lane_width,
                        owner=self.owner,
                        seconds=self.lane_seconds,
                    ),
                ):
                    plan = with_conflict_retry(decide)
                    if plan.action == "post":
                        return self._post(request, plan.entry, resubmit=True)
                    if plan.action == "reconcile" or (
                        plan.action == "wait" and time.monotonic() > wait_until
                    ):
                        return self._settle(request, plan.entry, resubmit=True)
            except _Replan:
                continue  # another worker took our claim over: see what it recorded
            except _AwaitDelivery as waiting:
                self._await_delivery(waiting)
                continue  # delivered: the ambiguous entry is settled from the delivery log
            if plan.action == "reconnect":
                return self._reconnect(plan.entry)
            time.sleep(self.owner_wait_poll)  # another live owner is posting this key

    def _await_delivery(self, waiting: _AwaitDelivery) -> None:
        """Outside the lane, wait for a delivery to any of the entry's nonces; else fail."""
        deadline = time.monotonic() + self.delivery_wait_seconds
        while True:
            current = self.ledger.get(waiting.entry.key) or waiting.entry
            if current.state is not EntryState.AMBIGUOUS or self._delivery(current) is not None:
                return  # delivered, or another worker settled it meanwhile
            if time.monotonic() >= deadline:
                raise waiting.error
            time.sleep(self.delivery_poll)

    def _delivery(self, entry: LedgerEntry) -> str | None:
        """The task a delivery to one of the entry's nonces named (newest POST first)."""
        for nonce in reversed(entry.nonces):
            task_id = self.ledger.delivered(nonce)
            if task_id is not None:
                return task_id
        return None

    def _adopt_delivered(self, entry: LedgerEntry, task_id: str, prompt: str) -> SubmitOutcome:
        """Adopt the task a signed delivery attributed to this entry's POST, after checking it."""
        task = self.client.get_task(task_id)
        owner = self.ledger.task_entry_key(task_id)
        mismatch = (task.model and task.model != entry.model) or (
            task.type and task.type != entry.task_type
        )
        # Indexed to this entry is fine: a writer killed between the index and the entry write
        # left it so. Earlier attempts cannot get here: their nonces are retired (see _plan).
        if mismatch or owner not in (None, entry.key):
            raise ReconciliationError(
                "the webhook delivery for this submission names a task that cannot be its own",
                evidence=f"task {task_id}: model {task.model}, type {task.type}, recorded for "
                f"entry {owner or 'none'}",
                sent_at=entry.sent_at or datetime.now(UTC),
                failed_at=entry.failed_at or datetime.now(UTC),
                model=entry.model,
                prompt=prompt,
                task_type=entry.task_type,
            )
        return self._record_task(entry, task, "adopted from its webhook delivery")

    def attribute(self, key: str) -> SubmitOutcome | None:
        """Settle an ambiguous entry late, never posting: from its webhook delivery, or from the
        task list now that the submits around it have answers. None: still not attributable
        (the entry stays ambiguous, with the new evidence). Used by the recovery flow."""
        entry = self.ledger.get(key)
        if entry is None or entry.state is not EntryState.AMBIGUOUS:
            return None
        lane = submit_lane(self.client.account, entry.model, entry.task_type)

        def take() -> LedgerEntry:
            with self.ledger.transaction():
                current = self.ledger.get(key)
                if current is None or current.state is not EntryState.AMBIGUOUS:
                    raise _Replan(key)
                self._take_over(current)
                self.ledger.put(current)
                return current

        with (
            lane.hold(self.lane_width),
            self.ledger.lane(
                f"{self.client.account}|{entry.model}|{entry.task_type}",
                width=self.lane_width,
                owner=self.owner,
                seconds=self.lane_seconds,
            ),
        ):
            try:
                taken = with_conflict_retry(take)
                return self._settle(None, taken, resubmit=False)
            except (_Replan, ReconciliationError):
                return None

    def _reconnect(self, entry: LedgerEntry) -> SubmitOutcome:
        assert entry.task_id is not None
        return SubmitOutcome(self.client.get_task(entry.task_id), entry, reconnected=True)

    def _post(
        self, request: GenerateRequest, entry: LedgerEntry, *, resubmit: bool
    ) -> SubmitOutcome:
        sent = request
        if request.webhook_url and entry.nonces:
            url = with_nonce(request.webhook_url, entry.nonces[-1])
            sent = request.model_copy(update={"webhook_url": url})
        try:
            task = self.client.generate(sent)
        except AmbiguousSubmitError as exc:
            lost: AmbiguousSubmitError = exc

            def ambiguous(current: LedgerEntry) -> None:
                current.failed_at = lost.failed_at
                current.history.append(f"ambiguous submit: {lost.cause!r}")

            entry = self._transition(entry, ambiguous)
            return self._settle(request, entry, resubmit=resubmit)
        except EggAPIError as exc:
            # 4xx, or 429/connection errors after retries: provably nothing was created.
            refusal = describe(exc)

            def rejected(current: LedgerEntry) -> None:
                current.state = EntryState.REJECTED
                current.error = refusal
                current.owner = None

            with contextlib.suppress(_Replan):
                self._transition(entry, rejected)
            raise
        return self._record_task(entry, task, "submitted")

    def _record_task(self, entry: LedgerEntry, task: EggAPITask, how: str) -> SubmitOutcome:
        """Record the task our POST made. If another worker took the claim over meanwhile and
        recorded a different task, ours is kept as the entry's extra (explained, collectable) and
        the item reconnects to the recorded one."""

        def attempt() -> tuple[LedgerEntry, bool]:
            with self.ledger.transaction():
                current = self.ledger.get(entry.key) or entry
                if current.state in LIVE_STATES and current.task_id != task.id:
                    if task.id not in current.extra_tasks:
                        current.extra_tasks.append(task.id)
                        current.history.append(
                            f"task {task.id} {how} after the claim was taken over; the item "
                            f"keeps {current.task_id}"
                        )
                        self.ledger.put(current)
                    return current, False
                if current.state not in LIVE_STATES:
                    current.state = EntryState.SUBMITTED
                    current.task_id = task.id
                    current.owner = None
                    current.lease_until = None
                    current.history.append(f"task {task.id} {how} (attempt {current.attempt})")
                    self.ledger.put(current)
                return current, True

        recorded, ours = with_conflict_retry(attempt)
        if not ours:
            return self._reconnect(recorded)
        return SubmitOutcome(task, recorded, adopted=how.startswith("adopted"))

    def _settle(
        self, request: GenerateRequest | None, entry: LedgerEntry, *, resubmit: bool
    ) -> SubmitOutcome:
        """Reconcile the unresolved POST of ``entry`` (ours, inside the lane). ``request`` None:
        a late attribution that must never post (or wait)."""
        prompt = request.prompt if request is not None else entry.prompt
        delivered = self._delivery(entry)
        if delivered is not None:
            return self._adopt_delivered(entry, delivered, prompt)
        window = _span(entry, self.client.clock_offset)
        deadline = time.monotonic() + self.sibling_wait_seconds
        while True:
            siblings = self._siblings(entry)
            result = reconcile(
                self.client,
                model=entry.model,
                task_type=entry.task_type,
                prompt=prompt,
                window=window,
                known=self.ledger.known_task_ids,
                floor=entry.floor,
                floor_ids=entry.floor_ids,
                siblings=[span for _, span in siblings],
                settle_seconds=self.settle_seconds,
                own=lambda task_id: self.ledger.task_entry_key(task_id) == entry.key,
            )
            # Only a sibling whose own window holds the candidate could have made it.
            made = result.task.created_at if result.task is not None else None
            overlapping = [
                other for other, span in siblings if made is not None and span[0] <= made <= span[1]
            ]
            if result.task is None or not overlapping:
                break
            in_flight = any(
                other.state is EntryState.SUBMITTING
                and not owner_is_dead(other.owner)
                and not other.lease_expired()
                for other in overlapping
            )
            # The one candidate may belong to a concurrent submit whose answer has not been
            # recorded yet (or that is itself ambiguous): the task list shows no prompt, so
            # adopting now could give this item another item's image. Let them settle first.
            if not in_flight or time.monotonic() > deadline:  # ambiguous ones stay ambiguous
                result.task = None
                result.evidence.note = (
                    f"{len(overlapping)} concurrent submit(s) of the same model are unresolved "
                    "in this window; adopting could take another item's task"
                )
                break
            time.sleep(self.owner_wait_poll)
        if result.task is not None:
            return self._record_task(entry, result.task, "adopted by reconciliation")
        if result.nothing_created and resubmit and request is not None:
            note = f"reconciliation proved nothing was created ({result.evidence})"

            def reclaim(current: LedgerEntry) -> None:
                current.history.append(note)
                self._claim(current, request)

            return self._post(request, self._transition(entry, reclaim), resubmit=False)
        if result.nothing_created and request is not None:
            # Proven again, after the one re-post: nothing exists, so this entry must not stand
            # as an unresolved neighbour that blocks every later lost answer in its window.
            proof = f"reconciliation proved nothing was created ({result.evidence})"

            def nothing(current: LedgerEntry) -> None:
                current.state = EntryState.REJECTED
                current.owner = None
                current.error = {"message": "nothing created", "evidence": str(result.evidence)}
                current.history.append(proof)

            with contextlib.suppress(_Replan):
                self._transition(entry, nothing)
            raise NothingCreatedError(f"the submit's answers were lost and {proof}; retry it")

        def ambiguous(current: LedgerEntry) -> None:
            current.state = EntryState.AMBIGUOUS
            current.owner = None
            current.error = {"message": "submit outcome unknown", "evidence": str(result.evidence)}

        with contextlib.suppress(_Replan):
            entry = self._transition(entry, ambiguous)
        error = ReconciliationError(
            "could not tell whether the lost submit created a task",
            evidence=str(result.evidence),
            sent_at=entry.sent_at or window[0],
            failed_at=entry.failed_at or window[1],
            model=entry.model,
            prompt=prompt,
            task_type=entry.task_type,
        )
        webhooks = request is not None and request.webhook_url and entry.nonces
        if webhooks and self.delivery_wait_seconds > 0:
            raise _AwaitDelivery(entry, error)
        raise error


def record_outcome(
    ledger: LedgerStore,
    task_id: str,
    *,
    task: EggAPITask | None = None,
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
    task: EggAPITask | None,
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
