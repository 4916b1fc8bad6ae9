"""The local stack: the EggAPI emulator plus a real S3 server (SeaweedFS), with a bucket.

:class:`LocalStack` starts both on free loopback ports, creates the bucket, and gives the
environment the pipeline reads (:meth:`LocalStack.env`): ``EGGAPI_API_KEY``, ``EGGAPI_BASE_URL``,
``EGGAPI_S3_BUCKET`` and the standard ``AWS_*`` variables that
:meth:`~prefect_eggapi.storage.store.S3Settings.from_env` and every AWS tool understand. ``stop()``
stops both processes by PID (SIGTERM, then SIGKILL) and is idempotent. The demo, the tests and
``prefect-eggapi stack`` use this same code.

:func:`serve_stack` is ``prefect-eggapi stack`` (its options: :mod:`prefect_eggapi.cli.stack`):
it prints ``export`` lines, waits for Ctrl-C or SIGTERM, then stops both. No Prefect imports.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from types import FrameType
from typing import Any, Self

from prefect_eggapi.storage import (
    OutputStore,
    S3Settings,
    validate_bucket_name,
    validate_prefix,
)
from prefect_eggapi.testing import local_s3
from prefect_eggapi.testing._process import Stoppable, alive_pids
from prefect_eggapi.testing.emulator import (
    DEFAULT_API_KEY,
    ApiKeyConfig,
    EmulatorConfig,
    EmulatorProcess,
)
from prefect_eggapi.testing.local_s3 import LocalS3

__all__ = [
    "DEFAULT_BUCKET",
    "DEFAULT_PREFIX",
    "LocalStack",
    "LocalStackError",
    "alive_pids",
    "export_lines",
    "serve_stack",
]

DEFAULT_BUCKET = "eggapi-local"
DEFAULT_PREFIX = "eggapi"


class LocalStackError(RuntimeError):
    """The local stack could not start (a component failed; both are stopped again)."""


class LocalStack(Stoppable):
    """EggAPI emulator + SeaweedFS S3 + one bucket, all on 127.0.0.1.

    Usage::

        with LocalStack(pending_seconds=0.3, processing_seconds=1.5) as stack:
            os.environ.update(stack.env())
            ...  # run flows: they find the emulator and the bucket through the environment

    The emulator accepts the public test key
    :data:`~prefect_eggapi.testing.emulator.DEFAULT_API_KEY`
    (not a secret) unless ``api_key`` is given. The S3 credentials are generated per start.
    """

    def __init__(
        self,
        *,
        bucket: str = DEFAULT_BUCKET,
        prefix: str = DEFAULT_PREFIX,
        api_key: str | None = None,
        balance: Decimal | str = "100",
        pending_seconds: float = 1.0,
        processing_seconds: float = 3.0,
        png_noise: bool = False,
        rate_limit_per_second: float | None = 100.0,
        data_dir: str | os.PathLike[str] | None = None,
        emulator_log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.bucket = validate_bucket_name(bucket, field="bucket")
        self.prefix = validate_prefix(prefix, field="prefix")
        self.api_key = api_key or DEFAULT_API_KEY
        self.balance = Decimal(str(balance))
        self.pending_seconds = pending_seconds
        self.processing_seconds = processing_seconds
        self.png_noise = png_noise
        self.rate_limit_per_second = rate_limit_per_second
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.emulator_log_path = Path(emulator_log_path) if emulator_log_path else None
        self.startup_timeout = startup_timeout
        self.emulator: EmulatorProcess | None = None
        self.s3: LocalS3 | None = None
        self.startup_seconds: float | None = None
        self._pids: list[int] = []

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Self:
        """Start both servers in parallel and create the bucket; stops both on any failure."""
        if self.emulator is not None or self.s3 is not None:
            return self
        started = time.monotonic()
        config = EmulatorConfig(
            api_keys={self.api_key: ApiKeyConfig(balance=self.balance, name="local-stack")},
            pending_seconds=self.pending_seconds,
            processing_seconds=self.processing_seconds,
            png_noise=self.png_noise,
            rate_limit_per_second=self.rate_limit_per_second,
        )
        errors: list[BaseException] = []

        def start_s3() -> None:
            try:
                # Through the module: a test replaces local_s3.LocalS3 to simulate a failure.
                self.s3 = local_s3.LocalS3(self.data_dir, startup_timeout=self.startup_timeout)
            except BaseException as exc:
                errors.append(exc)

        # SeaweedFS takes ~1 s to answer; start the emulator meanwhile.
        s3_thread = threading.Thread(target=start_s3, name="local-s3-start", daemon=True)
        s3_thread.start()
        try:
            self.emulator = EmulatorProcess(
                config,
                startup_timeout=self.startup_timeout,
                log_path=self.emulator_log_path,
            ).start()
            self._pids.append(self.emulator.pid)
        except BaseException as exc:
            errors.append(exc)
        s3_thread.join()
        if self.s3 is not None:
            self._pids.append(self.s3.pid)
        try:
            if errors:
                raise LocalStackError(f"local stack failed to start: {errors[0]}") from errors[0]
            assert self.s3 is not None
            self.s3.create_bucket(self.bucket)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        """Stop the emulator and SeaweedFS by PID (SIGTERM, then SIGKILL); idempotent."""
        emulator, self.emulator = self.emulator, None
        s3, self.s3 = self.s3, None
        # SeaweedFS needs ~3.5 s to stop: stop both in parallel.
        threads = []
        if s3 is not None:
            threads.append(threading.Thread(target=s3.stop, name="local-s3-stop"))
        if emulator is not None:
            threads.append(threading.Thread(target=emulator.stop, name="emulator-stop"))
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    @property
    def pids(self) -> list[int]:
        """PIDs of every process this stack started (running or not)."""
        return list(self._pids)

    def alive_pids(self) -> list[int]:
        """The started PIDs that still exist (an empty list after :meth:`stop`)."""
        return alive_pids(self._pids)

    @property
    def running(self) -> bool:
        return bool(
            self.emulator is not None
            and self.emulator.running
            and self.s3 is not None
            and self.s3.running
        )

    # -- use ------------------------------------------------------------------------------------

    def _require(self) -> tuple[EmulatorProcess, LocalS3]:
        if self.emulator is None or self.s3 is None:
            raise LocalStackError("the local stack is not running; call start() first")
        return self.emulator, self.s3

    @property
    def base_url(self) -> str:
        return self._require()[0].base_url

    @property
    def s3_endpoint_url(self) -> str:
        return self._require()[1].endpoint_url

    def env(self) -> dict[str, str]:
        """What the pipeline (and any AWS tool) needs to use this stack.

        Contains the S3 secret key of this local server (generated per start) and the emulator
        key (the public test key, or the ``api_key`` given); print it only where the user asked
        for it.
        """
        emulator, s3 = self._require()
        return {
            "EGGAPI_API_KEY": self.api_key,
            "EGGAPI_BASE_URL": emulator.base_url,
            "EGGAPI_S3_BUCKET": self.bucket,
            "EGGAPI_S3_PREFIX": self.prefix,
            **s3.env(),
        }

    def settings(self, **kwargs: Any) -> S3Settings:
        """:class:`~prefect_eggapi.storage.store.S3Settings` for the stack's bucket."""
        return self._require()[1].settings(self.bucket, self.prefix, **kwargs)

    def output_store(self) -> OutputStore:
        return OutputStore.from_settings(self.settings())

    @contextlib.contextmanager
    def environment(self) -> Iterator[dict[str, str]]:
        """Temporarily export :meth:`env` into ``os.environ`` (restored on exit)."""
        values = self.env()
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield values
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"LocalStack(bucket={self.bucket!r}, {state}, pids={self._pids})"


