"""``EggAPIClient``: the blocking I/O loop over the shared operations, and the public sync API.

What to send, when to retry, how long to sleep is decided in ``_ops``; this module only carries
the actions out with blocking httpx calls and ``time.sleep``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TypeVar, Unpack

import httpx

from prefect_eggapi.client import _core
from prefect_eggapi.client._base import (
    PoolT,
    TransportT,
    _BaseClient,
    coerce_request,
    edit_request,
)
from prefect_eggapi.client._wait import DEFAULT_WAIT_TIMEOUT
from prefect_eggapi.client.download import DownloadResult, DownloadStream, atomic_file, fetching
from prefect_eggapi.client.polling import PollPolicy
from prefect_eggapi.client.types import (
    EditFields,
    EggAPITask,
    GenerateFields,
    GenerateRequest,
    TaskPage,
    UsagePage,
    UsageSummaryItem,
)

T = TypeVar("T")
BOARD_TIMEOUT_SECONDS = 10.0


def board_client(of: _BaseClient[TransportT, PoolT]) -> EggAPIClient:
    """The client an account's board lists with, from a client of that account (either twin).

    No retries and a short timeout: a failed page just sends each wait to its own GET.
    """
    return EggAPIClient(
        of._api_key,
        of.base_url,
        timeout=httpx.Timeout(BOARD_TIMEOUT_SECONDS, connect=5.0),
        retry=_core.RetryPolicy(max_retries=0),
        rate_limit=of.limiter,
        user_agent=of._headers["User-Agent"],
    )


class EggAPIClient(_BaseClient[httpx.BaseTransport, httpx.Client]):
    """Synchronous client. One connection pool; use as a context manager or call :meth:`close`."""

    _pool = httpx.Client

    def __enter__(self) -> EggAPIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()
        self._files.close()

    def _board_lister(self) -> EggAPIClient:
        return board_client(self)

    # ------------------------------------------------------------------ the I/O loop

    def _run(self, op: _core.Op[T]) -> T:
        """Carry out an operation's actions with blocking I/O."""
        with _core.Driver(op) as driver:
            for action in driver:
                try:
                    driver.answer(self._perform(action))
                except Exception as exc:  # thrown into the operation, which decides
                    driver.fail(exc)
        return driver.result

    def _perform(self, action: _core.Action) -> _core.Answer:
        if isinstance(action, _core.Send):
            if self.limiter is not None:
                self.limiter.acquire()
            return self._http.request(
                action.method, action.path, params=action.params, json=action.json
            )
        if isinstance(action, _core.Sleep):
            time.sleep(action.seconds)
            return None
        if isinstance(action, _core.BoardPoll):
            return action.board.poll(action.task_id, action.delay, action.slack)
        return action.signals.wait(action.task_id, action.delay)

    # ------------------------------------------------------------------ API

    def generate(
        self, request: GenerateRequest | None = None, **fields: Unpack[GenerateFields]
    ) -> EggAPITask:
        """Create a task (``POST /v1/generate``); never posts twice for one call.

        Pass a :class:`GenerateRequest` or its fields as keywords (``model``, ``prompt``,
        ``negative_prompt``, ``aspect_ratio``, ``num_outputs``, ``resolution``, ``image_urls``,
        ``webhook_url``); a bad value raises ``InvalidRequestError`` naming the field, before
        any HTTP call.
        """
        return self._run(self._generate_op(coerce_request(request, fields)))

    def edit(
        self, image_urls: list[str] | tuple[str, ...], **fields: Unpack[EditFields]
    ) -> EggAPITask:
        """An edit is a generate with input images (``type: image_edit``)."""
        return self.generate(edit_request(image_urls, fields))

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
        for page in _core.page_numbers(max_pages):
            result = self.list_tasks(page, per_page)
            yield from result.items
            if _core.last_page(result, page):
                return

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
        signals: _core.TaskSignals | None = None,
    ) -> EggAPITask:
        """Poll until the task is terminal or ``timeout`` seconds (wall clock) have passed.

        Transient errors while polling do not end the wait; the deadline does, with
        :class:`TaskAbandonedError` carrying the task id (the task may still bill).
        """
        return self._run(self._wait_op(task, timeout, poll, raise_on_failure, on_poll, signals))

    @contextmanager
    def stream_output(self, url: str) -> Iterator[tuple[Iterator[bytes], DownloadStream]]:
        """Yield ``(chunks, stream)``; reading to the end verifies it, sets ``stream.result``."""
        with fetching(url), self._files.stream("GET", url) as response:
            stream = DownloadStream.answered(url, response)
            yield stream.checked(response), stream

    def download(self, url: str, dest: str | Path | IO[bytes]) -> DownloadResult:
        """Stream one output to a path or binary file; memory stays at one chunk.

        A path is written to a temporary sibling and renamed only once the download checked out,
        so a failure never leaves a truncated file under the final name.
        """
        if isinstance(dest, str | Path):
            with atomic_file(Path(dest)) as fh:
                return self.download(url, fh)
        with self.stream_output(url) as (chunks, stream):
            for chunk in chunks:
                dest.write(chunk)
        assert stream.result is not None
        return stream.result
