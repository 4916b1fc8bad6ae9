"""Runs the emulator in the foreground (:func:`serve`) or a subprocess (:class:`EmulatorProcess`).

:class:`EmulatorProcess` binds a free port on 127.0.0.1 in the parent, hands the listening socket
to a ``python -m prefect_eggapi.testing.emulator._child`` subprocess (no port race), passes
the config as
JSON in the ``EGGAPI_EMULATOR_CONFIG`` environment variable (never on the command line, where
``ps`` would show API keys), and waits until ``/_emulator/health`` answers. The child exits by
itself if its parent dies. :class:`EmulatorAdmin` scripts any running emulator over HTTP.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from .config import EmulatorConfig, FaultRule, key_id

CONFIG_ENV = "EGGAPI_EMULATOR_CONFIG"
WEBHOOK_SECRET_ENV = "EGGAPI_EMULATOR_WEBHOOK_SECRET"
_CUT_MESSAGE = "ASGI callable returned without completing response."


# --------------------------------------------------------------------------- foreground serving


def check_loopback(host: str) -> str:
    """Return ``host`` if it is a loopback address (or ``localhost``); refuse anything else."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--host must be a loopback IP address, got {host!r}") from None
    if not address.is_loopback:
        raise ValueError(
            f"refusing to bind {host}: the emulator only listens on loopback (127.0.0.1 or ::1)"
        )
    return host


