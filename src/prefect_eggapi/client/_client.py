"""Typed EggAPI clients over httpx: ``EggAPIClient`` (sync) and ``AsyncEggAPIClient``.

No Prefect imports: usable from plain scripts and other engines.

Retry rules, because EggAPI has no idempotency key and no cancel:

* Reads (GET) retry with jittered exponential backoff on 429, 5xx and transport errors.
* ``POST /v1/generate`` retries only when the server provably created nothing: the connection was
  never made, or it answered 429. Any other failure after the request may have reached the server
  (timeouts, dropped connections, 5xx) raises :class:`AmbiguousSubmitError` instead of paying twice.
* Output downloads never carry the API key (they are plain CDN URLs on another host).

The two clients share one decision core: each operation (a GET with its retries, a submit, a
wait) is written once, in :class:`_BaseClient`, as a generator that yields what it needs done —
send this request, sleep this long, hand this poll to the board, wait for a signal — and gets
the answer back (or the exception thrown in). Each client only carries those actions out, with
blocking or awaitable I/O (``_run`` / ``_arun``), the way httpx and openai-python keep their sync
and async twins from drifting apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar, cast

import httpx
from pydantic import BaseModel, SecretStr

from prefect_eggapi._version import __version__
from prefect_eggapi.client.board import PollBoard, board_for
from prefect_eggapi.client.errors import (
    AmbiguousSubmitError,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ContentModerationError,
    DownloadError,
    EggAPIError,
    EmptyOutputError,
    InvalidRequestError,
    NotFoundError,
    OutputGoneError,
    TaskAbandonedError,
    TaskFailedError,
    error_for_status,
)
from prefect_eggapi.client.imageinfo import ImageInfo, ImageSniffer
from prefect_eggapi.client.polling import DurationStats, PollPolicy, PollSchedule
from prefect_eggapi.client.ratelimit import Limiter, RateLimiter
from prefect_eggapi.client.types import (
    EggAPITask,
    GenerateRequest,
    TaskPage,
    TaskStatus,
    UsagePage,
    UsageSummaryItem,
    check_http_url,
)

DEFAULT_BASE_URL = "https://api.eggapi.ai"
# A task created less than this before its wait began is aged by our clock (see _Wait._age).
FRESH_TASK_SECONDS = 2.0
# Longest unaimed sleep of a wait whose polls share list pages (see _Wait.next_sleep).
SHARED_POLL_CAP = 2.0
BOARD_TIMEOUT_SECONDS = 10.0
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=30.0, write=30.0, pool=30.0)
DEFAULT_WAIT_TIMEOUT = 300.0
DOWNLOAD_CHUNK = 64 * 1024

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class _Send:
    """Send one API request (after the rate limiter); the answer is the ``httpx.Response``."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: dict[str, Any] | None = None


@dataclass(frozen=True)
class _Sleep:
    seconds: float


@dataclass(frozen=True)
class _BoardPoll:
    """Hand one poll to the account's board; the answer is the task it saw, or None."""

    board: PollBoard
    task_id: str
    delay: float
    slack: float


@dataclass(frozen=True)
class _AwaitSignal:
    """Wait up to ``delay`` for a signal; the answer is whether one came."""

    signals: TaskSignals
    task_id: str
    delay: float


_Action = _Send | _Sleep | _BoardPoll | _AwaitSignal
_Op = Generator[_Action, Any, T]


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """One TLS context per process: building one loads the CA bundle, which measured as 41 % of
    a batch's CPU when every client made its own (two per client, three clients per image)."""
    return httpx.create_ssl_context()


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


@dataclass
class DownloadResult:
    """What was fetched: checksum, size and format read from the bytes themselves."""

    url: str
    size: int
    sha256: str
    info: ImageInfo


def _mask(key: str) -> str:
    return f"{key[:7]}…{key[-2:]}" if len(key) > 12 else "***"


