"""The run a step belongs to, its logger, and the threads its blocking work runs in.

The run scope says which logical run a submit belongs to, for ledger keys and budgets: a flow
retry keeps its flow run id, and two runs of one scheduled deployment slot share the slot; both
must reconnect to the tasks already paid for rather than submit again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.exceptions import MissingContextError
from prefect.runtime import deployment, flow_run

from prefect_eggapi.client.registry import Registry

__all__ = [
    "IO_THREADS",
    "SUBMIT_THREADS",
    "flow_run_id",
    "in_thread",
    "io_pool",
    "quiet_steps",
    "run_logger",
    "run_scope",
    "submit_pool",
]

R = TypeVar("R")


def flow_run_id() -> str | None:
    """The current flow run's id (in this process), or None outside a flow run."""
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx is not None and ctx.flow_run is not None else None


def run_scope() -> str:
    """``deployment:<id>:<scheduled start>`` for scheduled runs, else ``flow-run:<id>``.

    Outside any flow run the scope is ``adhoc``: pass an explicit ``key`` there.
    """
    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None:
        # In-process: the run is in memory (prefect.runtime would ask the API every time).
        run = ctx.flow_run
        if run.deployment_id and run.expected_start_time is not None:
            return f"deployment:{run.deployment_id}:{run.expected_start_time.isoformat()}"
        return f"flow-run:{run.id}"
    run_id = flow_run.id
    if not run_id:
        return "adhoc"
    deployment_id = deployment.id
    scheduled = flow_run.scheduled_start_time
    if deployment_id and scheduled is not None:
        return f"deployment:{deployment_id}:{scheduled.isoformat()}"
    return f"flow-run:{run_id}"


_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("eggapi_quiet_steps", default=False)


class _WarningsOnly(logging.LoggerAdapter[logging.Logger]):
    """A run logger that keeps warnings and errors only (same logger, same run context)."""

    def isEnabledFor(self, level: int) -> bool:
        return level >= logging.WARNING and super().isEnabledFor(level)


@contextmanager
def quiet_steps() -> Iterator[None]:
    """The steps called in this context log warnings and errors only.

    For a caller that runs many generations in one task run and logs one line per item itself:
    at thousands of items the steps' INFO lines (submitted, status changes, stored) were most
    of the run's log rows and a fifth of the flow's CPU per image. Worker threads started with
    :func:`in_thread` inherit it (they run in a copy of the caller's context).
    """
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The Prefect run logger inside a run; a plain logger when called outside one."""
    try:
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = get_run_logger()
    except MissingContextError:
        logger = logging.getLogger("prefect_eggapi")
    if not _QUIET.get():
        return logger
    if isinstance(logger, logging.LoggerAdapter):
        return _WarningsOnly(logger.logger, logger.extra)
    return _WarningsOnly(logger, {})


#: Threads for the blocking transfers of async steps (downloads, S3, status objects, ledger
#: writes), in this process. asyncio's default pool (``cpu + 4``) throttled a batch's S3 calls to
#: six at a time; 64 let ~50 threads contend for the GIL, and the thread holding the submit lane
#: (one POST of a model at a time) waited for it at each SQLite or socket call: its hold took
#: 56 ms for 5 ms of CPU, and bounded the batch's wall time
#: (bench/profiles/lane-and-threads-2026-12-02.txt).
IO_THREADS = 16
#: Threads for submits of async steps. A submit waits for its lane in its thread, blocked rather
#: than running, so many of them cost no CPU; they get a pool of their own so that waiting
#: submits never hold the threads the transfers of finished tasks need.
SUBMIT_THREADS = 64

_POOLS: Registry[str, concurrent.futures.ThreadPoolExecutor] = Registry(
    "the thread pools of async steps' blocking work"
)


def _pool(kind: str, threads: int) -> concurrent.futures.ThreadPoolExecutor:
    return _POOLS.get(
        kind,
        lambda: concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix=f"eggapi-{kind}"
        ),
    )


def io_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The process's pool for transfers, made on first use (importing the package starts no
    threads).

    ``reset_process_state()`` forgets it (and :func:`submit_pool`): work already in it
    finishes, the next call makes a new one, and the old one's idle threads exit with the process.
    """
    return _pool("io", IO_THREADS)


def submit_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The process's pool for submits (see :data:`SUBMIT_THREADS`)."""
    return _pool("submit", SUBMIT_THREADS)


async def in_thread(
    fn: Callable[[], R],
    pool: Callable[[], concurrent.futures.ThreadPoolExecutor] = io_pool,
) -> R:
    """Run blocking work (boto3, sqlite, a short POST) off the event loop, in ``pool``, keeping
    the run context (loggers, run ids) of the caller."""
    ctx = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(pool(), ctx.run, fn)
