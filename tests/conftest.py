"""Shared test set-up: offline Prefect settings before anything imports Prefect, and fixtures.

Fixture modules live beside this file, one per real server, so each can be read on its own.
"""

from __future__ import annotations

import os
import tempfile

_PREFECT_HOME = tempfile.mkdtemp(prefix="eggapi-prefect-home-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# Never let a developer's real key leak into the tests.
os.environ.pop("EGGAPI_API_KEY", None)
os.environ.pop("EGGAPI_BASE_URL", None)

pytest_plugins = ["fixtures_emulator", "fixtures_s3", "fixtures_prefect"]