def _check_credentials(api_key: str | SecretStr, base_url: str) -> tuple[SecretStr, str]:
    secret = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key or "")
    raw = secret.get_secret_value()
    problems: list[tuple[str, str]] = []
    if not raw:
        problems.append(("api_key", "is required (set EGGAPI_API_KEY or pass api_key)"))
    elif raw != raw.strip() or any(c.isspace() for c in raw):
        problems.append(("api_key", "must not contain whitespace"))
    try:
        check_http_url(base_url, field="base_url")
    except ValueError as exc:
        problems.append(("base_url", str(exc)))
    if problems:
        raise InvalidRequestError(problems, what="client configuration")
    return secret, base_url.rstrip("/")


def _retry_after(response: httpx.Response) -> float | None:
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


def _raise_for_envelope(response: httpx.Response, method: str, path: str) -> Any:
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
    return body["data"]


def _is_unsent(exc: httpx.RequestError) -> bool:
    """True when the request provably never reached the server."""
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def _transport_error(exc: httpx.RequestError, method: str, path: str) -> EggAPIError:
    cls = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
    return cls(f"{type(exc).__name__} on {method} {path}: {exc}")


def _coerce_request(request: GenerateRequest | None, fields: dict[str, Any]) -> GenerateRequest:
    if request is not None and fields:
        raise TypeError("pass either a GenerateRequest or keyword fields, not both")
    if request is None:
        return GenerateRequest(**fields)
    if not isinstance(request, GenerateRequest):
        raise TypeError("request must be a GenerateRequest")
    return request


def _check_terminal(task: EggAPITask, raise_on_failure: bool) -> EggAPITask:
    if not raise_on_failure:
        return task
    if task.status is TaskStatus.FAILED:
        if (task.error or "").lower().startswith("content moderation"):
            raise ContentModerationError(task)
        raise TaskFailedError(task)
    if not task.output_urls:
        raise EmptyOutputError(task)
    return task


def _download_error(response: httpx.Response, url: str) -> DownloadError:
    cls = OutputGoneError if response.status_code in (403, 404, 410) else DownloadError
    return cls(
        f"HTTP {response.status_code} downloading output", url=url, status_code=response.status_code
    )


