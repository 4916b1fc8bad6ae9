"""reconcile: classify (the attribution decision on one page of evidence) and reconcile (every
verdict: adopt, nothing created, suspended, undecided) on a scripted task list: no servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

from prefect_eggapi.client.types import EggAPITask, TaskStatus
from prefect_eggapi.safety.reconcile import LOOKBACK, Reconciliation, classify, reconcile

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


# ------------------------------------------------------------------ reconcile(): every verdict


class TaskList:
    """``GET /v1/tasks`` as reconcile reads it: one list per look, newest first."""

    def __init__(self, *looks: list[EggAPITask]) -> None:
        self.looks = list(looks)
        self.calls = 0

    def iter_tasks(self, *, per_page: int, max_pages: int) -> Iterator[EggAPITask]:
        page = self.looks[min(self.calls, len(self.looks) - 1)]
        self.calls += 1
        yield from sorted(page, key=lambda t: t.created_at or T0, reverse=True)


def listed(name: str, seconds: float, *, model: str = "nanobanana", **extra: str) -> EggAPITask:
    return EggAPITask.model_validate(
        {
            "id": name,
            "status": "pending",
            "model": model,
            "type": "generate",
            "created_at": T0 + timedelta(seconds=seconds),
            **extra,
        }
    )


def run(
    tasks: TaskList,
    *,
    known: set[str] | None = None,
    own: Callable[[str], bool] = lambda task_id: False,
) -> Reconciliation:
    return reconcile(
        tasks,  # type: ignore[arg-type]  # only iter_tasks is read
        model="nanobanana",
        task_type="generate",
        prompt="a cat",
        window=WINDOW,
        known=lambda: set(known or ()),
        settle_seconds=0,
        own=own,
    )


def test_a_lone_candidate_with_no_other_traffic_is_adopted() -> None:
    result = run(TaskList([listed("gen_mine", 2), listed("gen_known", -5)]), known={"gen_known"})
    assert result.task is not None and result.task.id == "gen_mine"
    assert result.nothing_created is False and result.evidence.candidates == ["gen_mine"]


def test_a_window_seen_empty_twice_proves_nothing_was_created() -> None:
    tasks = TaskList([listed("gen_known", 2)])
    result = run(tasks, known={"gen_known"})
    assert result.task is None and result.nothing_created is True
    assert tasks.calls == 2  # one look is not proof: the list may lag the write


def test_a_list_that_caught_up_on_the_second_look_gives_the_candidate() -> None:
    result = run(TaskList([], [listed("gen_late", 3)]))
    assert result.task is not None and result.task.id == "gen_late"
    assert result.nothing_created is False


def test_other_traffic_on_the_key_suspends_adopting_a_lone_candidate() -> None:
    result = run(TaskList([listed("gen_mine", 2), listed("gen_stranger", -30)]))
    assert result.task is None and result.nothing_created is False
    assert result.evidence.foreign == ["gen_stranger"]
    assert "adoption suspended" in result.evidence.note


def test_two_candidates_are_not_told_apart() -> None:
    result = run(TaskList([listed("gen_a", 1), listed("gen_b", 4)]))
    assert result.task is None and result.nothing_created is False
    assert sorted(result.evidence.candidates) == ["gen_a", "gen_b"]
    assert result.evidence.note == ""


def test_a_known_task_indexed_to_this_very_entry_stays_a_candidate() -> None:
    tasks = TaskList([listed("gen_indexed", 2)])
    result = run(tasks, known={"gen_indexed"}, own=lambda task_id: task_id == "gen_indexed")
    assert result.task is not None and result.task.id == "gen_indexed"
    # Without ``own`` the same evidence is someone's recorded task: nothing of ours exists.
    assert run(TaskList([listed("gen_indexed", 2)]), known={"gen_indexed"}).nothing_created


def test_other_models_other_prompts_and_old_tasks_are_not_evidence() -> None:
    result = run(
        TaskList(
            [
                listed("gen_mine", 2),
                listed("gen_other_model", 3, model="seedream"),
                listed("gen_other_prompt", 4, prompt="a dog"),
                listed("gen_long_ago", -LOOKBACK.total_seconds() - 5),
            ]
        )
    )
    assert result.task is not None and result.task.id == "gen_mine"
    assert result.evidence.foreign == [] and result.evidence.scanned == 4
