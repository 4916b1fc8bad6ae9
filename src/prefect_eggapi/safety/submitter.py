"""Submit at most once per logical piece of work, whatever retries or crashes happen.

The decision table (ledger state, lane, reconciliation verdict -> action) is the heart of "no
money lost to duplicate jobs"; it lives, without I/O, in :mod:`prefect_eggapi.safety.decisions`.
This module carries it out: it reads and writes the ledger, holds the lanes, POSTs, reconciles
and waits for deliveries.

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
The module is above the ~400-line mark because :class:`Submitter` is one state machine whose
steps (claim, POST, record, reconcile, await a delivery) share its ledger, client, owner id and
timings; its decisions, lanes and outcome recording are already modules of their own.
``Lane``, ``submit_lane`` and ``record_outcome`` are importable from here too (their modules are
``lanes`` and ``outcomes``).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from prefect_eggapi.client import EggAPIClient
from prefect_eggapi.client.errors import (
    AmbiguousSubmitError,
    EggAPIError,
    InvalidRequestError,
    NothingCreatedError,
    ReconciliationError,
    describe,
)
from prefect_eggapi.client.pricing import estimate_cost
from prefect_eggapi.client.types import MAX_WEBHOOK_URL_CHARS, EggAPITask, GenerateRequest
from prefect_eggapi.safety.decisions import (
    Action,
    Plan,
    Siblings,
    Step,
    Verdict,
    budget_refusal,
    judge_siblings,
    plan,
    post_ended,
    span,
    step,
    terminal_failure,
    verdict,
)
from prefect_eggapi.safety.lanes import Lane, lane_name, submit_lane
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
from prefect_eggapi.safety.outcomes import record_outcome
from prefect_eggapi.safety.reconcile import Reconciliation, Span, reconcile
from prefect_eggapi.webhooks.verify import NONCE_SUFFIX_CHARS, new_nonce, with_nonce

__all__ = ["Lane", "SubmitOutcome", "Submitter", "record_outcome", "submit_lane"]


@dataclass
class SubmitOutcome:
    task: EggAPITask
    entry: LedgerEntry
    reconnected: bool = False  # an already recorded task was reused: nothing paid now
    adopted: bool = False  # found by reconciliation after an ambiguous submit


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


def _unattributable(
    message: str, evidence: str, entry: LedgerEntry, prompt: str, window: Span | None = None
) -> ReconciliationError:
    """The loud failure for a lost answer that cannot be settled, with what was seen."""
    now = datetime.now(UTC)
    return ReconciliationError(
        message,
        evidence=evidence,
        sent_at=entry.sent_at or (window[0] if window else now),
        failed_at=entry.failed_at or (window[1] if window else now),
        model=entry.model,
        prompt=prompt,
        task_type=entry.task_type,
    )


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

    # ------------------------------------------------------------------ helpers

    @contextmanager
    def _lane(self, model: str, task_type: str) -> Iterator[None]:
        """Hold the lane of (account, model, type) in this process and in the ledger."""
        account = self.client.account
        with (
            submit_lane(account, model, task_type).hold(self.lane_width),
            self.ledger.lane(
                lane_name(account, model, task_type),
                width=self.lane_width,
                owner=self.owner,
                seconds=self.lane_seconds,
            ),
        ):
            yield

    def _siblings(self, entry: LedgerEntry) -> list[tuple[LedgerEntry, Span]]:
        """Other unresolved submits of the same model and type, with their windows."""
        out = []
        for other in self.ledger.unresolved():
            if other.key == entry.key or other.sent_at is None:
                continue
            if other.model != entry.model or other.task_type != entry.task_type:
                continue
            out.append((other, span(other, self.client.clock_offset, datetime.now(UTC))))
        return out

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
        # A dead owner's POST ended by now at the latest.
        entry.failed_at = post_ended(entry, datetime.now(UTC))

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

        def decide() -> Plan:
            with self.ledger.transaction():
                decided = plan(
                    self.ledger.get(key),
                    fresh.model_copy(deep=True),
                    me=self.owner,
                    now=time.time(),
                    is_dead=owner_is_dead,
                )
                if decided.action is Action.FAIL:
                    raise terminal_failure(decided.entry)
                if decided.action is Action.POST:
                    refusal = budget_refusal(decided.entry, budget, self.ledger.scope_spend)
                    if refusal is not None:
                        raise refusal
                    self._claim(decided.entry, request)
                    self.ledger.put(decided.entry)
                elif decided.action is Action.RECONCILE:
                    self._take_over(decided.entry)
                    self.ledger.put(decided.entry)
                return decided

        while True:
            current = self.ledger.get(key)
            if current is not None and current.state in LIVE_STATES:
                return self._reconnect(current)
            if self.client.clock_offset is None:
                self.client.probe_clock()  # before anything is paid: a failure costs nothing
            # Claim inside the lane, so the lease and the reconciliation window start when the
            # POST really can, not while queueing behind other submits.
            try:
                with self._lane(request.model, request.task_type):
                    decided = with_conflict_retry(decide)
                    next_step = step(decided.action, waited_out=time.monotonic() > wait_until)
                    if next_step is Step.POST:
                        return self._post(request, decided.entry, resubmit=True)
                    if next_step is Step.SETTLE:
                        return self._settle(request, decided.entry, resubmit=True)
            except _Replan:
                continue  # another worker took our claim over: see what it recorded
            except _AwaitDelivery as waiting:
                self._await_delivery(waiting)
                continue  # delivered: the ambiguous entry is settled from the delivery log
            if next_step is Step.RECONNECT:
                return self._reconnect(decided.entry)
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
        # left it so. Earlier attempts cannot get here: their nonces are retired
        # (decisions.fresh_attempt).
        if mismatch or owner not in (None, entry.key):
            raise _unattributable(
                "the webhook delivery for this submission names a task that cannot be its own",
                f"task {task_id}: model {task.model}, type {task.type}, recorded for "
                f"entry {owner or 'none'}",
                entry,
                prompt,
            )
        return self._record_task(entry, task, "adopted from its webhook delivery")

    def attribute(self, key: str) -> SubmitOutcome | None:
        """Settle an ambiguous entry late, never posting: from its webhook delivery, or from the
        task list now that the submits around it have answers. None: still not attributable
        (the entry stays ambiguous, with the new evidence). Used by the recovery flow."""
        entry = self.ledger.get(key)
        if entry is None or entry.state is not EntryState.AMBIGUOUS:
            return None

        def take() -> LedgerEntry:
            with self.ledger.transaction():
                current = self.ledger.get(key)
                if current is None or current.state is not EntryState.AMBIGUOUS:
                    raise _Replan(key)
                self._take_over(current)
                self.ledger.put(current)
                return current

        with self._lane(entry.model, entry.task_type):
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
        window = span(entry, self.client.clock_offset, datetime.now(UTC))
        result = self._reconcile(entry, prompt, window)
        decided = verdict(
            found=result.task is not None,
            nothing_created=result.nothing_created,
            may_post=request is not None,
            resubmit=resubmit,
            webhook=bool(request is not None and request.webhook_url and entry.nonces),
            delivery_wait_seconds=self.delivery_wait_seconds,
        )
        if decided is Verdict.ADOPT:
            assert result.task is not None
            return self._record_task(entry, result.task, "adopted by reconciliation")
        proof = f"reconciliation proved nothing was created ({result.evidence})"
        if decided is Verdict.POST_AGAIN:
            assert request is not None

            def reclaim(current: LedgerEntry) -> None:
                current.history.append(proof)
                self._claim(current, request)

            return self._post(request, self._transition(entry, reclaim), resubmit=False)
        if decided is Verdict.NOTHING_CREATED:
            # Proven again, after the one re-post: nothing exists, so this entry must not stand
            # as an unresolved neighbour that blocks every later lost answer in its window.

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
        error = _unattributable(
            "could not tell whether the lost submit created a task",
            str(result.evidence),
            entry,
            prompt,
            window,
        )
        if decided is Verdict.AWAIT_DELIVERY:
            raise _AwaitDelivery(entry, error)
        raise error

    def _reconcile(self, entry: LedgerEntry, prompt: str, window: Span) -> Reconciliation:
        """Reconcile against the task list; a candidate an unresolved sibling could have made is
        waited for while that sibling is still posting, then not adopted (see
        :func:`~prefect_eggapi.safety.decisions.judge_siblings`)."""
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
                siblings=[other_span for _, other_span in siblings],
                settle_seconds=self.settle_seconds,
                own=lambda task_id: self.ledger.task_entry_key(task_id) == entry.key,
            )
            judged, overlapping = judge_siblings(
                result.task.created_at if result.task is not None else None,
                siblings,
                now=time.time(),
                is_dead=owner_is_dead,
                past_deadline=time.monotonic() > deadline,
            )
            if judged is Siblings.CLEAR:
                return result
            if judged is Siblings.SUSPEND:
                # The task list shows no prompt: adopting could give this item another's image.
                result.task = None
                result.evidence.note = (
                    f"{overlapping} concurrent submit(s) of the same model are unresolved "
                    "in this window; adopting could take another item's task"
                )
                return result
            time.sleep(self.owner_wait_poll)
