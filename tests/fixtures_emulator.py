"""Fixtures for the local EggAPI emulator, running as a real server in a subprocess.

- ``emulator_process`` (session): one emulator for the whole session, stopped by PID at the end.
- ``emulator`` (function): the same process, reset through ``POST /_emulator/reset`` first, so
  each test starts with no tasks, no faults, a fresh audit and the startup config. It has
  ``.base_url`` and the admin helpers (``add_fault``, ``audit``, ``set_config``, ``advance`` ...).
- ``emulator_api_key`` / ``emulator_other_api_key`` (session): two accepted keys, $1000 each.
- ``emulator_client`` (function): an ``httpx.Client`` on the emulator with the first key.

Timings are short (pending 0.05 s, processing 0.2 s); use ``emulator.set_config(manual=True)``
for fully deterministic lifecycles.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest

from prefect_eggapi.testing.emulator import ApiKeyConfig, EmulatorConfig, EmulatorProcess

EMULATOR_API_KEY = "egg_sk_test_emulator_key_0001"
EMULATOR_OTHER_API_KEY = "egg_sk_test_emulator_key_0002"


def emulator_test_config() -> EmulatorConfig:
    """The config the session emulator starts with (and every reset returns to)."""
    return EmulatorConfig(
        api_keys={
            EMULATOR_API_KEY: ApiKeyConfig(balance=Decimal("1000"), name="test-key-1"),
            EMULATOR_OTHER_API_KEY: ApiKeyConfig(balance=Decimal("1000"), name="test-key-2"),
        },
        pending_seconds=0.05,
        processing_seconds=0.2,
        rate_limit_per_second=100,
    )


@pytest.fixture(scope="session")
def emulator_api_key() -> str:
    return EMULATOR_API_KEY


@pytest.fixture(scope="session")
def emulator_other_api_key() -> str:
    return EMULATOR_OTHER_API_KEY


@pytest.fixture(scope="session")
def emulator_process() -> Iterator[EmulatorProcess]:
    process = EmulatorProcess(emulator_test_config()).start()
    pid = process.pid
    try:
        yield process
    finally:
        process.stop()
        # The server must really be gone, not orphaned.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pass
        else:  # pragma: no cover - a leak
            raise AssertionError(f"emulator pid {pid} still alive after stop()")


@pytest.fixture
def emulator(emulator_process: EmulatorProcess) -> EmulatorProcess:
    emulator_process.reset()
    return emulator_process


@pytest.fixture
def emulator_client(emulator: EmulatorProcess, emulator_api_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=emulator.base_url,
        headers={"Authorization": f"Bearer {emulator_api_key}"},
        timeout=10.0,
        trust_env=False,
    ) as client:
        yield client
