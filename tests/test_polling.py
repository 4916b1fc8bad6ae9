"""Poll scheduling (learned phases, geometric backoff, jitter) and the shared token bucket."""

from __future__ import annotations

import random
import types
from datetime import UTC, datetime, timedelta

import pytest

from prefect_eggapi.client import ratelimit
from prefect_eggapi.client.polling import DurationStats, PollPolicy, PollSchedule
from prefect_eggapi.client.ratelimit import RateLimiter
from prefect_eggapi.client.types import EggAPITask, TaskStatus

T0 = datetime(2026, 5, 8, 10, 30, tzinfo=UTC)


def finished(queue: float, processing: float, status: str = "completed") -> EggAPITask:
    return EggAPITask.model_validate(
        {
            "id": "gen_x",
            "status": status,
            "created_at": T0.isoformat(),
            "started_at": (T0 + timedelta(seconds=queue)).isoformat(),
            "completed_at": (T0 + timedelta(seconds=queue + processing)).isoformat(),
        }
    )


# --------------------------------------------------------------------------- DurationStats


def test_duration_stats_learn_from_completed_tasks_only() -> None:
    stats = DurationStats(alpha=0.5)
    stats.observe(finished(3, 20, status="failed"))
    stats.observe(finished(3, 20, status="processing"))
    assert stats.queue is None and stats.processing is None
    stats.observe(finished(2, 10))
    assert (stats.queue, stats.processing) == (2, 10)
    stats.observe(finished(4, 20))  # EWMA: old + alpha * (new - old)
    assert (stats.queue, stats.processing) == (3, 15)


def test_duration_stats_ignore_missing_and_negative_durations() -> None:
    stats = DurationStats()
    stats.observe(EggAPITask.model_validate({"id": "a", "status": "completed"}))
    assert stats.queue is None and stats.processing is None
    stats.observe(finished(-5, 8))  # clock skew: started before created
    assert stats.queue is None
    assert stats.processing == 8


# --------------------------------------------------------------------------- PollSchedule


def test_schedule_without_history_starts_at_initial_and_backs_off_geometrically() -> None:
    policy = PollPolicy(initial_interval=1, max_interval=5, multiplier=2, jitter=0)
    sched = PollSchedule(policy, DurationStats())
    delays = [sched.next_delay(TaskStatus.PENDING) for _ in range(6)]
    assert delays == [1, 2, 4, 5, 5, 5]
    assert sched.polls == 6


def test_schedule_restarts_backoff_on_each_phase_change() -> None:
    policy = PollPolicy(initial_interval=1, max_interval=8, multiplier=2, jitter=0)
    sched = PollSchedule(policy, DurationStats())
    assert [sched.next_delay(TaskStatus.PENDING) for _ in range(3)] == [1, 2, 4]
    assert [sched.next_delay(TaskStatus.PROCESSING) for _ in range(3)] == [1, 2, 4]


def test_schedule_uses_learned_durations_after_observing_completed_tasks() -> None:
    stats = DurationStats()
    stats.observe(finished(queue=2.0, processing=10.0))
    policy = PollPolicy(
        initial_interval=1, max_interval=5, multiplier=2, jitter=0, learned_fraction=0.9
    )
    sched = PollSchedule(policy, stats)
    # First poll of each phase sleeps ~90% of the learned phase duration...
    assert sched.next_delay(TaskStatus.PENDING) == pytest.approx(1.8)
    assert sched.next_delay(TaskStatus.PROCESSING) == pytest.approx(9.0)
    # ...then backs off from the initial interval up to the cap.
    assert [sched.next_delay(TaskStatus.PROCESSING) for _ in range(4)] == [2, 4, 5, 5]


def test_schedule_aims_just_after_the_expected_completion_when_the_age_is_known() -> None:
    stats = DurationStats()
    stats.observe(finished(queue=2.0, processing=10.0))
    assert stats.total == 12.0
    policy = PollPolicy(initial_interval=1, max_interval=5, multiplier=2, jitter=0)
    sched = PollSchedule(policy, stats)
    # created 3 s ago: one poll at 12 * 1.05 + 0.1 = 12.7 s of age, whatever the phase
    assert sched.next_delay(TaskStatus.PENDING, age=3.0) == pytest.approx(9.7)
    assert sched.aimed
    assert sched.next_delay(TaskStatus.PROCESSING, age=8.0) == pytest.approx(4.7)
    # running late: a short interval (10 % of the expected total, at most the initial one),
    # growing geometrically up to the cap
    late = [sched.next_delay(TaskStatus.PROCESSING, age=13.0 + i) for i in range(4)]
    assert late == [1, 2, 4, 5]


def test_aimed_delay_never_exceeds_one_expected_lifetime() -> None:
    stats = DurationStats()
    stats.observe(finished(queue=0.5, processing=3.0))
    sched = PollSchedule(PollPolicy(jitter=0), stats)
    # a server clock far behind ours would make the task look younger than zero
    assert sched.next_delay(TaskStatus.PENDING, age=0.0) == pytest.approx(3.5 * 1.05 + 0.1)


def test_an_outlier_in_the_learned_average_cannot_park_waits() -> None:
    stats = DurationStats()
    stats.observe(finished(queue=600, processing=10))  # one task stuck in the queue
    sched = PollSchedule(PollPolicy(jitter=0, max_interval=5), stats)
    assert sched.next_delay(TaskStatus.PENDING, age=1.0) == 20  # 4 x max_interval, not ~640 s


