"""``python -m prefect_eggapi.testing.emulator [options]``: run the emulator in the foreground."""

from __future__ import annotations

from prefect_eggapi.cli.emulator import main

if __name__ == "__main__":
    raise SystemExit(main())
