"""The poll board: crowded waits of one account share list pages, and it can only save requests."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from prefect_eggapi.client import AsyncEggAPIClient, EggAPIClient
from prefect_eggapi.client import board as board_module
from prefect_eggapi.client.board import PollBoard, RawTaskPage
from prefect_eggapi.client.polling import PollPolicy
from prefect_eggapi.client.types import EggAPITask, TaskStatus
from prefect_eggapi.testing.emulator import EmulatorProcess

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def task(i: int, status: str = "processing", *, urls: bool = True) -> EggAPITask:
    data: dict[str, object] = {
        "id": f"gen_{i:012d}",
        "status": status,
        "created_at": (T0 + timedelta(seconds=i)).isoformat(),
    }
    if status == "completed" and urls:
        data["output"] = {"url": f"http://x/{i}.png", "urls": [f"http://x/{i}.png"]}
    return EggAPITask.model_validate(data)


class FakeLister:
    """An account's task list, newest first, in pages; counts what the board asks for."""

    def __init__(self, tasks: list[EggAPITask]) -> None:
        self.tasks = sorted(tasks, key=lambda t: t.created_at or T0, reverse=True)
        self.pages: list[int] = []
        self.fail: Exception | None = None
        self.closed = threading.Event()

    def list_task_dicts(self, page: int, per_page: int) -> RawTaskPage:
        self.pages.append(page)
        if self.fail is not None:
            raise self.fail
        start = (page - 1) * per_page
        total = len(self.tasks)
        return RawTaskPage.from_data(
            {
                "items": [t.model_dump(mode="json") for t in self.tasks[start : start + per_page]],
                "pagination": {
                    "page": page,
                    "per_page": per_page,
                    "total": total,
                    "total_pages": (total + per_page - 1) // per_page,
                },
            }
        )

    def close(self) -> None:
        self.closed.set()


class BoardCondition(threading.Condition):
    """A board's lock, telling the test each time the board thread goes to sleep on it.

    The board reads the clock, takes what is due and serves it, then sleeps on this condition;
    it reads the clock and decides under this lock in the same hold as the sleep. So a sleep
    counted after the test moved the clock (under this lock too) shows that the board has acted
    on the new time: whatever was due by then has been served and handed to its wait.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sleeps = 0

    def wait(self, timeout: float | None = None) -> bool:
        if threading.current_thread().name == "eggapi-poll-board":
            self.sleeps += 1
            self.notify_all()  # wake the test waiting for the board to settle
        return super().wait(timeout)

    def notify(self, n: int = 1) -> None:
        # wake everyone (notify_all lands here too): a test waiting on this condition must not
        # swallow the wake-up a new poll sends the board
        super().notify(sys.maxsize)


class FakeClock:
    """``time.monotonic`` of the board module: time moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def watch(self, board: PollBoard) -> PollBoard:
        """Let the test see when ``board`` (not started yet) has acted on the clock."""
        board._cond = BoardCondition()
        return board

    def set(self, board: PollBoard, now: float) -> None:
        """Move to ``now``; return once the board thread has acted on that time."""
        cond = board._cond
        assert isinstance(cond, BoardCondition), "watch() the board first"
        with cond:
            self.now = now
            sleeps = cond.sleeps
            cond.notify_all()
            assert cond.wait_for(lambda: cond.sleeps > sleeps, 10), "the board did not settle"

    def wait_pending(self, board: PollBoard, n: int) -> None:
        """Return once ``n`` polls are waiting on the board (none served yet)."""
        with board._cond:
            assert board._cond.wait_for(lambda: len(board._asks) >= n, 10), board._asks
            assert len(board._asks) == n, board._asks


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(board_module, "time", fake)
    return fake


def poll_all(
    board: PollBoard, clock: FakeClock, ids: list[str], delay: float = 0.05
) -> list[EggAPITask | None]:
    """Poll every id at once from its own thread (as concurrent waits do).

    The clock stands still until every poll is on the board, so they all fall due together; it
    then moves halfway (nothing may be served yet) and on to when they are due.
    """
    out: dict[str, EggAPITask | None] = {}
    threads = [
        threading.Thread(target=lambda i=i: out.__setitem__(i, board.poll(i, delay, delay)))
        for i in ids
    ]
    for t in threads:
        t.start()
    clock.wait_pending(board, len(ids))
    handled = board.stats.served + board.stats.unanswered
    start = clock.now
    clock.set(board, start + delay / 2)
    assert board.stats.served + board.stats.unanswered == handled  # not before they are due
    assert len(board._asks) == len(ids)
    clock.set(board, start + delay)
    assert board.stats.served + board.stats.unanswered == handled + len(ids)  # all at once
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    return [out[i] for i in ids]