@contextmanager
def _atomic_file(path: Path) -> Iterator[IO[bytes]]:
    tmp = path.with_name(f".{path.name}.part")
    try:
        with open(tmp, "wb") as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class DownloadStream:
    """Checks a download as it streams: size against Content-Length, sha256, format.

    The check runs when the last chunk has been read, *inside* the iteration, so a consumer that
    uploads only after exhausting the chunks never stores a truncated file.
    """

    def __init__(self, url: str, response: httpx.Response) -> None:
        self.url = url
        encoded = response.headers.get("content-encoding", "identity").lower() != "identity"
        self._expected = (
            int(response.headers["content-length"])
            # With Content-Encoding the length counts encoded bytes; httpx yields decoded ones.
            if response.headers.get("content-length", "").isdigit() and not encoded
            else None
        )
        self._hash = hashlib.sha256()
        self._sniffer = ImageSniffer()
        self.size = 0
        self.result: DownloadResult | None = None

    def take(self, chunk: bytes) -> bytes:
        self._hash.update(chunk)
        self._sniffer.feed(chunk)
        self.size += len(chunk)
        return chunk

    def finish(self) -> DownloadResult:
        if self._expected is not None and self.size != self._expected:
            raise DownloadError(
                f"truncated download: got {self.size} of {self._expected} bytes", url=self.url
            )
        info = self._sniffer.info
        if info.format is None:
            raise DownloadError("downloaded file is not a recognised image", url=self.url)
        self.result = DownloadResult(self.url, self.size, self._hash.hexdigest(), info)
        return self.result

    def checked(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            yield self.take(chunk)
        self.finish()

    async def achecked(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield self.take(chunk)
        self.finish()


class _BaseClient:
    """Configuration and pure logic shared by the sync and async clients."""

    def __init__(
        self,
        api_key: str | SecretStr,
        base_url: str = DEFAULT_BASE_URL,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        poll: PollPolicy | None = None,
        rate_limit: float | Limiter | None = 20.0,
        user_agent: str | None = None,
        durations: DurationStats | None = None,
    ) -> None:
        self._api_key, self.base_url = _check_credentials(api_key, base_url)
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.retry = retry or RetryPolicy()
        self.poll = poll or PollPolicy()
        self._custom_poll = poll is not None
        self.limiter: Limiter | None = (
            RateLimiter(rate_limit) if isinstance(rate_limit, int | float) else rate_limit
        )
        # Learned task durations and the server's clock offset; clients of one key in a process
        # share one (see EggAPICredentials), so every wait learns from every other.
        self.durations = durations or DurationStats()
        self._custom_transport = False  # set by subclasses; a board could not reach a mock
        self._headers = {
            "Authorization": f"Bearer {self._api_key.get_secret_value()}",
            "User-Agent": user_agent or f"prefect-eggapi/{__version__}",
            "Accept": "application/json",
        }

    @property
    def clock_offset(self) -> float | None:
        """Server clock minus ours, learned from 202s (shared with ``durations``); narrows the
        reconciliation window and dates a task's age for the poll schedule."""
        return self.durations.clock_offset

    @clock_offset.setter
    def clock_offset(self, value: float | None) -> None:
        self.durations.clock_offset = value

    def _poll_board(self) -> PollBoard | None:
        """The account's shared board; None when this client talks to a custom transport."""
        if self._custom_transport:
            return None

        def connect() -> EggAPIClient:
            # No retries and a short timeout: a failed page just sends each wait to its own GET.
            return EggAPIClient(
                self._api_key,
                self.base_url,
                timeout=httpx.Timeout(BOARD_TIMEOUT_SECONDS, connect=5.0),
                retry=RetryPolicy(max_retries=0),
                rate_limit=self.limiter,
                user_agent=self._headers["User-Agent"],
            )

        return board_for(self.account, lambda: PollBoard(connect))

    @property
    def account(self) -> str:
        """Who gets billed: the base URL plus a hash of the key (never the key itself)."""
        digest = hashlib.sha256(self._api_key.get_secret_value().encode()).hexdigest()[:16]
        return f"{self.base_url}#{digest}"

    def __repr__(self) -> str:
        key = _mask(self._api_key.get_secret_value())
        return f"{type(self).__name__}(base_url={self.base_url!r}, api_key={key!r})"

    def _list_params(self, page: int, per_page: int) -> dict[str, int]:
        problems = []
        if not isinstance(page, int) or page < 1:
            problems.append(("page", "must be an integer >= 1"))
        if not isinstance(per_page, int) or not 1 <= per_page <= 100:
            problems.append(("per_page", "must be an integer from 1 to 100"))
        if problems:
            raise InvalidRequestError(problems, what="list request")
        return {"page": page, "per_page": per_page}

    @staticmethod
    def _check_task_id(task_id: str) -> str:
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

    @staticmethod
    def _edit_request(
        image_urls: list[str] | tuple[str, ...], fields: dict[str, Any]
    ) -> GenerateRequest:
        if not image_urls:
            raise InvalidRequestError(
                [("image_urls", "an edit needs at least one input image URL")]
            )
        return GenerateRequest(image_urls=tuple(image_urls), **fields)

    def _ambiguous(
        self, request: GenerateRequest, sent_at: datetime, why: str, cause: BaseException | None
    ) -> AmbiguousSubmitError:
        return AmbiguousSubmitError(
            why,
            sent_at=sent_at,
            failed_at=datetime.now(UTC),
            model=request.model,
            prompt=request.prompt,
            task_type=request.task_type,
            cause=cause,
        )

    def _submit_failed(
        self, req: GenerateRequest, sent_at: datetime, exc: httpx.RequestError
    ) -> EggAPIError:
        """A transport error on submit: retryable only if the request never left."""
        if not _is_unsent(exc):
            raise self._ambiguous(req, sent_at, type(exc).__name__, exc) from exc
        return _transport_error(exc, "POST", "/v1/generate")

    def _submit_answered(
        self, req: GenerateRequest, sent_at: datetime, response: httpx.Response
    ) -> EggAPITask | EggAPIError:
        """The created task, or a 429 to retry; 4xx raise; anything else is ambiguous."""
        try:
            task = EggAPITask.model_validate(_raise_for_envelope(response, "POST", "/v1/generate"))
        except APIStatusError as exc:
            if exc.http_status == 429:
                return exc
            if 400 <= exc.http_status < 500:
                raise
            raise self._ambiguous(req, sent_at, str(exc), exc) from exc
        except ValueError as exc:  # a 2xx we cannot read: the task may exist
            raise self._ambiguous(req, sent_at, f"unreadable response: {exc}", exc) from exc
        if task.created_at is not None:
            now = datetime.now(UTC)
            midpoint = sent_at + (now - sent_at) / 2
            self.clock_offset = (task.created_at - midpoint).total_seconds()
            self.durations.see([task])
        return task

    # ------------------------------------------------------------------ operations (sans I/O)

    def _get_op(
        self,
        path: str,
        params: dict[str, Any] | None = None,
        on_response: Callable[[str], None] | None = None,
    ) -> _Op[Any]:
        """A GET with retries on 429, 5xx and transport errors; the envelope's ``data``."""
        attempt = 0
        while True:
            try:
                response: httpx.Response = yield _Send("GET", path, params=params)
                data = _raise_for_envelope(response, "GET", path)
                if on_response is not None and "date" in response.headers:
                    on_response(response.headers["date"])
                return data
            except httpx.RequestError as exc:  # transport, or a body that cannot be decoded
                error: EggAPIError = _transport_error(exc, "GET", path)
                retry_after = None
            except APIStatusError as exc:
                if not exc.retryable:
                    raise
                error, retry_after = exc, _retry_after(response)
            if attempt >= self.retry.max_retries:
                raise error
            yield _Sleep(self.retry.delay(attempt, retry_after))
            attempt += 1

    def _generate_op(self, req: GenerateRequest) -> _Op[EggAPITask]:
        """``POST /v1/generate``, retried only when provably nothing was created."""
        payload = req.to_payload()
        attempt = 0
        while True:
            sent_at = datetime.now(UTC)
            retry_after = None
            try:
                response: httpx.Response = yield _Send("POST", "/v1/generate", json=payload)
            except httpx.RequestError as exc:  # transport, or a 202 that cannot be decoded
                outcome: EggAPITask | EggAPIError = self._submit_failed(req, sent_at, exc)
            else:
                outcome = self._submit_answered(req, sent_at, response)
                retry_after = _retry_after(response)
            if isinstance(outcome, EggAPITask):
                return outcome
            if attempt >= self.retry.max_retries:
                raise outcome
            yield _Sleep(self.retry.delay(attempt, retry_after))
            attempt += 1

    def _get_task_op(self, task_id: str) -> _Op[EggAPITask]:
        path = f"/v1/tasks/{self._check_task_id(task_id)}"
        task = EggAPITask.model_validate((yield from self._get_op(path)))
        self.durations.observe(task)
        return task

    def _list_tasks_op(self, page: int, per_page: int) -> _Op[TaskPage]:
        data = yield from self._get_op("/v1/tasks", self._list_params(page, per_page))
        result = TaskPage.model_validate(data)
        self.durations.see(result.items)
        return result

    def _usage_op(self, page: int, per_page: int) -> _Op[UsagePage]:
        data = yield from self._get_op("/v1/usage", self._list_params(page, per_page))
        return UsagePage.model_validate(data)

    def _usage_summary_op(self) -> _Op[list[UsageSummaryItem]]:
        data = yield from self._get_op("/v1/usage/summary")
        return [UsageSummaryItem.model_validate(item) for item in data]

    def _probe_clock_op(self) -> _Op[None]:
        sent = time.time()
        dates: list[str] = []
        data = yield from self._get_op(
            "/v1/tasks", self._list_params(1, 100), on_response=dates.append
        )
        received = time.time()
        self.durations.see(TaskPage.model_validate(data).items)
        if self.clock_offset is None and dates:
            with contextlib.suppress(TypeError, ValueError, IndexError):
                server = parsedate_to_datetime(dates[-1]).timestamp() + 0.5
                self.clock_offset = server - (sent + received) / 2

    def _wait_op(
        self,
        task: EggAPITask | str,
        timeout: float,
        poll: PollPolicy | None,
        raise_on_failure: bool,
        on_poll: Callable[[EggAPITask], None] | None,
        signals: TaskSignals | None,
    ) -> _Op[EggAPITask]:
        with _Wait(self, task, timeout, poll, signals) as wait:
            while not wait.done:
                delay = wait.next_sleep()
                known: EggAPITask | None = None
                if board := wait.batched():
                    known = yield _BoardPoll(board, wait.task_id, delay, wait.slack(delay))
                elif wait.signals is None or wait.last is None:
                    yield _Sleep(delay)
                elif (yield _AwaitSignal(wait.signals, wait.task_id, delay)):
                    known = wait.signalled()
                if known is not None:
                    wait.take(known, on_poll)
                    continue
                try:
                    wait.last = yield from self._get_task_op(wait.task_id)
                except EggAPIError as exc:
                    wait.failed_poll(exc)
                    continue
                if on_poll is not None:
                    on_poll(wait.last)
            return wait.result(raise_on_failure)


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


class _Wait:
    """One wait's state: deadline, poll schedule, last task seen."""

    def __init__(
        self,
        client: _BaseClient,
        task: EggAPITask | str,
        timeout: float,
        poll: PollPolicy | None,
        signals: TaskSignals | None,
    ) -> None:
        if not timeout > 0:
            raise InvalidRequestError([("timeout", "must be > 0 seconds")], what="wait")
        self.task_id = task.id if isinstance(task, EggAPITask) else client._check_task_id(task)
        self.last = task if isinstance(task, EggAPITask) else None
        self.timeout = timeout
        self.started = time.monotonic()
        # With signals, polling is only the backstop for lost deliveries: slow by default.
        slow = signals is not None and not client._custom_poll
        policy = poll or (PollPolicy.backstop() if slow else client.poll)
        self.schedule = PollSchedule(policy, client.durations)
        self.durations = client.durations
        # A signal wakes the wait once; after that (say the re-read was not terminal yet) the
        # schedule decides, so a recorded signal cannot turn the loop into a busy poll.
        self.signals = signals
        self.board = client._poll_board() if signals is None and policy.batch else None
        self._fresh: bool | None = None  # created just before this wait started (see _age)

    def __enter__(self) -> _Wait:
        if self.board is not None:
            self.board.register(self.task_id, self.last.created_at if self.last else None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.board is not None:
            self.board.unregister(self.task_id)

    def batched(self) -> PollBoard | None:
        """The board to hand the next poll to, when other waits of the account are in flight."""
        if self.board is None or self.last is None or not self.board.crowded:
            return None
        return self.board

    @staticmethod
    def slack(delay: float) -> float:
        """How much earlier than planned a poll may run so it can share a list page."""
        return min(0.3 * delay, 2.0)

    def take(self, task: EggAPITask, on_poll: Callable[[EggAPITask], None] | None) -> None:
        """A poll answered by a list page or by a signal's writer rather than by our GET."""
        self.durations.observe(task)
        self.last = task
        if on_poll is not None:
            on_poll(task)

    @property
    def done(self) -> bool:
        return self.last is not None and self.last.is_terminal

    def next_sleep(self) -> float:
        """Seconds to sleep before the next poll; raises once the deadline has passed."""
        status = self.last.status if self.last else None
        delay = self.schedule.next_delay(status, self._age()) if self.last is not None else 0.0
        if not self.schedule.aimed and self.batched() is not None:
            # Nothing learned yet, but polls share list pages: look more often for the first
            # completion, which teaches every wait of the account when to look.
            delay = min(delay, SHARED_POLL_CAP)
        elapsed = time.monotonic() - self.started
        if elapsed >= self.timeout:
            raise TaskAbandonedError(
                self.task_id, last_status=status and status.value, waited_seconds=elapsed
            )
        return min(delay, self.timeout - elapsed)

    def _age(self) -> float | None:
        """Seconds since the task was created.

        Server timestamps may have whole-second resolution, so a task that was only just
        created (the usual submit -> wait) is aged from the start of this wait instead.
        """
        if self._fresh:
            return time.monotonic() - self.started
        created = self.last.created_at if self.last is not None else None
        if created is None:
            return None
        offset = timedelta(seconds=self.durations.clock_offset or 0.0)
        age = max(0.0, (datetime.now(UTC) + offset - created).total_seconds())
        if self._fresh is None:
            self._fresh = age - (time.monotonic() - self.started) < FRESH_TASK_SECONDS
            if self._fresh:
                return time.monotonic() - self.started
        return age

    def signalled(self) -> EggAPITask | None:
        """After a signal: its writer's re-read task, which ends the wait without a GET."""
        confirmed = getattr(self.signals, "confirmed", None)
        self.signals = None
        task = confirmed(self.task_id) if confirmed is not None else None
        return task if isinstance(task, EggAPITask) and task.is_terminal else None

    def failed_poll(self, exc: EggAPIError) -> None:
        """Transient errors keep the wait going until the deadline; others end it."""
        if not exc.retryable or isinstance(exc, NotFoundError):
            raise exc

    def result(self, raise_on_failure: bool) -> EggAPITask:
        assert self.last is not None
        return _check_terminal(self.last, raise_on_failure)


class EggAPIClient(_BaseClient):
    """Synchronous client. One connection pool; use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        api_key: str | SecretStr,
        base_url: str = DEFAULT_BASE_URL,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        poll: PollPolicy | None = None,
        rate_limit: float | Limiter | None = 20.0,
        user_agent: str | None = None,
        durations: DurationStats | None = None,
    ) -> None:
        super().__init__(
            api_key,
            base_url,
            timeout=timeout,
            retry=retry,
            poll=poll,
            rate_limit=rate_limit,
            user_agent=user_agent,
            durations=durations,
        )
        self._custom_transport = transport is not None
        tls = shared_ssl_context()
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=self._headers,
            timeout=self.timeout,
            transport=transport,
            verify=tls,
        )
        # Separate pool without credentials: output URLs live on a CDN host.
        self._files = httpx.Client(
            timeout=self.timeout, transport=transport, follow_redirects=True, verify=tls
        )

    def __enter__(self) -> EggAPIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()
        self._files.close()

    # ------------------------------------------------------------------ plumbing

    def _run(self, op: _Op[T]) -> T:
        """Carry out an operation's actions with blocking I/O."""
        answer: Any = None
        error: Exception | None = None
        try:
            while True:
                try:
                    action = op.throw(error) if error is not None else op.send(answer)
                except StopIteration as stop:
                    return cast(T, stop.value)
                answer, error = None, None
                try:
                    answer = self._perform(action)
                except Exception as exc:  # thrown into the operation, which decides
                    error = exc
        finally:
            op.close()

    def _perform(self, action: _Action) -> Any:
        if isinstance(action, _Send):
            if self.limiter is not None:
                self.limiter.acquire()
            return self._http.request(
                action.method, action.path, params=action.params, json=action.json
            )
        if isinstance(action, _Sleep):
            time.sleep(action.seconds)
            return None
        if isinstance(action, _BoardPoll):
            return action.board.poll(action.task_id, action.delay, action.slack)
        return action.signals.wait(action.task_id, action.delay)

    # ------------------------------------------------------------------ API

    def generate(self, request: GenerateRequest | None = None, **fields: Any) -> EggAPITask:
        """Create a task (``POST /v1/generate``); never posts twice for one call."""
        return self._run(self._generate_op(_coerce_request(request, fields)))

    def edit(self, image_urls: list[str] | tuple[str, ...], **fields: Any) -> EggAPITask:
        """An edit is a generate with input images (``type: image_edit``)."""
        return self.generate(self._edit_request(image_urls, fields))

    def get_task(self, task_id: str) -> EggAPITask:
        return self._run(self._get_task_op(task_id))

    def list_tasks(self, page: int = 1, per_page: int = 20) -> TaskPage:
        return self._run(self._list_tasks_op(page, per_page))

    def probe_clock(self) -> None:
        """Learn the server's clock and its newest tasks before the first POST (one GET).

        Until a 202 has dated the server's clock, a lost answer would have to be matched in a
        window of +-60 s, wide enough to take someone else's task. The ``Date`` header has whole
        seconds, so the estimate is good to about half a second plus half the round trip.
        """
        self._run(self._probe_clock_op())

    def iter_tasks(self, per_page: int = 100, max_pages: int | None = None) -> Iterator[EggAPITask]:
        """Newest first, page by page, until the last page or ``max_pages``."""
        page = 1
        while max_pages is None or page <= max_pages:
            result = self.list_tasks(page, per_page)
            yield from result.items
            if not result.items or page >= result.pagination.total_pages:
                return
            page += 1

    def usage(self, page: int = 1, per_page: int = 20) -> UsagePage:
        return self._run(self._usage_op(page, per_page))

    def usage_summary(self) -> list[UsageSummaryItem]:
        return self._run(self._usage_summary_op())

    def wait_for_task(
        self,
        task: EggAPITask | str,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT,
        poll: PollPolicy | None = None,
        raise_on_failure: bool = True,
        on_poll: Callable[[EggAPITask], None] | None = None,
        signals: TaskSignals | None = None,
    ) -> EggAPITask:
        """Poll until the task is terminal or ``timeout`` seconds (wall clock) have passed.

        Transient errors while polling do not end the wait; the deadline does, with
        :class:`TaskAbandonedError` carrying the task id (the task may still bill).
        """
        return self._run(self._wait_op(task, timeout, poll, raise_on_failure, on_poll, signals))

    @contextmanager
    def stream_output(self, url: str) -> Iterator[tuple[Iterator[bytes], DownloadStream]]:
        """Yield ``(chunks, stream)``; reading to the end verifies it, sets ``stream.result``."""
        check_http_url(url)
        try:
            with self._files.stream("GET", url) as response:
                if response.status_code != 200:
                    raise _download_error(response, url)
                stream = DownloadStream(url, response)
                yield stream.checked(response.iter_bytes(DOWNLOAD_CHUNK)), stream
        except httpx.RequestError as exc:
            raise DownloadError(f"{type(exc).__name__} while downloading", url=url) from exc

    def download(self, url: str, dest: str | Path | IO[bytes]) -> DownloadResult:
        """Stream one output to a path or binary file; memory stays at one chunk.

        A path is written to a temporary sibling and renamed only once the download checked out,
        so a failure never leaves a truncated file under the final name.
        """
        if isinstance(dest, str | Path):
            with _atomic_file(Path(dest)) as fh:
                return self.download(url, fh)
        with self.stream_output(url) as (chunks, stream):
            for chunk in chunks:
                dest.write(chunk)
        assert stream.result is not None
        return stream.result


class AsyncEggAPIClient(_BaseClient):
    """Asynchronous twin of :class:`EggAPIClient`; create it inside the task that uses it."""

    def __init__(
        self,
        api_key: str | SecretStr,
        base_url: str = DEFAULT_BASE_URL,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        poll: PollPolicy | None = None,
        rate_limit: float | Limiter | None = 20.0,
        user_agent: str | None = None,
        durations: DurationStats | None = None,
    ) -> None:
        super().__init__(
            api_key,
            base_url,
            timeout=timeout,
            retry=retry,
            poll=poll,
            rate_limit=rate_limit,
            user_agent=user_agent,
            durations=durations,
        )
        self._custom_transport = transport is not None
        tls = shared_ssl_context()
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            timeout=self.timeout,
            transport=transport,
            verify=tls,
        )
        self._files = httpx.AsyncClient(
            timeout=self.timeout, transport=transport, follow_redirects=True, verify=tls
        )

    async def __aenter__(self) -> AsyncEggAPIClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._files.aclose()

    async def _arun(self, op: _Op[T]) -> T:
        """Carry out an operation's actions with awaitable I/O."""
        answer: Any = None
        error: Exception | None = None
        try:
            while True:
                try:
                    action = op.throw(error) if error is not None else op.send(answer)
                except StopIteration as stop:
                    return cast(T, stop.value)
                answer, error = None, None
                try:
                    answer = await self._aperform(action)
                except Exception as exc:  # thrown into the operation, which decides
                    error = exc
        finally:
            op.close()

    async def _aperform(self, action: _Action) -> Any:
        if isinstance(action, _Send):
            if self.limiter is not None:
                await self.limiter.aacquire()
            return await self._http.request(
                action.method, action.path, params=action.params, json=action.json
            )
        if isinstance(action, _Sleep):
            await asyncio.sleep(action.seconds)
            return None
        if isinstance(action, _BoardPoll):
            return await action.board.apoll(action.task_id, action.delay, action.slack)
        return await action.signals.await_signal(action.task_id, action.delay)

    async def generate(self, request: GenerateRequest | None = None, **fields: Any) -> EggAPITask:
        """Create a task (``POST /v1/generate``); never posts twice for one call."""
        return await self._arun(self._generate_op(_coerce_request(request, fields)))

    async def edit(self, image_urls: list[str] | tuple[str, ...], **fields: Any) -> EggAPITask:
        return await self.generate(self._edit_request(image_urls, fields))

    async def get_task(self, task_id: str) -> EggAPITask:
        return await self._arun(self._get_task_op(task_id))

    async def list_tasks(self, page: int = 1, per_page: int = 20) -> TaskPage:
        return await self._arun(self._list_tasks_op(page, per_page))

    async def probe_clock(self) -> None:
        """Async twin of :meth:`EggAPIClient.probe_clock`."""
        await self._arun(self._probe_clock_op())

    async def iter_tasks(
        self, per_page: int = 100, max_pages: int | None = None
    ) -> AsyncIterator[EggAPITask]:
        page = 1
        while max_pages is None or page <= max_pages:
            result = await self.list_tasks(page, per_page)
            for item in result.items:
                yield item
            if not result.items or page >= result.pagination.total_pages:
                return
            page += 1

    async def usage(self, page: int = 1, per_page: int = 20) -> UsagePage:
        return await self._arun(self._usage_op(page, per_page))

    async def usage_summary(self) -> list[UsageSummaryItem]:
        return await self._arun(self._usage_summary_op())

    async def wait_for_task(
        self,
        task: EggAPITask | str,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT,
        poll: PollPolicy | None = None,
        raise_on_failure: bool = True,
        on_poll: Callable[[EggAPITask], None] | None = None,
        signals: TaskSignals | None = None,
    ) -> EggAPITask:
        """Async twin of :meth:`EggAPIClient.wait_for_task`."""
        return await self._arun(
            self._wait_op(task, timeout, poll, raise_on_failure, on_poll, signals)
        )

    @asynccontextmanager
    async def stream_output(
        self, url: str
    ) -> AsyncIterator[tuple[AsyncIterator[bytes], DownloadStream]]:
        check_http_url(url)
        try:
            async with self._files.stream("GET", url) as response:
                if response.status_code != 200:
                    raise _download_error(response, url)
                stream = DownloadStream(url, response)
                yield stream.achecked(response.aiter_bytes(DOWNLOAD_CHUNK)), stream
        except httpx.RequestError as exc:
            raise DownloadError(f"{type(exc).__name__} while downloading", url=url) from exc

    async def download(self, url: str, dest: str | Path | IO[bytes]) -> DownloadResult:
        if isinstance(dest, str | Path):
            with _atomic_file(Path(dest)) as fh:
                return await self.download(url, fh)
        async with self.stream_output(url) as (chunks, stream):
            async for chunk in chunks:
                dest.write(chunk)
        assert stream.result is not None
        return stream.result
