"""A throwaway PostgreSQL cluster: its own data directory, a free loopback port, its PID.

Prefect on PostgreSQL is how users scale past one machine, so the multi-worker test and the
sharded benchmark row run the real server on it rather than on SQLite. Nothing here touches a
system cluster: ``initdb`` makes a fresh one in a temporary directory, ``postgres`` runs in the
foreground as this process's child (so its PID is known and nothing is left behind), listening
on 127.0.0.1 only and on a Unix socket inside that directory. PostgreSQL refuses to run as root,
so under root the server runs as ``nobody`` (``setpriv``, which execs in place: the PID we hold
is the postmaster's) and the directory is owned by that user. fsync is off: the cluster lives
for one run.

Binaries: Debian's ``postgresql`` package (``/usr/lib/postgresql/{15,...}/bin``) or
``$EGGAPI_PG_BINDIR``; without them ``missing_reason`` says why (the tests skip with it;
``.ci/run`` installs the package where it is missing).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prefect_eggapi.testing.asgi import free_port

__all__ = ["PgCluster", "find_bindir", "missing_reason", "pg_cluster"]

PREFERRED_MAJOR = "15"
DATABASE = "prefect"


def find_bindir() -> Path | None:
    """The directory with ``initdb`` and ``postgres``: $EGGAPI_PG_BINDIR, else Debian's layout
    (version 15 first, else the newest installed)."""
    override = os.environ.get("EGGAPI_PG_BINDIR")
    candidates = [Path(override)] if override else []
    base = Path("/usr/lib/postgresql")
    if base.is_dir():
        versions = sorted(
            (p for p in base.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
        )
        preferred = [p for p in versions if p.name == PREFERRED_MAJOR]
        others = [p for p in reversed(versions) if p.name != PREFERRED_MAJOR]
        candidates += [p / "bin" for p in preferred + others]
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in ("initdb", "postgres")):
            return bindir
    return None


def missing_reason() -> str | None:
    """Why a PostgreSQL test cannot run here, or None when it can."""
    if find_bindir() is None:
        return (
            "PostgreSQL server binaries not found (initdb/postgres in /usr/lib/postgresql/*/bin "
            "or $EGGAPI_PG_BINDIR): apt-get install postgresql (.ci/run does)"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            return "running as root and there is no 'nobody' user to run PostgreSQL as"
        if shutil.which("setpriv") is None:
            return "running as root and setpriv (util-linux) is missing to drop to 'nobody'"
    return None


@dataclass
class PgCluster:
    """A running cluster: where it listens, its postmaster PID, and the URL Prefect takes."""

    bindir: Path
    root: Path
    port: int
    pid: int
    database: str
    user: str = "postgres"

    @property
    def asyncpg_url(self) -> str:
        """For ``PREFECT_API_DATABASE_CONNECTION_URL`` (trust auth on loopback: no password)."""
        return f"postgresql+asyncpg://{self.user}@127.0.0.1:{self.port}/{self.database}"


def _as_owner(argv: list[str]) -> list[str]:
    """Run ``argv`` as ``nobody`` when we are root (PostgreSQL refuses root), else as is."""
    if os.geteuid() != 0:
        return argv
    user = pwd.getpwnam("nobody")
    return [
        "setpriv",
        f"--reuid={user.pw_uid}",
        f"--regid={user.pw_gid}",
        "--clear-groups",
        "--",
        *argv,
    ]


def _chown_tree(path: Path) -> None:
    if os.geteuid() != 0:
        return
    user = pwd.getpwnam("nobody")
    os.chown(path, user.pw_uid, user.pw_gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid)


def _tool(what: str, argv: list[str], timeout: float) -> None:
    """Run one of the cluster's command-line tools to completion; RuntimeError with its output
    when it fails."""
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stdout}\n{done.stderr}")


def _stop_postmaster(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Fast shutdown: SIGINT to the postmaster alone (it stops its backends itself), then
    SIGKILL of its process group if it is still there after ``timeout`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    # Backends left behind by a postmaster that did not stop in time.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


@contextlib.contextmanager
def pg_cluster(database: str = DATABASE, startup_timeout: float = 60.0) -> Iterator[PgCluster]:
    """Start a fresh cluster, create ``database``, yield it; stop it and delete it at the end
    (on failure too). Raise RuntimeError with the server log if it does not come up."""
    reason = missing_reason()
    if reason is not None:
        raise RuntimeError(reason)
    bindir = find_bindir()
    assert bindir is not None
    # Not under pytest's tmp_path: its parents are mode 0700 root, which 'nobody' cannot enter.
    root = Path(tempfile.mkdtemp(prefix="eggapi-pg-"))
    proc: subprocess.Popen[bytes] | None = None
    log_file = None
    try:
        data, sock = root / "data", root / "sock"
        sock.mkdir()
        _chown_tree(root)
        _tool(
            "initdb",
            _as_owner(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ]
            ),
            timeout=120,
        )
        port = free_port()
        log_path = root / "postgres.log"
        log_file = log_path.open("wb")
        proc = subprocess.Popen(
            _as_owner(
                [
                    str(bindir / "postgres"),
                    "-D",
                    str(data),
                    "-p",
                    str(port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    f"unix_socket_directories={sock}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                ]
            ),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        cluster = PgCluster(bindir, root, port, proc.pid, database)
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with {proc.returncode}:\n"
                    + log_path.read_text(errors="replace")[-3000:]
                )
            ready = subprocess.run(
                [str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)],
                timeout=10,
                stdin=subprocess.DEVNULL,
            )
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"postgres not ready after {startup_timeout:.0f} s:\n"
                    + log_path.read_text(errors="replace")[-3000:]
                )
            time.sleep(0.2)
        _tool(
            "createdb",
            [
                str(bindir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                database,
            ],
            timeout=60,
        )
        yield cluster
    finally:
        if proc is not None:
            _stop_postmaster(proc)
        if log_file is not None:
            log_file.close()
        shutil.rmtree(root, ignore_errors=True)
