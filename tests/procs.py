"""Checks, independent of the code under test, that a process is really gone."""

from __future__ import annotations

import os


def gone(pid: int) -> bool:
    """No such process, or a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
