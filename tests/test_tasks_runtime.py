"""The I/O pool of async steps: made on first use, owned by the process registry."""

from __future__ import annotations

import asyncio
import contextvars
import subprocess
import sys
import threading

from prefect_eggapi.client.registry import reset_process_state
from prefect_eggapi.tasks.runtime import (
    IO_THREADS,
    SUBMIT_THREADS,
    in_thread,
    io_pool,
    submit_pool,
)

_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="none")


def test_importing_the_tasks_makes_no_pool():
    code = (
        "import gc, concurrent.futures as cf\n"
        "import prefect_eggapi.tasks\n"
        "pools = [o for o in gc.get_objects() if isinstance(o, cf.ThreadPoolExecutor)\n"
        "         and o._thread_name_prefix.startswith('eggapi-')]\n"
        "print(len(pools))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


def test_one_pool_of_each_kind_per_process_until_reset():
    first, submits = io_pool(), submit_pool()
    assert io_pool() is first and first._max_workers == IO_THREADS
    assert submit_pool() is submits and submits is not first
    assert submits._max_workers == SUBMIT_THREADS
    reset_process_state()
    second = io_pool()
    assert second is not first and io_pool() is second and submit_pool() is not submits


def test_in_thread_runs_in_the_pool_with_the_callers_context():
    def where() -> tuple[str, str]:
        return threading.current_thread().name, _CALLER.get()

    async def main() -> tuple[str, str]:
        _CALLER.set("the task run")
        return await in_thread(where)

    name, caller = asyncio.run(main())
    assert name.startswith("eggapi-io") and caller == "the task run"


def test_quiet_steps_keep_warnings_only_also_in_worker_threads(caplog):
    import logging

    from prefect_eggapi.tasks.runtime import quiet_steps, run_logger

    caplog.set_level(logging.DEBUG, logger="prefect_eggapi")

    def speak(tag: str) -> None:
        run_logger().info("info %s", tag)
        run_logger().warning("warning %s", tag)

    async def steps() -> None:
        speak("loud")
        with quiet_steps():
            speak("quiet")
            await in_thread(lambda: speak("quiet-thread"))
        speak("loud-again")

    asyncio.run(steps())
    assert [r.getMessage() for r in caplog.records] == [
        "info loud",
        "warning loud",
        "warning quiet",
        "warning quiet-thread",
        "info loud-again",
        "warning loud-again",
    ]
