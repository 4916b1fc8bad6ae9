"""The clients' operations, each written once as a generator of actions (see ``_core``).

Retry rules, because EggAPI has no idempotency key and no cancel:

* Reads (GET) retry with jittered exponential backoff on 429, 5xx and transport errors.
* ``POST /v1/generate`` retries only when the server provably created nothing: the connection was
  never made, or it answered 429. Any other failure after the request may have reached the server
  (timeouts, dropped connections, 5xx) raises :class:`AmbiguousSubmitError` instead of paying twice.

A wait polls on its schedule (``_wait.Wait``), hands polls to the account's board when other
waits crowd it, and wakes early on a signal.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import cast

import httpx

from prefect_eggapi.client._core import (
    Answer,
    AwaitSignal,
    BoardPoll,
    Op,
    RetryPolicy,
    Sleep,
    TaskSignals,
    check_task_id,
    envelope_data,
    is_unsent,
    list_params,
    retry_after,
    send,
    transport_error,
)
from prefect_eggapi.client._wait import Wait
from prefect_eggapi.client.board import PollBoard, RawTaskPage
from prefect_eggapi.client.errors import AmbiguousSubmitError, APIStatusError, EggAPIError
from prefect_eggapi.client.polling import DurationStats, PollPolicy
from prefect_eggapi.client.types import (
    EggAPITask,
    GenerateRequest,
    JSONValue,
    TaskPage,
    UsagePage,
    UsageSummaryItem,
)


class Operations:
    """What each call decides, given the client's policies; the I/O loop carries it out."""

    retry: RetryPolicy
    poll: PollPolicy
    _custom_poll: bool  # built with poll=: waits with signals keep it instead of the backstop
    # Learned task durations and the server's clock offset; clients of one key in a process
    # share one (see EggAPICredentials), so every wait learns from every other.
    durations: DurationStats

    @property
    def clock_offset(self) -> float | None:
        """Server clock minus ours, learned from 202s (shared with ``durations``); narrows the
        reconciliation window and dates a task's age for the poll schedule."""
        return self.durations.clock_offset

    @clock_offset.setter
    def clock_offset(self, value: float | None) -> None:
        self.durations.clock_offset = value

    def _poll_board(self) -> PollBoard | None:
        """The account's shared board, or None where polls cannot be shared."""
        raise NotImplementedError

    # ------------------------------------------------------------------ submit outcomes

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
        if not is_unsent(exc):
            raise self._ambiguous(req, sent_at, type(exc).__name__, exc) from exc
        return transport_error(exc, "POST", "/v1/generate")

    def _submit_answered(
        self, req: GenerateRequest, sent_at: datetime, response: httpx.Response
    ) -> EggAPITask | EggAPIError:
        """The created task, or a 429 to retry; 4xx raise; anything else is ambiguous."""
        try:
            task = EggAPITask.model_validate(envelope_data(response, "POST", "/v1/generate"))
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

    # ------------------------------------------------------------------ operations

    def _get_op(
        self,
        path: str,
        params: dict[str, int] | None = None,
        on_response: Callable[[str], None] | None = None,
    ) -> Op[JSONValue]:
        """A GET with retries on 429, 5xx and transport errors; the envelope's ``data``."""
        attempt = 0
        while True:
            try:
                response = yield from send("GET", path, params)
                data = envelope_data(response, "GET", path)
                if on_response is not None and "date" in response.headers:
                    on_response(response.headers["date"])
                return data
            except httpx.RequestError as exc:  # transport, or a body that cannot be decoded
                error: EggAPIError = transport_error(exc, "GET", path)
                wait_hint = None
            except APIStatusError as exc:
                if not exc.retryable:
                    raise
                error, wait_hint = exc, retry_after(response)
            if attempt >= self.retry.max_retries:
                raise error
            yield Sleep(self.retry.delay(attempt, wait_hint))
            attempt += 1

    def _generate_op(self, req: GenerateRequest) -> Op[EggAPITask]:
        """``POST /v1/generate``, retried only when provably nothing was created."""
        payload = req.to_payload()
        attempt = 0
        while True:
            sent_at = datetime.now(UTC)
            wait_hint = None
            try:
                response = yield from send("POST", "/v1/generate", json=payload)
            except httpx.RequestError as exc:  # transport, or a 202 that cannot be decoded
                outcome: EggAPITask | EggAPIError = self._submit_failed(req, sent_at, exc)
            else:
                outcome = self._submit_answered(req, sent_at, response)
                wait_hint = retry_after(response)
            if isinstance(outcome, EggAPITask):
                return outcome
            if attempt >= self.retry.max_retries:
                raise outcome
            yield Sleep(self.retry.delay(attempt, wait_hint))
            attempt += 1

    def _get_task_op(self, task_id: str) -> Op[EggAPITask]:
        path = f"/v1/tasks/{check_task_id(task_id)}"
        task = EggAPITask.model_validate((yield from self._get_op(path)))
        self.durations.observe(task)
        return task

    def _list_tasks_op(self, page: int, per_page: int) -> Op[TaskPage]:
        data = yield from self._get_op("/v1/tasks", list_params(page, per_page))
        result = TaskPage.model_validate(data)
        self.durations.see(result.items)
        return result

    def _task_dicts_op(self, page: int, per_page: int) -> Op[RawTaskPage]:
        """A task list page for the poll board: items stay JSON until the board wants one."""
        data = yield from self._get_op("/v1/tasks", list_params(page, per_page))
        return RawTaskPage.from_data(data)

    def _usage_op(self, page: int, per_page: int) -> Op[UsagePage]:
        data = yield from self._get_op("/v1/usage", list_params(page, per_page))
        return UsagePage.model_validate(data)

    def _usage_summary_op(self) -> Op[list[UsageSummaryItem]]:
        data = yield from self._get_op("/v1/usage/summary")
        return [UsageSummaryItem.model_validate(item) for item in cast(list[JSONValue], data)]

    def _probe_clock_op(self) -> Op[None]:
        sent = time.time()
        dates: list[str] = []
        data = yield from self._get_op("/v1/tasks", list_params(1, 100), on_response=dates.append)
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
    ) -> Op[EggAPITask]:
        with Wait(self, task, timeout, poll, signals) as wait:
            while not wait.done:
                delay = wait.next_sleep()
                known: Answer = None
                if board := wait.batched():
                    known = yield BoardPoll(board, wait.task_id, delay, wait.slack(delay))
                elif wait.signals is None or wait.last is None:
                    yield Sleep(delay)
                elif (yield AwaitSignal(wait.signals, wait.task_id, delay)):
                    known = wait.signalled()
                if isinstance(known, EggAPITask):
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