def export_lines(env: dict[str, str]) -> list[str]:
    return [f"export {k}={shlex.quote(v)}" for k, v in env.items()]


def serve_stack(stack: LocalStack, *, env_file: Path | None = None) -> int:
    """Start ``stack``, print the exports (and write them to ``env_file``, mode 600), wait for
    Ctrl-C or SIGTERM, stop. Returns the exit status (``prefect-eggapi stack``)."""
    stop_event = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_event.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            stack.start()
        except Exception as exc:
            print(f"stack: {exc}", file=sys.stderr)
            return 1
        env = stack.env()
        lines = export_lines(env)
        if env_file is not None:
            fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write("\n".join(lines) + "\n")
        print(
            f"Local stack up in {stack.startup_seconds or 0:.1f} s: EggAPI emulator at "
            f"{stack.base_url} (pid {stack.pids[0]}), S3 at {stack.s3_endpoint_url} "
            f"(SeaweedFS, pid {stack.pids[-1]}), bucket s3://{stack.bucket}",
            flush=True,
        )
        print("# Export this in another shell (local test credentials only):")
        for line in lines:
            print(line)
        print(
            "# then e.g.: python flows/image_pipeline.py   (Ctrl-C here stops the stack)",
            flush=True,
        )
        while not stop_event.wait(0.5):
            if not stack.running:
                print("stack: a component exited unexpectedly; stopping", file=sys.stderr)
                return 1
        print("Stopping the local stack ...", flush=True)
        return 0
    finally:
        stack.stop()
        left = stack.alive_pids()
        if left:  # pragma: no cover - a broken stop()
            print(f"stack: processes still alive: {left}", file=sys.stderr)
        else:
            print("Local stack stopped.", flush=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
