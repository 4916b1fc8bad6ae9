"""One ephemeral Prefect API for the whole session (starting one costs ~8 s)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def ledger_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh default ledger per test (the tasks read EGGAPI_LEDGER_DIR)."""
    path = tmp_path / "ledger"
    monkeypatch.setenv("EGGAPI_LEDGER_DIR", str(path))
    return path


@pytest.fixture
def eggapi_env(emulator, emulator_api_key: str, ledger_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """Point EggAPICredentials() at the session emulator through the documented variables."""
    monkeypatch.setenv("EGGAPI_API_KEY", emulator_api_key)
    monkeypatch.setenv("EGGAPI_BASE_URL", emulator.base_url)
    return emulator
