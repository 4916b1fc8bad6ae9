"""One signature for a step's sync task and its async twin.

Every step is a pair (``submit_generation`` / ``asubmit_generation``, ...). Writing the
parameters of both by hand let them drift, so each step writes them once, as a frozen dataclass
whose fields are the task's parameters (``KW_ONLY`` marks the keyword-only ones), and
:func:`twin_tasks` builds both tasks from it:

* Prefect binds calls, ``.submit`` and ``.map`` against the dataclass's signature (given to the
  task function as ``__signature__``), and task run names read those bound ``parameters``;
* mypy checks every call against the same fields, through ``ParamSpec``;
* the implementation takes the one arguments object, so no step passes seven positional
  arguments along.

The async twin runs the sync implementation in a worker thread unless the step has an async
implementation of its own (a wait, which must not hold a thread for minutes).
"""

from __future__ import annotations

import concurrent.futures
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import ParamSpec, TypedDict, TypeVar, Unpack

from prefect.cache_policies import CachePolicy
from prefect.tasks import RetryConditionCallable, Task, TaskRunNameValueOrCallable

from prefect_eggapi.tasks.runtime import in_thread, io_pool

__all__ = ["StepOptions", "threaded", "twin_tasks"]

P = ParamSpec("P")
A = TypeVar("A")
R = TypeVar("R")


class StepOptions(TypedDict, total=False):
    """The Prefect task options the steps set (both tasks of a pair get the same)."""

    cache_policy: CachePolicy
    retries: int
    retry_delay_seconds: list[float]
    retry_condition_fn: RetryConditionCallable
    task_run_name: TaskRunNameValueOrCallable


def threaded(
    run: Callable[[A], R],
    pool: Callable[[], concurrent.futures.ThreadPoolExecutor] = io_pool,
) -> Callable[[A], Awaitable[R]]:
    """``run`` as a coroutine function that runs it in ``pool`` (keeping the run context)."""

    async def in_pool(args: A) -> R:
        return await in_thread(partial(run, args), pool)

    return in_pool


def _present(
    fn: Callable[..., object],
    params: Callable[..., object],
    run: Callable[..., object],
    name: str,
    doc: str,
) -> None:
    """Name ``fn`` and give it the parameters of ``params`` (what Prefect and ``help`` read)."""
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    fn.__module__ = params.__module__
    # The parameters of the record, the return of the implementation (not ``__init__``'s None).
    returns = inspect.signature(run).return_annotation
    fn.__dict__["__signature__"] = inspect.signature(params).replace(return_annotation=returns)


def twin_tasks(
    params: Callable[P, A],
    run: Callable[[A], R],
    arun: Callable[[A], Awaitable[R]] | None = None,
    *,
    name: str,
    names: tuple[str, str],
    docs: tuple[str, str],
    **options: Unpack[StepOptions],
) -> tuple[Task[P, R], Task[P, Coroutine[None, None, R]]]:
    """The sync and the async task of one step, both taking the parameters of ``params``.

    Args:
        params: the arguments record (a frozen dataclass); its signature is the tasks'.
        run: the sync implementation, given the record.
        arun: the async implementation; default: ``run`` in a worker thread.
        name: the name both tasks register under (``eggapi-submit-generation``...).
        names: the Python names of the sync and the async task function.
        docs: their docstrings (what the UI and ``help`` show).
        options: the other Prefect task options, shared by both.
    """
    arun = arun or threaded(run)

    def sync_step(*args: P.args, **kwargs: P.kwargs) -> R:
        return run(params(*args, **kwargs))

    async def async_step(*args: P.args, **kwargs: P.kwargs) -> R:
        return await arun(params(*args, **kwargs))

    _present(sync_step, params, run, names[0], docs[0])
    _present(async_step, params, run, names[1], docs[1])
    return Task(sync_step, name=name, **options), Task(async_step, name=name, **options)
