"""Subprocess entry point used by :class:`~.server.EmulatorProcess`."""

from __future__ import annotations

from prefect_eggapi.testing.emulator.server import child_main

if __name__ == "__main__":
    raise SystemExit(child_main())
