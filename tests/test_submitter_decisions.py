"""The submitter's decision table (safety.decisions), row by row: no servers, no ledger files.

Each row is the pure function the Submitter calls: what the ledger entry says (plan), what the
lane does with it (step), whether the budget allows a POST, the window a POST could have made
its task in, whether unresolved siblings allow adopting, and what a reconciliation means.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from prefect_eggapi.client.errors import BudgetExceededError, ContentModerationError
from prefect_eggapi.safety.decisions import (
    Action,
    OwnerProbe,
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
from prefect_eggapi.safety.ledger import LIVE_STATES, EntryState, LedgerEntry
from prefect_eggapi.safety.reconcile import DEFAULT_SKEW, UNKNOWN_OFFSET_SKEW, Span

NOW = 1_800_000_000.0  # our clock (time.time()) in every row
T0 = datetime.fromtimestamp(NOW, UTC)
ME = "host-a:100:aaaaaaaa"
OTHER = "host-b:200:bbbbbbbb"


def entry(state: EntryState = EntryState.SUBMITTING, **fields: object) -> LedgerEntry:
    values: dict[str, object] = {
        "key": "k1",
        "logical_key": "item-1",
        "fingerprint": "fp",
        "state": state,
        "model": "nanobanana",
        "task_type": "generate",
        "prompt_sha256": "0" * 64,
    }
    values.update(fields)
    return LedgerEntry.model_validate(values)


def never_dead(owner: str | None) -> bool:
    return False


def always_dead(owner: str | None) -> bool:
    return True


def decide(
    current: LedgerEntry | None, *, is_dead: OwnerProbe = never_dead
) -> tuple[Plan, LedgerEntry]:
    fresh = entry(key="fresh")
    return plan(current, fresh, me=ME, now=NOW, is_dead=is_dead), fresh


# ------------------------------------------------------------------------------- plan rows


def test_no_entry_posts_the_fresh_one() -> None:
    decided, fresh = decide(None)
    assert decided.action is Action.POST and decided.entry is fresh


@pytest.mark.parametrize("state", sorted(LIVE_STATES))
def test_a_recorded_task_is_reconnected_never_posted_again(state: EntryState) -> None:
    current = entry(state, task_id="gen_1")
    decided, _ = decide(current)
    assert decided.action is Action.RECONNECT and decided.entry is current


def test_live_states_are_exactly_those_with_a_remote_task() -> None:
    assert {
        EntryState.SUBMITTED,
        EntryState.COMPLETED,
        EntryState.ABANDONED,
        EntryState.PERSISTED,
    } == LIVE_STATES


def test_a_refused_post_is_posted_again_on_the_same_entry() -> None:
    current = entry(EntryState.REJECTED, attempt=2)
    decided, _ = decide(current)
    assert decided.action is Action.POST and decided.entry is current
    assert current.attempt == 2  # not a new attempt: nothing was created


@pytest.mark.parametrize("retryable", [False, None])
def test_a_terminal_failure_fails_without_paying(retryable: bool | None) -> None:
    current = entry(
        EntryState.FAILED,
        task_id="gen_bad",
        retryable=retryable,
        error={"task_error": "refused by moderation", "message": "failed"},
    )
    decided, _ = decide(current)
    assert decided.action is Action.FAIL and decided.entry is current
    error = terminal_failure(current)
    assert isinstance(error, ContentModerationError)
    assert error.task.id == "gen_bad" and error.task.error == "refused by moderation"


def test_the_terminal_failure_names_the_message_when_no_task_error_was_kept() -> None:
    error = terminal_failure(entry(EntryState.FAILED, error={"message": "nope"}))
    assert error.task.id == "unknown" and error.task.error == "nope"


def test_a_retryable_failure_is_a_fresh_attempt_with_its_nonces_retired() -> None:
    current = entry(
        EntryState.FAILED,
        task_id="gen_failed",
        retryable=True,
        cost=Decimal("0.01"),
        nonces=["n1", "n2"],
    )
    decided, _ = decide(current)
    assert decided.action is Action.POST and decided.entry is current
    assert current.attempt == 2
    assert current.task_id is None and current.cost is None and current.nonces == []
    assert current.history == [
        "attempt 2: fresh submit after retryable failure",
        "attempt 1 nonces retired",
    ]


def test_a_fresh_attempt_without_nonces_notes_only_the_attempt() -> None:
    current = entry(EntryState.FAILED, task_id="gen_failed", retryable=True)
    decide(current)
    assert current.history == ["attempt 2: fresh submit after retryable failure"]


def test_an_ambiguous_entry_is_reconciled_again() -> None:
    current = entry(EntryState.AMBIGUOUS, owner=None)
    decided, _ = decide(current)
    assert decided.action is Action.RECONCILE and decided.entry is current


def test_our_own_claim_is_reconciled() -> None:
    decided, _ = decide(entry(owner=ME, lease_until=NOW + 60))
    assert decided.action is Action.RECONCILE


def test_a_claim_whose_owner_is_dead_is_reconciled() -> None:
    seen: list[str | None] = []

    def dead(owner: str | None) -> bool:
        seen.append(owner)
        return True

    decided, _ = decide(entry(owner=OTHER, lease_until=NOW + 60), is_dead=dead)
    assert decided.action is Action.RECONCILE and seen == [OTHER]


def test_a_claim_whose_lease_ran_out_is_reconciled() -> None:
    decided, _ = decide(entry(owner=OTHER, lease_until=NOW - 1))
    assert decided.action is Action.RECONCILE


def test_a_claim_without_a_lease_is_reconciled() -> None:
    decided, _ = decide(entry(owner=OTHER, lease_until=None))
    assert decided.action is Action.RECONCILE


def test_a_live_owner_inside_its_lease_is_waited_for() -> None:
    current = entry(owner=OTHER, lease_until=NOW + 1)
    decided, _ = decide(current)
    assert decided.action is Action.WAIT and decided.entry is current


# ------------------------------------------------------------------------------- the lane


@pytest.mark.parametrize(
    ("action", "waited_out", "expected"),
    [
        (Action.POST, False, Step.POST),
        (Action.RECONCILE, False, Step.SETTLE),
        (Action.WAIT, True, Step.SETTLE),
        (Action.WAIT, False, Step.SLEEP),
        (Action.RECONNECT, False, Step.RECONNECT),
        (Action.RECONNECT, True, Step.RECONNECT),
    ],
)
def test_what_the_lane_does_with_a_plan(action: Action, waited_out: bool, expected: Step) -> None:
    assert step(action, waited_out=waited_out) is expected


def test_a_failure_never_reaches_the_lane() -> None:
    with pytest.raises(ValueError, match="raised before"):
        step(Action.FAIL, waited_out=False)


# ------------------------------------------------------------------------------- the budget


def no_spend_read(scope: str) -> Decimal:
    raise AssertionError("the spend must not be read")


def test_no_cap_or_no_scope_needs_no_spend_read() -> None:
    assert budget_refusal(entry(scope="s", estimate=Decimal(5)), None, no_spend_read) is None
    assert budget_refusal(entry(scope="", estimate=Decimal(5)), Decimal(1), no_spend_read) is None


def test_a_post_that_fits_the_cap_exactly_is_allowed() -> None:
    fresh = entry(scope="s", estimate=Decimal("0.04"))
    assert budget_refusal(fresh, Decimal("0.10"), lambda scope: Decimal("0.06")) is None


def test_a_post_past_the_cap_is_refused_with_the_figures() -> None:
    fresh = entry(scope="s", estimate=Decimal("0.04"))
    refusal = budget_refusal(fresh, Decimal("0.10"), lambda scope: Decimal("0.07"))
    assert isinstance(refusal, BudgetExceededError)
    assert (refusal.scope, refusal.cap, refusal.committed, refusal.estimate) == (
        "s",
        Decimal("0.10"),
        Decimal("0.07"),
        Decimal("0.04"),
    )


def test_a_re_post_of_a_stored_entry_is_not_charged_twice() -> None:
    stored = entry(EntryState.REJECTED, scope="s", estimate=Decimal("0.04")).at_version("3")
    # The scope's 0.10 includes this entry's own 0.00 (rejected): 0.10 - 0 + 0.04 > 0.12.
    assert budget_refusal(stored, Decimal("0.12"), lambda s: Decimal("0.10")) is not None
    pending = entry(EntryState.AMBIGUOUS, scope="s", estimate=Decimal("0.04")).at_version("3")
    # An ambiguous entry holds its estimate: 0.10 - 0.04 + 0.04 <= 0.10.
    assert budget_refusal(pending, Decimal("0.10"), lambda s: Decimal("0.10")) is None
    unstored = entry(EntryState.AMBIGUOUS, scope="s", estimate=Decimal("0.04"))
    assert budget_refusal(unstored, Decimal("0.10"), lambda s: Decimal("0.10")) is not None


# ------------------------------------------------------------------------------- the window


def test_a_post_that_gave_up_ended_when_it_gave_up() -> None:
    gave_up = T0 - timedelta(seconds=30)
    assert post_ended(entry(failed_at=gave_up, lease_until=NOW + 60), T0) == gave_up


def test_a_post_still_in_its_lease_may_be_in_flight_until_now() -> None:
    assert post_ended(entry(lease_until=NOW + 60), T0) == T0


def test_a_post_past_its_lease_ended_at_the_lease() -> None:
    assert post_ended(entry(lease_until=NOW - 10), T0) == T0 - timedelta(seconds=10)


def test_a_post_without_a_lease_ends_now() -> None:
    assert post_ended(entry(), T0) == T0


def test_the_window_is_shifted_to_server_time_with_a_small_skew() -> None:
    sent = T0 - timedelta(seconds=5)
    start, end = span(entry(sent_at=sent, failed_at=T0, clock_offset=2.0), None, T0)
    assert start == sent + timedelta(seconds=2) - DEFAULT_SKEW
    assert end == T0 + timedelta(seconds=2) + DEFAULT_SKEW


def test_the_clients_offset_stands_in_for_an_unrecorded_one() -> None:
    start, end = span(entry(sent_at=T0, failed_at=T0), -3.0, T0)
    assert (start, end) == (
        T0 - timedelta(seconds=3) - DEFAULT_SKEW,
        T0 - timedelta(seconds=3) + DEFAULT_SKEW,
    )


def test_an_unknown_offset_widens_the_window() -> None:
    start, end = span(entry(sent_at=T0, failed_at=T0), None, T0)
    assert (start, end) == (T0 - UNKNOWN_OFFSET_SKEW, T0 + UNKNOWN_OFFSET_SKEW)


def test_a_window_without_a_send_time_starts_at_its_end() -> None:
    start, end = span(entry(failed_at=T0, clock_offset=0.0), None, T0)
    assert (start, end) == (T0 - DEFAULT_SKEW, T0 + DEFAULT_SKEW)


# ------------------------------------------------------------------------------- siblings

WINDOW = (T0 - timedelta(seconds=10), T0)
INSIDE = T0 - timedelta(seconds=5)
OUTSIDE = T0 + timedelta(seconds=5)


def sibling(state: EntryState = EntryState.SUBMITTING, **fields: object) -> LedgerEntry:
    return entry(state, key="sibling", **{"owner": OTHER, "lease_until": NOW + 60, **fields})


def judge(
    made: datetime | None,
    siblings: list[tuple[LedgerEntry, Span]],
    *,
    is_dead: OwnerProbe = never_dead,
    past_deadline: bool = False,
) -> tuple[Siblings, int]:
    return judge_siblings(made, siblings, now=NOW, is_dead=is_dead, past_deadline=past_deadline)


def test_no_candidate_or_no_sibling_leaves_the_verdict_standing() -> None:
    assert judge(None, [(sibling(), WINDOW)]) == (Siblings.CLEAR, 0)
    assert judge(INSIDE, []) == (Siblings.CLEAR, 0)


def test_a_sibling_whose_window_misses_the_candidate_cannot_have_made_it() -> None:
    assert judge(OUTSIDE, [(sibling(), WINDOW)]) == (Siblings.CLEAR, 0)


def test_a_sibling_still_posting_is_waited_for() -> None:
    assert judge(INSIDE, [(sibling(), WINDOW)]) == (Siblings.WAIT, 1)


def test_past_the_deadline_a_posting_sibling_suspends_adoption() -> None:
    assert judge(INSIDE, [(sibling(), WINDOW)], past_deadline=True) == (Siblings.SUSPEND, 1)


@pytest.mark.parametrize(
    ("other", "is_dead"),
    [
        (sibling(EntryState.AMBIGUOUS, owner=None), never_dead),  # ambiguous stays ambiguous
        (sibling(), always_dead),  # its owner died: it will never answer
        (sibling(lease_until=NOW - 1), never_dead),  # its POST cannot be in flight any more
    ],
)
def test_a_sibling_that_will_not_answer_suspends_adoption_at_once(
    other: LedgerEntry, is_dead: OwnerProbe
) -> None:
    assert judge(INSIDE, [(other, WINDOW)], is_dead=is_dead) == (Siblings.SUSPEND, 1)


def test_every_overlapping_sibling_is_counted() -> None:
    far = (T0 + timedelta(seconds=60), T0 + timedelta(seconds=70))
    siblings = [(sibling(EntryState.AMBIGUOUS), WINDOW), (sibling(), WINDOW), (sibling(), far)]
    assert judge(INSIDE, siblings) == (Siblings.WAIT, 2)


# ------------------------------------------------------------------------------- verdicts


def settle(
    *,
    found: bool = False,
    nothing_created: bool = False,
    may_post: bool = True,
    resubmit: bool = True,
    webhook: bool = False,
    delivery_wait_seconds: float = 900.0,
) -> Verdict:
    """The verdict for an ambiguous POST with a request at hand, unless told otherwise."""
    return verdict(
        found=found,
        nothing_created=nothing_created,
        may_post=may_post,
        resubmit=resubmit,
        webhook=webhook,
        delivery_wait_seconds=delivery_wait_seconds,
    )


def test_a_lone_candidate_is_adopted() -> None:
    assert settle(found=True) is Verdict.ADOPT
    assert settle(found=True, may_post=False, webhook=True) is Verdict.ADOPT


def test_proven_empty_is_posted_again_once() -> None:
    assert settle(nothing_created=True) is Verdict.POST_AGAIN


def test_proven_empty_after_the_re_post_is_nothing_created() -> None:
    assert settle(nothing_created=True, resubmit=False) is Verdict.NOTHING_CREATED


def test_a_late_attribution_never_posts_or_waits() -> None:
    assert settle(nothing_created=True, may_post=False) is Verdict.FAIL
    assert settle(may_post=False, webhook=True) is Verdict.FAIL


def test_an_ambiguous_answer_with_webhooks_waits_for_its_delivery() -> None:
    assert settle(webhook=True) is Verdict.AWAIT_DELIVERY


def test_an_ambiguous_answer_with_no_delivery_wait_fails_loudly() -> None:
    assert settle(webhook=True, delivery_wait_seconds=0) is Verdict.FAIL


def test_an_ambiguous_answer_without_webhooks_fails_loudly() -> None:
    assert settle() is Verdict.FAIL
    assert settle(resubmit=False) is Verdict.FAIL
