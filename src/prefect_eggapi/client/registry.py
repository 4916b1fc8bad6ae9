"""Process-wide state in one place, with one reset.

Some things must be shared by every client of an account in a process, or the process would
break the account's limits or forget what it learned: the rate bucket and learned durations of
an account, its poll board, its submit lanes, the default ledgers and output stores, the signal
watchers, the global-limit clients. Each is a :class:`Registry` made here, at import time; they
live as long as the process. :func:`reset_process_state` empties all of them (tests, or a
process that changes accounts), so that nothing hides in a module-level dict of its own.

No Prefect imports.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Registry", "registries", "reset_process_state"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_ALL: list[Registry[object, object]] = []
_ALL_LOCK = threading.Lock()


class Registry(Generic[K, V]):
    """A named, thread-safe map of process-wide singletons, made on first use.

    Args:
        name: what it holds, for :func:`registries` and error messages.
        limit: keep at most this many (the least recently used is dropped); None: no limit.
    """

    def __init__(self, name: str, *, limit: int | None = None) -> None:
        self.name = name
        self.limit = limit
        self._items: dict[K, V] = {}
        self._lock = threading.Lock()
        with _ALL_LOCK:
            _ALL.append(self)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {len(self)} item(s))"

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get(self, key: K, make: Callable[[], V]) -> V:
        """The item for ``key``, made by ``make`` (under the lock) the first time."""
        with self._lock:
            if key in self._items:
                item = self._items[key] = self._items.pop(key)  # most recently used last
                return item
            if self.limit is not None and len(self._items) >= self.limit:
                self._items.pop(next(iter(self._items)))
            item = self._items[key] = make()
            return item

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def registries() -> list[Registry[object, object]]:
    """Every registry of the process (for diagnostics and tests)."""
    with _ALL_LOCK:
        return list(_ALL)


def reset_process_state() -> None:
    """Forget every shared limiter, board, lane, default ledger, store and watcher. Items in use
    keep working; the next lookup makes new ones."""
    for registry in registries():
        registry.clear()
