"""Submit lanes in this process: how many POSTs of one (account, model, type) may be in flight.

A lost 202 can only be matched by model, type and time, so POSTs of one lane whose answers could
be confused are counted here (threads of one process) and in the ledger's ``lane`` lease (every
worker of the ledger); the submitter holds both.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from prefect_eggapi.client.registry import Registry


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


def lane_name(account: str, model: str, task_type: str) -> str:
    """The ledger's name for the same lane."""
    return f"{account}|{model}|{task_type}"
