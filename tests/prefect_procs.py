"""Real Prefect processes for the deployment tests: `prefect server start`, the CLI, workers.

Each server gets its own temporary ``PREFECT_HOME`` (SQLite) and a free loopback port; every
process is started in its own session and stopped by its PID and the process group it leads.
Used by ``test_deployments.py`` and ``test_scheduled_runs.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx

from reliability_common import wait_until

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "eggapi-process"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(
    proc: subprocess.Popen[bytes],
    timeout: float = 15.0,
    *,
    first: signal.Signals = signal.SIGTERM,
    leader_only: bool = False,
) -> None:
    """``first`` to the process group this test started (to its leader alone with
    ``leader_only``, e.g. a postmaster's fast shutdown), then SIGKILL of the whole group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if leader_only:
                os.kill(proc.pid, first)
            else:
                os.killpg(proc.pid, first)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    # Children of the group (uvicorn workers, flow-run processes) must be gone as well.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def api_read(method: str, url: str, json: object = None, attempts: int = 4) -> object:
    """One read of the Prefect API, tried again on a transport error.

    A SQLite-backed server on a loaded CI machine can hold a request longer than any sane client
    timeout while a flow run writes (CI saw a 10 s ReadTimeout on ``GET /flow_runs/{id}`` during
    a run); a read has no side effect, so asking again is the honest answer. Non-2xx answers raise.
    """
    for attempt in range(attempts):
        try:
            response = httpx.request(method, url, json=json, timeout=30)
            response.raise_for_status()
            return response.json()
        except httpx.TransportError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def clean_env() -> dict[str, str]:
    """This process's environment without any PREFECT_*, EGGAPI_* or AWS_* variable."""
    skip = ("PREFECT_", "EGGAPI_", "AWS_")
    return {k: v for k, v in os.environ.items() if not k.startswith(skip)}


@contextlib.contextmanager
def prefect_server(
    home: Path, server_env: dict[str, str] | None = None, startup_timeout: float = 90
) -> Iterator[dict[str, str]]:
    """Run `prefect server start` (SQLite under ``home``); yield the env a client needs.

    ``server_env`` goes to the server process only (e.g. scheduler loop settings).
    """
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = clean_env()
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_URL=api,
        PREFECT_CLI_COLORS="false",
        PREFECT_CLI_WRAP_LINES="false",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
        COLUMNS="200",
    )
    log_path = home / "server.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**env, **(server_env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(log_path.read_text(errors="replace")[-3000:])
        try:
            return httpx.get(f"{api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, startup_timeout, "prefect server start")
        yield env
    finally:
        stop(proc)
        log.close()


def cli(env: dict[str, str], *args: str, timeout: float = 120, cwd: Path = REPO) -> str:
    """Run `prefect ARGS` to completion; its output (asserts exit status 0)."""
    done = subprocess.run(
        [str(BIN / "prefect"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{out}"
    return out


def start_worker(
    env: dict[str, str], log_path: Path, cwd: Path, *args: str
) -> subprocess.Popen[bytes]:
    """`prefect worker start --pool eggapi-process ARGS` in its own session, output to a file."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", POOL, *args],
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children first level first), from /proc.

    A process worker starts each flow run as a child that may lead its own session, so killing
    the worker's process group alone would leave the flow runs running: a test that plays "the
    machine died" kills these too, by PID."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen[bytes]) -> list[int]:
    """SIGKILL a process started here and everything below it, by PID; reap it. Returns the
    PIDs killed below it (the worker's flow-run processes, for a worker)."""
    below = descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    for pid in below:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    return below