def test_short_expected_totals_poll_late_tasks_more_often() -> None:
    stats = DurationStats()
    stats.observe(finished(queue=0.2, processing=2.8))
    sched = PollSchedule(PollPolicy(jitter=0, multiplier=1.5), stats)
    assert sched.next_delay(TaskStatus.PROCESSING, age=4.0) == pytest.approx(0.3)
    assert sched.next_delay(TaskStatus.PROCESSING, age=4.3) == pytest.approx(0.45)


def test_age_is_ignored_without_learning_or_history() -> None:
    stats = DurationStats()
    stats.observe(finished(queue=2.0, processing=10.0))
    policy = PollPolicy(initial_interval=1, max_interval=5, jitter=0, learn=False)
    unlearned = PollSchedule(policy, stats)
    assert unlearned.next_delay(TaskStatus.PENDING, age=3.0) == 1 and not unlearned.aimed
    fresh = PollSchedule(PollPolicy(initial_interval=1, jitter=0), DurationStats())
    assert fresh.next_delay(TaskStatus.PENDING, age=3.0) == 1 and not fresh.aimed


def test_schedule_without_learning_ignores_stats_of_other_clients() -> None:
    learned, fresh = DurationStats(), DurationStats()
    learned.observe(finished(queue=30, processing=60))
    policy = PollPolicy(initial_interval=1, max_interval=5, jitter=0)
    assert PollSchedule(policy, fresh).next_delay(TaskStatus.PROCESSING) == 1
    assert PollSchedule(policy, learned).next_delay(TaskStatus.PROCESSING) == pytest.approx(54)


def test_jitter_stays_within_bounds_and_actually_varies() -> None:
    policy = PollPolicy(initial_interval=2, max_interval=2, multiplier=1, jitter=0.25)
    sched = PollSchedule(policy, DurationStats(), rng=random.Random(7))
    delays = [sched.next_delay(TaskStatus.PENDING) for _ in range(500)]
    assert all(1.5 <= d <= 2.5 for d in delays)
    assert len({round(d, 6) for d in delays}) > 100
    assert min(delays) < 1.6 and max(delays) > 2.4  # uses the whole band


def test_jitter_is_reproducible_with_a_seeded_rng() -> None:
    policy = PollPolicy(initial_interval=1, max_interval=4, jitter=0.2)
    a = PollSchedule(policy, DurationStats(), rng=random.Random(1))
    b = PollSchedule(policy, DurationStats(), rng=random.Random(1))
    seq = [TaskStatus.PENDING] * 3 + [TaskStatus.PROCESSING] * 4
    assert [a.next_delay(s) for s in seq] == [b.next_delay(s) for s in seq]


def test_delays_never_drop_below_min_interval() -> None:
    policy = PollPolicy(initial_interval=0.01, max_interval=0.01, min_interval=0.01, jitter=0.9)
    sched = PollSchedule(policy, DurationStats(), rng=random.Random(3))
    assert min(sched.next_delay(TaskStatus.PENDING) for _ in range(200)) >= 0.01


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_interval": 0.0},
        {"min_interval": 0.0},
        {"initial_interval": 6.0, "max_interval": 5.0},
        {"min_interval": 2.0, "initial_interval": 1.0},
        {"multiplier": 0.5},
        {"jitter": 1.0},
        {"jitter": -0.1},
    ],
)
def test_poll_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PollPolicy(**kwargs)


# --------------------------------------------------------------------------- RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(
        ratelimit, "time", types.SimpleNamespace(monotonic=fake.monotonic, sleep=fake.sleep)
    )
    return fake


def test_reserve_allows_a_burst_then_spaces_by_one_over_rate(clock: FakeClock) -> None:
    limiter = RateLimiter(rate=10, burst=3)
    waits = [limiter.reserve() for _ in range(7)]
    assert waits[:3] == [0, 0, 0]
    assert waits[3:] == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_reserve_refills_with_time_but_never_above_burst(clock: FakeClock) -> None:
    limiter = RateLimiter(rate=4, burst=2)
    assert [limiter.reserve() for _ in range(2)] == [0, 0]
    clock.now += 0.25  # one token back
    assert limiter.reserve() == 0
    assert limiter.reserve() == pytest.approx(0.25)
    clock.now += 3600  # idle for an hour: still only `burst` free slots
    assert [limiter.reserve() for _ in range(3)] == pytest.approx([0, 0, 0.25])


def test_default_burst_equals_rate(clock: FakeClock) -> None:
    limiter = RateLimiter(rate=5)
    assert limiter.burst == 5
    waits = [limiter.reserve() for _ in range(6)]
    assert waits == pytest.approx([0, 0, 0, 0, 0, 0.2])
    assert RateLimiter(rate=0.5).burst == 1


def test_acquire_sleeps_the_reserved_delay(clock: FakeClock) -> None:
    limiter = RateLimiter(rate=2, burst=1)
    for _ in range(4):
        limiter.acquire()
    # First slot free, then 0.5 s apart (each sleep advances the fake clock).
    assert clock.slept == pytest.approx([0.5, 0.5, 0.5])


def test_sustained_rate_is_respected(clock: FakeClock) -> None:
    limiter = RateLimiter(rate=20, burst=5)
    for _ in range(105):
        limiter.acquire()
    elapsed = clock.now - 1000.0
    # 105 requests: 5 from the burst, 100 more at 20/s.
    assert elapsed == pytest.approx(100 / 20)


@pytest.mark.parametrize("rate", [0, -1])
def test_rate_limiter_rejects_non_positive_rates(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        RateLimiter(rate)
