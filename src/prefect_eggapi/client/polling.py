"""When to poll next: phase-aware, learning, jittered, and never past the deadline.

A fixed short interval wastes requests (and rate limit) on 10-second jobs; a fixed long one adds
latency. The policy learns typical queue and processing times from the server's own timestamps of
tasks it has seen finish. Knowing a task's age (server clock), it sleeps until just after the
task's expected completion and polls once; a task running late is polled on a short, growing
interval. Without that knowledge it sleeps about a learned phase duration after each phase change,
then backs off geometrically. Jitter keeps mapped waits from polling in lock-step.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from prefect_eggapi.client.types import EggAPITask, TaskStatus

AIM_CAP_INTERVALS = 4  # an aimed sleep is at most this many max_intervals


@dataclass(frozen=True)
class PollPolicy:
    """Knobs for one wait; the defaults suit EggAPI's documented 9-12 s tasks."""

    initial_interval: float = 1.0
    max_interval: float = 5.0
    multiplier: float = 1.5
    min_interval: float = 0.05
    jitter: float = 0.1
    # Fraction of the learned phase duration to sleep before the first poll in that phase.
    learned_fraction: float = 0.9
    # Use learned phase durations at all (a webhook backstop should not).
    learn: bool = True
    # Let concurrent waits of one account share GET /v1/tasks pages (see ``board``).
    batch: bool = True
    # Aim the poll this fraction (plus 0.1 s) after the task's learned expected completion.
    completion_margin: float = 0.05

    @classmethod
    def backstop(cls) -> PollPolicy:
        """For waits that a webhook signal wakes: polling only catches lost deliveries."""
        return cls(initial_interval=15.0, max_interval=60.0, multiplier=2.0, learn=False)

    def __post_init__(self) -> None:
        if not 0 < self.min_interval <= self.initial_interval <= self.max_interval:
            raise ValueError("need 0 < min_interval <= initial_interval <= max_interval")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")


class DurationStats:
    """Exponentially weighted queue and processing times of finished tasks, shared per client."""

    def __init__(self, alpha: float = 0.3) -> None:
        self._alpha = alpha
        self._lock = threading.Lock()
        self.queue: float | None = None
        self.processing: float | None = None
        # Server clock minus ours (seconds), learned from 202 answers by the client.
        self.clock_offset: float | None = None
        # The newest created_at seen in any answer, and the ids seen with it: a task older than
        # that (or one of those) provably existed before anything this process sends next.
        self.newest_created: datetime | None = None
        self.newest_ids: set[str] = set()

    def see(self, tasks: Iterable[EggAPITask]) -> None:
        """Move the horizon forward with tasks the server has shown us."""
        with self._lock:
            for task in tasks:
                when = task.created_at
                if when is None:
                    continue
                if self.newest_created is None or when > self.newest_created:
                    self.newest_created, self.newest_ids = when, {task.id}
                elif when == self.newest_created:
                    self.newest_ids.add(task.id)

    def horizon(self) -> tuple[datetime | None, list[str]]:
        with self._lock:
            return self.newest_created, sorted(self.newest_ids)

    @property
    def total(self) -> float | None:
        """Expected seconds from creation to completion, once a completed task was seen."""
        if self.processing is None:
            return None
        return (self.queue or 0.0) + self.processing

    def observe(self, task: EggAPITask) -> None:
        if task.status is not TaskStatus.COMPLETED:
            return
        with self._lock:
            self.queue = self._mix(self.queue, task.queue_seconds)
            self.processing = self._mix(self.processing, task.processing_seconds)

    def _mix(self, old: float | None, new: float | None) -> float | None:
        if new is None or new < 0:
            return old
        return new if old is None else old + self._alpha * (new - old)


class PollSchedule:
    """The delays for one wait; call :meth:`next_delay` with each status seen."""

    def __init__(self, policy: PollPolicy, stats: DurationStats, rng: random.Random | None = None):
        self._policy = policy
        self._stats = stats
        self._rng = rng or random.Random()
        self._phase: TaskStatus | None = None
        self._interval = policy.initial_interval
        self._overdue: float | None = None
        self.polls = 0
        self.aimed = False  # the last delay aimed at a learned completion time

    def next_delay(self, status: TaskStatus | None, age: float | None = None) -> float:
        """Seconds until the next poll, given the last status seen and the task's age."""
        p = self._policy
        self.polls += status is not None
        expected = self._stats.total if p.learn else None
        self.aimed = bool(
            age is not None and expected and status in (TaskStatus.PENDING, TaskStatus.PROCESSING)
        )
        if self.aimed and age is not None and expected:
            return self._aimed(expected, age)
        if status != self._phase:
            self._phase = status
            learned = (
                {
                    TaskStatus.PENDING: self._stats.queue,
                    TaskStatus.PROCESSING: self._stats.processing,
                }.get(status)
                if status is not None
                else None
            )
            self._interval = p.initial_interval
            base = learned * p.learned_fraction if learned and p.learn else p.initial_interval
        else:
            self._interval = min(p.max_interval, self._interval * p.multiplier)
            base = self._interval
        return self._jittered(base)

    def _aimed(self, expected: float, age: float) -> float:
        """Just after the expected completion; then a short interval growing geometrically."""
        p = self._policy
        target = expected * (1 + p.completion_margin) + 0.1
        if age < target and self._overdue is None:
            # Never longer than one expected lifetime, whatever the clocks say, nor than a few
            # max intervals, so one outlier in the learned average cannot park every wait.
            return max(
                p.min_interval, min(target - age, target, AIM_CAP_INTERVALS * p.max_interval)
            )
        if self._overdue is None:
            self._overdue = min(p.initial_interval, max(p.min_interval, 0.1 * expected))
        else:
            self._overdue = min(p.max_interval, self._overdue * p.multiplier)
        return self._jittered(self._overdue)

    def _jittered(self, base: float) -> float:
        spread = base * self._policy.jitter
        return max(self._policy.min_interval, base + self._rng.uniform(-spread, spread))