def test_crowded_polls_are_served_by_one_list_page(clock: FakeClock) -> None:
    lister = FakeLister([task(i, "completed" if i % 2 else "processing") for i in range(10)])
    board = clock.watch(PollBoard(lambda: lister))
    ids = [f"gen_{i:012d}" for i in (2, 3, 7)]
    for i, tid in zip((2, 3, 7), ids, strict=True):
        board.register(tid, T0 + timedelta(seconds=i))
    assert board.crowded
    results = poll_all(board, clock, ids, delay=0.2)
    assert [t.id if t else None for t in results] == ids
    assert [t.status.value for t in results if t] == ["processing", "completed", "completed"]
    assert lister.pages == [1]
    assert board.stats.served == 3 and board.stats.lists == 1


def test_only_the_wanted_items_of_a_page_are_validated(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16: a 100-task page for two waits validates the two (and the last item, for its
    date), not all 100; what the waits get is the task a full validation gives."""
    tasks = [task(i, "completed" if i % 2 else "processing") for i in range(100)]
    lister = FakeLister(tasks)
    validated: list[object] = []
    real = board_module._task_of

    def counting(item: dict[str, object]) -> EggAPITask | None:
        validated.append(item.get("id"))
        return real(item)  # type: ignore[arg-type]

    monkeypatch.setattr(board_module, "_task_of", counting)
    board = clock.watch(PollBoard(lambda: lister))
    ids = ["gen_000000000041", "gen_000000000098"]
    for tid in ids:
        board.register(tid, T0)
    got = poll_all(board, clock, ids)
    assert got == [tasks[41], tasks[98]]
    assert lister.pages == [1]
    assert sorted(map(str, validated)) == sorted([*ids, "gen_000000000000"])  # + the last one


def test_an_unparsable_item_does_not_cost_the_page(clock: FakeClock) -> None:
    """Items are parsed one by one: a malformed one is skipped (its own wait would GET it)."""
    lister = FakeLister([task(1), task(2)])
    good = lister.list_task_dicts

    def with_garbage(page: int, per_page: int) -> RawTaskPage:
        raw = good(page, per_page)
        items = [{"id": "gen_000000000003", "created_at": "not a date"}, *raw.items]
        return RawTaskPage(items, raw.total_pages)

    lister.list_task_dicts = with_garbage  # type: ignore[method-assign]
    board = clock.watch(PollBoard(lambda: lister))
    ids = ["gen_000000000001", "gen_000000000002", "gen_000000000003"]
    for tid in ids:
        board.register(tid, T0)
    got = poll_all(board, clock, ids)
    assert [t.id if t else None for t in got] == [*ids[:2], None]


def test_a_lone_wait_is_not_crowded_and_a_lone_poll_is_handed_back() -> None:
    lister = FakeLister([task(1)])
    board = PollBoard(lambda: lister)
    board.register("gen_000000000001", T0)
    assert not board.crowded
    assert board.poll("gen_000000000001", 0.01, 0.01) is None  # its wait GETs it itself
    assert lister.pages == []


def test_tasks_missing_from_the_page_or_without_urls_are_handed_back(clock: FakeClock) -> None:
    lister = FakeLister([task(1, "completed", urls=False), task(2)])
    board = clock.watch(PollBoard(lambda: lister))
    ids = ["gen_000000000001", "gen_000000000002", "gen_000000000099"]
    for tid in ids:
        board.register(tid, T0)
    got = poll_all(board, clock, ids)
    # a completed item without output URLs is not trusted; an unknown id is not invented
    assert [t.id if t else None for t in got] == [None, "gen_000000000002", None]


def test_pages_further_down_only_while_wanted_tasks_can_be_there(clock: FakeClock) -> None:
    tasks = [task(i) for i in range(250)]  # newest first: 249 .. 0
    lister = FakeLister(tasks)
    board = clock.watch(PollBoard(lambda: lister))
    deep = ["gen_000000000120", "gen_000000000248"]  # page 2 and page 1
    for tid, i in zip(deep, (120, 248), strict=True):
        board.register(tid, T0 + timedelta(seconds=i))
    assert all(poll_all(board, clock, deep))
    assert lister.pages == [1, 2]
    # a task older than anything listed on page 1 minus the skew stops the paging early
    lister.pages.clear()
    new = [task(i) for i in range(1000, 1100)]
    lister2 = FakeLister([*new, task(5)])
    board2 = clock.watch(PollBoard(lambda: lister2))
    for tid, when in (("gen_000000000005", 5), ("gen_000000001099", 1099)):
        board2.register(tid, T0 + timedelta(seconds=when))
    got = poll_all(board2, clock, ["gen_000000000005", "gen_000000001099"])
    assert got[1] is not None
    assert lister2.pages == [1, 2]  # page 1 ends at 1000 s, still newer than 5 s: one more
    lister3 = FakeLister([task(i) for i in range(1000, 1300)] + [task(5)])  # 5 is on page 4
    board3 = clock.watch(PollBoard(lambda: lister3))
    for tid, when in (("gen_000000000005", 5), ("gen_000000001299", 1299)):
        board3.register(tid, T0 + timedelta(seconds=when))
    got = poll_all(board3, clock, ["gen_000000000005", "gen_000000001299"])
    assert got[0] is None and got[1] is not None  # handed back: its wait GETs it
    assert lister3.pages == [1, 2, 3]  # MAX_PAGES, never the whole account


def test_list_errors_hand_every_poll_back(clock: FakeClock) -> None:
    lister = FakeLister([task(1), task(2)])
    lister.fail = RuntimeError("boom")
    board = clock.watch(PollBoard(lambda: lister))
    for tid in ("gen_000000000001", "gen_000000000002"):
        board.register(tid, T0)
    for _ in range(board_module.MAX_MISSES + 1):
        assert poll_all(board, clock, ["gen_000000000001", "gen_000000000002"]) == [None, None]
    assert not board.stats.disabled  # an outage is no evidence against the list
    lister.fail = None
    assert all(poll_all(board, clock, ["gen_000000000001", "gen_000000000002"]))


def test_a_board_that_cannot_connect_hands_polls_back_at_once() -> None:
    def connect() -> FakeLister:
        raise RuntimeError("no client")

    board = PollBoard(connect)
    for tid in ("gen_000000000001", "gen_000000000002"):
        board.register(tid, T0)
    started = time.monotonic()
    assert board.poll("gen_000000000001", 0.01, 0.01) is None
    assert time.monotonic() - started < 5  # not after the grace period


def test_two_waits_on_one_task_are_both_counted() -> None:
    board = PollBoard(lambda: FakeLister([]))
    board.register("gen_000000000001", T0)
    board.register("gen_000000000001", None)  # e.g. two items reconnected to one task
    assert board.crowded
    board.unregister("gen_000000000001")
    assert not board.crowded
    board.unregister("gen_000000000001")
    board.unregister("gen_000000000001")  # extra unregisters are harmless
    assert not board.crowded


def test_failed_items_without_their_error_are_read_with_get(clock: FakeClock) -> None:
    bare = EggAPITask(id="gen_000000000001", status=TaskStatus.FAILED, created_at=T0)
    told = EggAPITask(
        id="gen_000000000002", status=TaskStatus.FAILED, error="moderation", created_at=T0
    )
    lister = FakeLister([bare, told])
    board = clock.watch(PollBoard(lambda: lister))
    for t in (bare, told):
        board.register(t.id, T0)
    got = poll_all(board, clock, [bare.id, told.id])
    assert got[0] is None and got[1] is not None and got[1].error == "moderation"


def test_board_stops_batching_when_pages_never_hold_the_wanted_tasks(clock: FakeClock) -> None:
    lister = FakeLister([task(i) for i in range(500, 510)])  # e.g. an API listing oldest first
    board = clock.watch(PollBoard(lambda: lister))
    ids = ["gen_000000000001", "gen_000000000002"]
    for tid in ids:
        board.register(tid, None)
    for _ in range(board_module.MAX_MISSES):
        assert poll_all(board, clock, ids) == [None, None]
    assert board.stats.disabled and not board.crowded
    assert board.stats.paused_until == clock.now + board_module.PAUSE_SECONDS
    asked = len(lister.pages)
    assert poll_all(board, clock, ids[:1]) == [None]
    assert poll_all(board, clock, ids) == [None, None]  # even two polls due together
    assert len(lister.pages) == asked  # no more list requests
    clock.set(board, board.stats.paused_until)  # the pause is over
    assert not board.stats.disabled and board.crowded
    assert poll_all(board, clock, ids) == [None, None]
    assert len(lister.pages) == asked + 1  # batching again


def test_idle_board_thread_exits_and_closes_its_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(board_module, "IDLE_EXIT_SECONDS", 0.1)
    lister = FakeLister([task(1)])
    board = PollBoard(lambda: lister)
    assert board.poll("gen_000000000001", 0.01, 0.01) is None
    assert lister.closed.wait(5)
    lister.closed.clear()
    assert board.poll("gen_000000000001", 0.01, 0.01) is None  # a new thread, a new client
    assert lister.closed.wait(5)


def test_polls_are_served_within_their_slack_not_before(clock: FakeClock) -> None:
    lister = FakeLister([task(1), task(2)])
    board = clock.watch(PollBoard(lambda: lister))
    for tid in ("gen_000000000001", "gen_000000000002"):
        board.register(tid, T0)
    started = clock.now
    out: list[float] = []

    def one(tid: str, delay: float, slack: float) -> None:
        assert board.poll(tid, delay, slack) is not None
        out.append(clock.now)

    a = threading.Thread(target=one, args=("gen_000000000001", 0.3, 0.0))
    b = threading.Thread(target=one, args=("gen_000000000002", 0.5, 0.3))  # may run from 0.2 s
    a.start()
    b.start()
    clock.wait_pending(board, 2)
    for now in (0.1, 0.2, 0.25):  # b's slack has begun at 0.2 s, but nothing is due before 0.3 s
        clock.set(board, started + now)
        assert lister.pages == [] and board.stats.served == 0 and out == []
    clock.set(board, started + 0.3)
    a.join(5)
    b.join(5)
    assert not a.is_alive() and not b.is_alive()
    assert lister.pages == [1]  # one page for both: b ran early, inside its slack
    assert board.stats.served == 2
    assert len(out) == 2 and all(started + 0.3 <= t < started + 0.5 for t in out), out


# --------------------------------------------------------------------------- with the emulator


SHORT_POLLS = PollPolicy(initial_interval=0.3, max_interval=0.6, learn=False)


def _sync_waits(emulator: EmulatorProcess, key: str, n: int) -> list[EggAPITask]:
    """n tasks, each waited for in its own thread through one client."""
    with EggAPIClient(key, emulator.base_url, poll=SHORT_POLLS) as client:
        submitted = [client.generate(model="nanobanana", prompt=f"board {i}") for i in range(n)]
        done: list[EggAPITask] = []
        threads = [
            threading.Thread(target=lambda t=t: done.append(client.wait_for_task(t, timeout=30)))
            for t in submitted
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
    return done


def _async_waits(emulator: EmulatorProcess, key: str, n: int) -> list[EggAPITask]:
    """n tasks, waited for with asyncio.gather on one async client."""

    async def run() -> list[EggAPITask]:
        async with AsyncEggAPIClient(key, emulator.base_url, poll=SHORT_POLLS) as client:
            tasks = [await client.generate(model="nanobanana", prompt=f"a{i}") for i in range(n)]
            return await asyncio.gather(*(client.wait_for_task(t, timeout=30) for t in tasks))

    return asyncio.run(run())


@pytest.mark.integration
@pytest.mark.parametrize("waits", [_sync_waits, _async_waits], ids=["threads", "asyncio"])
def test_concurrent_waits_share_list_pages_against_the_emulator(
    emulator: EmulatorProcess,
    emulator_api_key: str,
    waits: Callable[[EmulatorProcess, str, int], list[EggAPITask]],
) -> None:
    emulator.set_config(pending_seconds=0.2, processing_seconds=1.5)
    n = 6
    done = waits(emulator, emulator_api_key, n)
    assert len({t.id for t in done}) == n
    assert all(t.status.value == "completed" and t.output_urls for t in done)
    gets = emulator.request_count(emulator_api_key, "get_task")
    lists = emulator.request_count(emulator_api_key, "list_tasks")
    # each wait alone would poll ~5 times (1.7 s at 0.3 .. 0.6 s): 30 GETs
    assert lists >= 1 and gets + lists < n * 2, (gets, lists)


def test_batching_can_be_turned_off_and_skips_custom_transports() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404)

    with EggAPIClient("egg_sk_board_test_0001", transport=httpx.MockTransport(handler)) as c:
        assert c._poll_board() is None
    with EggAPIClient("egg_sk_board_test_0001", "http://127.0.0.1:9") as c:
        assert c._poll_board() is not None
        assert PollPolicy(batch=False).batch is False
