"""Runs the emulator in the foreground (:func:`serve`) or a subprocess (:class:`EmulatorProcess`).

:class:`EmulatorProcess` binds a free port on 127.0.0.1 in the parent, hands the listening socket
to a ``python -m prefect_eggapi.testing.emulator._child`` subprocess (no port race), passes
the config as
JSON in the ``EGGAPI_EMULATOR_CONFIG`` environment variable (never on the command line, where
``ps`` would show API keys), and waits until ``/_emulator/health`` answers. The child exits by
itself if its parent dies. :class:`~.admin.EmulatorAdmin` scripts any running emulator over HTTP.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self

import httpx
import uvicorn

from prefect_eggapi.testing._process import ChildProcess, terminate

from .admin import EmulatorAdmin
from .app import create_app
from .config import EmulatorConfig

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


@dataclass(frozen=True)
class ChildOptions:
    """How :class:`EmulatorProcess` runs its child, on the child's command line as
    ``--name value`` pairs: a socket fd, a PID and log settings, never a secret (the config,
    keys included, travels in :data:`CONFIG_ENV`)."""

    fd: int
    parent_pid: int = 0
    log_level: str = "warning"
    access_log: bool = False

    def to_argv(self) -> list[str]:
        return [
            "--fd",
            str(self.fd),
            "--parent-pid",
            str(self.parent_pid),
            "--log-level",
            self.log_level,
            "--access-log",
            "1" if self.access_log else "0",
        ]

    @classmethod
    def from_argv(cls, argv: list[str]) -> ChildOptions:
        """The inverse of :meth:`to_argv` (a ValueError names what is wrong)."""
        if len(argv) % 2:
            raise ValueError(f"expected --name value pairs, got {argv!r}")
        given = dict(zip(argv[::2], argv[1::2], strict=True))
        unknown = set(given) - {"--fd", "--parent-pid", "--log-level", "--access-log"}
        if unknown or "--fd" not in given:
            raise ValueError(
                f"expected --fd N [--parent-pid N --log-level L --access-log 0|1], got {argv!r}"
            )
        return cls(
            fd=int(given["--fd"]),
            parent_pid=int(given.get("--parent-pid", "0")),
            log_level=given.get("--log-level", "warning"),
            access_log=given.get("--access-log", "0") == "1",
        )


def child_main(argv: list[str] | None = None) -> int:
    """Entry point of the subprocess started by :class:`EmulatorProcess`."""
    options = ChildOptions.from_argv(sys.argv[1:] if argv is None else argv)
    config = EmulatorConfig.model_validate_json(os.environ.get(CONFIG_ENV) or "{}")
    os.environ.pop(CONFIG_ENV, None)
    sock = socket.socket(fileno=options.fd)
    if options.parent_pid:
        _watch_parent(options.parent_pid)
    serve(config, sock, log_level=options.log_level, access_log=options.access_log)
    return 0


# --------------------------------------------------------------------------- subprocess


class EmulatorProcess(EmulatorAdmin, ChildProcess):
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
        self._log_file: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        if self._process is None:
            raise self._not_started()
        return self._base_url

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def log_text(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")

    def start(self) -> Self:
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
        options = ChildOptions(fd=fd, parent_pid=os.getpid(), log_level=self.log_level)
        command = [sys.executable, "-m", "prefect_eggapi.testing.emulator._child"]
        command += options.to_argv()
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
        if self._process is not None:
            terminate(self._process, timeout, None)
            self._process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __del__(self) -> None:
        process = getattr(self, "_process", None)
        if process is not None and process.poll() is None:
            with contextlib.suppress(Exception):
                process.kill()
                process.wait(1)