def url_for(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def bind_socket(host: str, port: int) -> socket.socket:
    host = check_loopback(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class _DropCutMessage(logging.Filter):
    """Deliberate connection cuts (fault injection) are logged by the app, not as errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _CUT_MESSAGE


def serve(
    config: EmulatorConfig,
    sock: socket.socket,
    *,
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Serve the emulator on an already bound loopback socket until SIGINT/SIGTERM."""
    import uvicorn

    from .app import create_app

    host, port = sock.getsockname()[:2]
    secret = os.environ.pop(WEBHOOK_SECRET_ENV, None)
    if config.webhook_secret is None and secret:
        config = config.model_copy(update={"webhook_secret": secret})
    app = create_app(config)
    app.state.emulator.server_base_url = url_for(host, port)
    uv_config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=2,
        lifespan="on",
    )
    server = uvicorn.Server(uv_config)
    logging.getLogger("uvicorn.error").addFilter(_DropCutMessage())
    emulator_logger = logging.getLogger("prefect_eggapi.testing.emulator")
    emulator_logger.setLevel(log_level.upper())
    if not emulator_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        emulator_logger.addHandler(handler)
        emulator_logger.propagate = False
    server.run(sockets=[sock])


def _watch_parent(parent_pid: int) -> None:
    """Stop this process when the process that started it is gone (no orphaned emulators)."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5.0)
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def child_main(argv: list[str] | None = None) -> int:
    """Entry point of the subprocess started by :class:`EmulatorProcess`."""
    import argparse

    parser = argparse.ArgumentParser(prog="prefect_eggapi.testing.emulator._child")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--access-log", action="store_true")
    args = parser.parse_args(argv)
    config = EmulatorConfig.model_validate_json(os.environ.get(CONFIG_ENV) or "{}")
    os.environ.pop(CONFIG_ENV, None)
    sock = socket.socket(fileno=args.fd)
    if args.parent_pid:
        _watch_parent(args.parent_pid)
    serve(config, sock, log_level=args.log_level, access_log=args.access_log)
    return 0


# --------------------------------------------------------------------------- admin client


class EmulatorAdmin:
    """Scripts a running emulator through its ``/_emulator/`` admin API."""

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self._base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._client: httpx.Client | None = None

    @property
    def base_url(self) -> str:
        return self._base_url

    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(
                base_url=self.base_url, timeout=self._timeout, trust_env=False
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        response = self._http().request(
            method, f"/_emulator{path}", json=body if body is not None else None
        )
        payload = response.json()
        if response.status_code >= 400 or payload.get("error"):
            error = payload.get("error") or {}
            raise RuntimeError(
                f"emulator admin {method} {path} -> {response.status_code} "
                f"{error.get('code')}: {error.get('message')}"
            )
        return payload["data"]

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/health")
        return result

    def get_config(self) -> dict[str, Any]:
        """The live config, with API keys masked."""
        result: dict[str, Any] = self._call("GET", "/config")
        return result

    def set_config(self, patch: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        """Patch the live config, e.g. ``set_config(manual=True, rate_limit_per_second=5)``.

        ``api_keys`` merges per key: ``set_config(api_keys={key: {"balance": "0.01"}})``.
        """
        body = {**(patch or {}), **fields}
        result: dict[str, Any] = self._call("PATCH", "/config", _jsonable(body))
        return result

    def add_fault(self, kind: str | None = None, **fields: Any) -> dict[str, Any]:
        """Add one fault rule, e.g. ``add_fault("error_after_create", status=502, times=1)``."""
        rule = FaultRule.model_validate({"kind": kind, **fields} if kind else fields)
        added: list[dict[str, Any]] = self._call(
            "POST", "/faults", rule.model_dump(mode="json", exclude_none=True)
        )
        return added[0]

    def add_faults(self, rules: list[dict[str, Any] | FaultRule]) -> list[dict[str, Any]]:
        body = [
            r.model_dump(mode="json", exclude_none=True) if isinstance(r, FaultRule) else r
            for r in rules
        ]
        result: list[dict[str, Any]] = self._call("POST", "/faults", body)
        return result

    def faults(self) -> list[dict[str, Any]]:
        """Rules with their ``seen``/``fired``/``exhausted`` counters."""
        result: list[dict[str, Any]] = self._call("GET", "/faults")
        return result

    def clear_faults(self) -> None:
        self._call("DELETE", "/faults")

    def audit(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/audit")
        return result

    def webhook_deliveries(self, task_id: str | None = None) -> list[dict[str, Any]]:
        """Audit records of webhook attempts (and skipped or lost deliveries), oldest first."""
        records: list[dict[str, Any]] = self.audit()["webhook_deliveries"]
        return [r for r in records if task_id is None or r["task_id"] == task_id]

    def created_tasks(self, api_key: str | None = None) -> list[dict[str, Any]]:
        """Audit records of every created (billable) task, optionally of one key only."""
        tasks: list[dict[str, Any]] = self.audit()["tasks"]
        if api_key is None:
            return tasks
        wanted = key_id(api_key)
        return [t for t in tasks if t["key_id"] == wanted]

    def request_count(self, api_key: str | None, endpoint: str) -> int:
        """Requests seen for ``endpoint`` with ``api_key`` (``None``: unauthenticated)."""
        who = key_id(api_key) if api_key else "anonymous"
        return int(self.audit()["requests"].get(who, {}).get(endpoint, 0))

    def balance(self, api_key: str) -> Decimal:
        return Decimal(self.audit()["balances"][key_id(api_key)]["balance"])

    def reset(self, config: EmulatorConfig | None = None) -> dict[str, Any]:
        """Forget tasks, audit and faults; back to the startup config (or ``config``)."""
        body = {"config": config.model_dump(mode="json")} if config is not None else None
        result: dict[str, Any] = self._call("POST", "/reset", body)
        return result

    def tasks(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/tasks")
        return result

    def task(self, task_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/tasks/{task_id}")
        return result

    def advance(self, task_id: str) -> dict[str, Any]:
        """pending -> processing, or processing -> its planned end (completed or failed)."""
        result: dict[str, Any] = self._call("POST", f"/tasks/{task_id}/advance")
        return result

    def complete(self, task_id: str, num_images: int | None = None) -> dict[str, Any]:
        body = {"num_images": num_images} if num_images is not None else None
        result: dict[str, Any] = self._call("POST", f"/tasks/{task_id}/complete", body)
        return result

    def fail(self, task_id: str, error: str | None = None) -> dict[str, Any]:
        body = {"error": error} if error is not None else None
        result: dict[str, Any] = self._call("POST", f"/tasks/{task_id}/fail", body)
        return result


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------- subprocess


class EmulatorProcess(EmulatorAdmin):
    """The emulator in a subprocess on a free 127.0.0.1 port.

    Usage::

        with EmulatorProcess(EmulatorConfig(api_keys={"egg_sk_x": ApiKeyConfig()})) as emu:
            httpx.post(f"{emu.base_url}/v1/generate", ...)
            emu.add_fault("error_after_create")
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        host: str = "127.0.0.1",
        startup_timeout: float = 20.0,
        log_level: str = "warning",
        log_path: str | Path | None = None,
    ) -> None:
        super().__init__("http://unstarted.invalid")
        self.config = config or EmulatorConfig()
        self.host = check_loopback(host)
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        self._log_path = Path(log_path) if log_path else None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def base_url(self) -> str:
        if self._process is None:
            raise RuntimeError("emulator not started")
        return self._base_url

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("emulator not started")
        return self._process.pid

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_text(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")

    def start(self) -> EmulatorProcess:
        if self._process is not None:
            return self
        sock = bind_socket(self.host, 0)
        port = sock.getsockname()[1]
        self._base_url = url_for(self.host, port)
        if self._log_path is None:
            handle, name = tempfile.mkstemp(prefix="eggapi-emulator-", suffix=".log")
            os.close(handle)
            self._log_path = Path(name)
        self._log_file = self._log_path.open("ab")
        env = {**os.environ, CONFIG_ENV: self.config.model_dump_json()}
        fd = sock.fileno()
        command = [
            sys.executable,
            "-m",
            "prefect_eggapi.testing.emulator._child",
            "--fd",
            str(fd),
            "--parent-pid",
            str(os.getpid()),
            "--log-level",
            self.log_level,
        ]
        try:
            self._process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                pass_fds=(fd,),
                start_new_session=True,
            )
        finally:
            sock.close()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                assert self._process is not None
                if self._process.poll() is not None:
                    code = self._process.returncode
                    raise RuntimeError(f"emulator exited ({code}):\n{self.log_text()[-4000:]}")
                try:
                    if client.get(f"{self._base_url}/_emulator/health").status_code == 200:
                        return
                except httpx.HTTPError as exc:
                    last_error = exc
                time.sleep(0.05)
        raise RuntimeError(
            f"emulator not healthy after {self.startup_timeout}s ({last_error!r}):\n"
            f"{self.log_text()[-4000:]}"
        )

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; always reaps the child."""
        self.close()
        process = self._process
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGKILL)
                    process.wait()
            self._process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        process = getattr(self, "_process", None)
        if process is not None and process.poll() is None:
            with contextlib.suppress(Exception):
                process.kill()
                process.wait(1)
