"""``AsyncEggAPIClient``: the awaitable I/O loop over the shared operations, and its public API.

The twin of ``_sync``: the same operations (``_ops``), carried out with awaitable httpx calls and
``asyncio.sleep``. The account's poll board lists with a sync client on its own thread, for
either twin (``_sync.board_client``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, TypeVar, Unpack

import httpx

from prefect_eggapi.client import _core
from prefect_eggapi.client._base import _BaseClient, coerce_request, edit_request
from prefect_eggapi.client._sync import EggAPIClient, board_client
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


class AsyncEggAPIClient(_BaseClient[httpx.AsyncBaseTransport, httpx.AsyncClient]):
    """Asynchronous twin of :class:`EggAPIClient`; create it inside the task that uses it."""

    _pool = httpx.AsyncClient

    async def __aenter__(self) -> AsyncEggAPIClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._files.aclose()

    def _board_lister(self) -> EggAPIClient:
        return board_client(self)

    # ------------------------------------------------------------------ the I/O loop

    async def _run(self, op: _core.Op[T]) -> T:
        """Carry out an operation's actions with awaitable I/O."""
        with _core.Driver(op) as driver:
            for action in driver:
                try:
                    driver.answer(await self._perform(action))
                except Exception as exc:  # thrown into the operation, which decides
                    driver.fail(exc)
        return driver.result

    async def _perform(self, action: _core.Action) -> _core.Answer:
        if isinstance(action, _core.Send):
            if self.limiter is not None:
                await self.limiter.aacquire()
            return await self._http.request(
                action.method, action.path, params=action.params, json=action.json
            )
        if isinstance(action, _core.Sleep):
            await asyncio.sleep(action.seconds)
            return None
        if isinstance(action, _core.BoardPoll):
            return await action.board.apoll(action.task_id, action.delay, action.slack)
        return await action.signals.await_signal(action.task_id, action.delay)

    # ------------------------------------------------------------------ API

    async def generate(
        self, request: GenerateRequest | None = None, **fields: Unpack[GenerateFields]
    ) -> EggAPITask:
        """Create a task (``POST /v1/generate``); never posts twice for one call."""
        return await self._run(self._generate_op(coerce_request(request, fields)))

    async def edit(
        self, image_urls: list[str] | tuple[str, ...], **fields: Unpack[EditFields]
    ) -> EggAPITask:
        return await self.generate(edit_request(image_urls, fields))

    async def get_task(self, task_id: str) -> EggAPITask:
        return await self._run(self._get_task_op(task_id))

    async def list_tasks(self, page: int = 1, per_page: int = 20) -> TaskPage:
        return await self._run(self._list_tasks_op(page, per_page))

    async def probe_clock(self) -> None:
        """Async twin of :meth:`EggAPIClient.probe_clock`."""
        await self._run(self._probe_clock_op())

    async def iter_tasks(
        self, per_page: int = 100, max_pages: int | None = None
    ) -> AsyncIterator[EggAPITask]:
        for page in _core.page_numbers(max_pages):
            result = await self.list_tasks(page, per_page)
            for item in result.items:
                yield item
            if _core.last_page(result, page):
                return

    async def usage(self, page: int = 1, per_page: int = 20) -> UsagePage:
        return await self._run(self._usage_op(page, per_page))

    async def usage_summary(self) -> list[UsageSummaryItem]:
        return await self._run(self._usage_summary_op())

    async def wait_for_task(
        self,
        task: EggAPITask | str,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT,
        poll: PollPolicy | None = None,
        raise_on_failure: bool = True,
        on_poll: Callable[[EggAPITask], None] | None = None,
        signals: _core.TaskSignals | None = None,
    ) -> EggAPITask:
        """Async twin of :meth:`EggAPIClient.wait_for_task`."""
        return await self._run(
            self._wait_op(task, timeout, poll, raise_on_failure, on_poll, signals)
        )

    @asynccontextmanager
    async def stream_output(
        self, url: str
    ) -> AsyncIterator[tuple[AsyncIterator[bytes], DownloadStream]]:
        with fetching(url):
            async with self._files.stream("GET", url) as response:
                stream = DownloadStream.answered(url, response)
                yield stream.achecked(response), stream

    async def download(self, url: str, dest: str | Path | IO[bytes]) -> DownloadResult:
        if isinstance(dest, str | Path):
            with atomic_file(Path(dest)) as fh:
                return await self.download(url, fh)
        async with self.stream_output(url) as (chunks, stream):
            async for chunk in chunks:
                dest.write(chunk)
        assert stream.result is not None
        return stream.result
