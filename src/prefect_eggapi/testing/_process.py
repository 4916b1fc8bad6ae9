"""What every server the testing kit starts shares: stop by PID, check PIDs, ``with`` support.

The emulator subprocess, SeaweedFS and the local stack stop the same way (SIGTERM, a grace
period, SIGKILL, always reaped) and are context managers the same way (``with`` starts, exit
stops), so that lives here once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from types import TracebackType
from typing import Self

__all__ = ["ChildProcess", "Stoppable", "alive_pids", "terminate"]


def terminate(process: subprocess.Popen[bytes], timeout: float, kill_wait: float | None) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL and wait ``kill_wait`` (None: as
    long as it takes). By PID, never by name; a process already gone is fine."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(kill_wait)


def alive_pids(pids: list[int]) -> list[int]:
    """The PIDs that still run; an unreaped zombie counts as gone."""
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        alive.append(pid)
    return alive


class Stoppable:
    """``with thing:`` starts it (:meth:`start`, a no-op for what starts on construction) and
    stops it on exit, whatever happened inside."""

    def start(self) -> Self:
        return self

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ChildProcess(Stoppable):
    """A :class:`Stoppable` that is one subprocess (``_process``, None until started)."""

    _process: subprocess.Popen[bytes] | None = None

    def _not_started(self) -> Exception:
        return RuntimeError(f"{type(self).__name__} was never started")

    @property
    def pid(self) -> int:
        if self._process is None:
            raise self._not_started()
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None
