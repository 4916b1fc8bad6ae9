"""The run scope: which logical run a submit belongs to, for ledger keys and budgets.

A flow retry keeps its flow run id, and two runs of one scheduled deployment slot share the slot;
both must reconnect to the tasks already paid for rather than submit again.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from typing import TypeVar

R = TypeVar("R")


def run_scope() -> str:
    """``deployment:<id>:<scheduled start>`` for scheduled runs, else ``flow-run:<id>``.

    Outside any flow run the scope is ``adhoc``: pass an explicit ``key`` there.
    """
    from prefect.runtime import deployment, flow_run

    run_id = flow_run.id
    if not run_id:
        return "adhoc"
    deployment_id = deployment.id
    scheduled = flow_run.scheduled_start_time
    if deployment_id and scheduled is not None:
        return f"deployment:{deployment_id}:{scheduled.isoformat()}"
    return f"flow-run:{run_id}"


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The Prefect run logger inside a run; a plain logger when called outside one."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("prefect_eggapi")


async def in_thread(fn: Callable[[], R]) -> R:
    """Run blocking work (boto3, sqlite, a short POST) off the event loop, keeping the run
    context (loggers, run ids) of the caller."""
    ctx = contextvars.copy_context()
    return await asyncio.to_thread(ctx.run, fn)
