"""The sans-I/O core the two clients share: actions, the driver, and the pure rules.

An operation (a GET with its retries, a submit, a wait: see ``_ops``) is a generator. It yields
an *action* — send this request, sleep this long, hand this poll to the board, wait for a
signal — and gets the answer sent back, or the exception thrown in, and decides what that means.
:class:`Driver` steps an operation for an I/O loop; the loops themselves
(``EggAPIClient._run``, ``AsyncEggAPIClient._run``) only carry actions out, blocking or
awaiting. That is how httpx and openai-python keep sync and async twins from drifting apart.

Nothing here does I/O: the rules for reading envelopes, ``Retry-After`` and transport errors are
plain functions, so they can be checked without a server (``tests/test_client_core.py``).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Generic, Protocol, TypeAlias, TypeVar, cast

import httpx

from prefect_eggapi.client.board import PollBoard
from prefect_eggapi.client.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    EggAPIError,
    InvalidRequestError,
    error_for_status,
)
from prefect_eggapi.client.types import EggAPITask, JSONObject, JSONValue, TaskPage

T = TypeVar("T")

# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Send:
    """Send one API request (after the rate limiter); the answer is the ``httpx.Response``."""

    method: str
    path: str
    params: dict[str, int] | None = None
    json: JSONObject | None = None


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class BoardPoll:
    """Hand one poll to the account's board; the answer is the task it saw, or None."""

    board: PollBoard
    task_id: str
    delay: float
    slack: float


@dataclass(frozen=True)
class AwaitSignal:
    """Wait up to ``delay`` for a signal; the answer is whether one came."""

    signals: TaskSignals
    task_id: str
    delay: float


Action: TypeAlias = Send | Sleep | BoardPoll | AwaitSignal
# What an I/O loop sends back: a response, the board's task (or None), a signal's bool.
Answer: TypeAlias = httpx.Response | EggAPITask | bool | None
Op: TypeAlias = Generator[Action, Answer, T]


def send(
    method: str, path: str, params: dict[str, int] | None = None, json: JSONObject | None = None
) -> Op[httpx.Response]:
    """``yield from send(...)``: the response to one request (the loops answer a Send so)."""
    response = yield Send(method, path, params, json)
    return cast(httpx.Response, response)


class Driver(Generic[T]):
    """Steps one operation for an I/O loop: hands out its actions, feeds back each outcome.

    Iterating yields the actions; the loop reports each with :meth:`answer` or :meth:`fail`
    before asking for the next. When the operation returns, iteration stops and :attr:`result`
    holds its value; an error the operation does not handle leaves the loop. Leaving the ``with``
    block closes the operation, whatever happened (a wait unregisters from its board).
    """

    result: T

    def __init__(self, op: Op[T]) -> None:
        self._op = op
        self._answer: Answer = None
        self._error: Exception | None = None

    def __enter__(self) -> Driver[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self._op.close()

    def __iter__(self) -> Iterator[Action]:
        while True:
            try:
                if self._error is not None:
                    action = self._op.throw(self._error)
                else:
                    action = self._op.send(self._answer)
            except StopIteration as stop:
                self.result = stop.value
                return
            self._answer, self._error = None, None
            yield action

    def answer(self, value: Answer) -> None:
        self._answer = value

    def fail(self, exc: Exception) -> None:
        """The action raised: thrown into the operation, which decides."""
        self._error = exc


# --------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for idempotent reads (and for submits that provably created nothing)."""

    max_retries: int = 4
    base_delay: float = 0.5
    max_delay: float = 8.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), 60.0)
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


class TaskSignals(Protocol):
    """Something that can wake a wait early, e.g. verified webhooks (see ``signals``).

    The payload of a delivery is never trusted: either whoever recorded the signal re-read the
    task from the API (an optional ``confirmed(task_id) -> Task | None`` method returns it, as
    :class:`~prefect_eggapi.webhooks.signals.SQLiteSignals` does) or the wait reads it with
    ``GET /v1/tasks/{id}``. Polling continues on its (slower) schedule, so a lost signal still
    completes the wait.
    """

    def wait(self, task_id: str, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True as soon as ``task_id`` was signalled."""
        ...

    async def await_signal(self, task_id: str, timeout: float) -> bool:
        """Async twin of :meth:`wait`."""
        ...


# --------------------------------------------------------------------------- requests


def check_task_id(task_id: str) -> str:
    """Ids are opaque, but must stay one path segment: no '/', '?', '#', dot segments."""
    if (
        not isinstance(task_id, str)
        or not task_id
        or task_id in (".", "..")
        or any(c in task_id for c in "/?#%\\")
        or any(c.isspace() or not c.isprintable() for c in task_id)
    ):
        raise InvalidRequestError(
            [("task_id", "must be a non-empty id without '/', '?', '#', '%' or spaces")]
        )
    return task_id


def list_params(page: int, per_page: int) -> dict[str, int]:
    problems = []
    if not isinstance(page, int) or page < 1:
        problems.append(("page", "must be an integer >= 1"))
    if not isinstance(per_page, int) or not 1 <= per_page <= 100:
        problems.append(("per_page", "must be an integer from 1 to 100"))
    if problems:
        raise InvalidRequestError(problems, what="list request")
    return {"page": page, "per_page": per_page}


def page_numbers(max_pages: int | None) -> Iterable[int]:
    """The pages ``iter_tasks`` reads: 1, 2, ... up to ``max_pages`` (or until the last)."""
    return itertools.count(1) if max_pages is None else range(1, max_pages + 1)


def last_page(result: TaskPage, page: int) -> bool:
    """Nothing to read after this page: it was empty or the pagination says it was the last."""
    return not result.items or page >= result.pagination.total_pages


# --------------------------------------------------------------------------- answers


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):
            return None


def envelope_data(response: httpx.Response, method: str, path: str) -> JSONValue:
    """Return ``data`` from a success envelope, or raise the typed error it describes."""
    task_id = path.rsplit("/", 1)[-1] if path.startswith("/v1/tasks/") else None
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        err = body.get("error") if isinstance(body, dict) else None
        code = err.get("code") if isinstance(err, dict) else None
        message = err.get("message") if isinstance(err, dict) else None
        cls = error_for_status(response.status_code, code)
        raise cls(
            message or response.text[:200] or response.reason_phrase,
            status_code=response.status_code,
            code=code,
            method=method,
            path=path,
            task_id=task_id,
        )
    if not isinstance(body, dict) or "data" not in body:
        raise APIStatusError(
            "response is not an EggAPI envelope",
            status_code=response.status_code,
            code="BAD_RESPONSE",
            method=method,
            path=path,
        )
    return cast(JSONValue, body["data"])


def is_unsent(exc: httpx.RequestError) -> bool:
    """True when the request provably never reached the server."""
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def transport_error(exc: httpx.RequestError, method: str, path: str) -> EggAPIError:
    cls = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
    return cls(f"{type(exc).__name__} on {method} {path}: {exc}")
