"""reconcile.classify, the attribution decision on one page of evidence: no servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect_eggapi.client.types import EggAPITask, TaskStatus
from prefect_eggapi.safety.reconcile import classify

T0 = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
WINDOW = (T0, T0 + timedelta(seconds=5))


def task(name: str, seconds: float) -> EggAPITask:
    return EggAPITask(
        id=name, status=TaskStatus.PENDING, created_at=T0 + timedelta(seconds=seconds)
    )


def ids(tasks: list[EggAPITask]) -> list[str]:
    return [t.id for t in tasks]


def test_a_lone_unknown_task_in_the_window_is_the_candidate():
    candidates, foreign = classify([task("gen_mine", 2)], window=WINDOW, known=set(), floor=None)
    assert ids(candidates) == ["gen_mine"] and foreign == []


def test_tasks_any_entry_recorded_are_never_candidates_or_foreign():
    candidates, foreign = classify(
        [task("gen_other_item", 2), task("gen_older", -20)],
        window=WINDOW,
        known={"gen_other_item", "gen_older"},
        floor=None,
    )
    assert candidates == [] and foreign == []


def test_a_task_older_than_the_floor_existed_before_the_post():
    # Seen before the POST was sent (the floor), or older still: never ours, but it is evidence
    # that someone else creates tasks on this key.
    candidates, foreign = classify(
        [task("gen_foreign", 1), task("gen_at_floor", 2), task("gen_mine", 2)],
        window=WINDOW,
        known=set(),
        floor=T0 + timedelta(seconds=2),
        floor_ids={"gen_at_floor"},
    )
    assert ids(candidates) == ["gen_mine"]
    assert sorted(ids(foreign)) == ["gen_at_floor", "gen_foreign"]


def test_unknown_tasks_outside_the_window_are_other_traffic_unless_a_sibling_explains_them():
    candidates, foreign = classify(
        [task("gen_mine", 2), task("gen_sibling", -10), task("gen_stranger", -30)],
        window=WINDOW,
        known=set(),
        floor=None,
        siblings=[(T0 - timedelta(seconds=12), T0 - timedelta(seconds=8))],
    )
    assert ids(candidates) == ["gen_mine"] and ids(foreign) == ["gen_stranger"]


def test_two_unknown_tasks_in_the_window_are_both_candidates():
    candidates, _ = classify(
        [task("gen_a", 1), task("gen_b", 4)], window=WINDOW, known=set(), floor=None
    )
    assert ids(candidates) == ["gen_a", "gen_b"]
