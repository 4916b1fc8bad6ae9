"""Chaining: a verified webhook becomes ``eggapi.task.completed``, whose deployment trigger (from
``deployments/chaining.yaml``) runs the follow-up flow.

Findings: the test harness's server (``prefect_test_harness``, an ephemeral server in a
subprocess) runs the ReactiveTriggers and Actions services (they are ``RunInEphemeralServers``),
so deployment triggers fire there without extra settings. The follow-up deployment is served
by ``python flows/follow_up.py`` in a subprocess (a Runner that executes the triggered runs).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from prefect_eggapi.testing.emulator import EmulatorProcess

ROOT = Path(__file__).resolve().parent.parent
SECRET = "whsec_chaining_test_secret"

pytestmark = pytest.mark.integration


async def _runs_of(deployment_name: str) -> list[Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    async with get_client() as client:
        try:
            await client.read_deployment_by_name(f"eggapi-follow-up/{deployment_name}")
        except Exception:
            return []
        return list(
            await client.read_flow_runs(
                deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=[deployment_name])
                )
            )
        )


def runs() -> list[Any]:
    return asyncio.run(_runs_of("eggapi-follow-up"))


def test_follow_up_flow_runs_on_the_webhook_event(
    prefect_harness: None,
    emulator: EmulatorProcess,
    emulator_api_key: str,
    tmp_path: Path,
) -> None:
    from prefect.settings import PREFECT_API_URL

    sys.path.insert(0, str(ROOT / "tests"))
    from prefect_eggapi.cli.receiver import emit_webhook_event
    from prefect_eggapi.client import EggAPIClient
    from prefect_eggapi.credentials import EggAPICredentials
    from prefect_eggapi.webhooks.receiver import EggAPIReconciler, WebhookReceiver
    from prefect_eggapi.webhooks.signals import SQLiteSignals
    from test_receiver import serve_asgi

    api_url = PREFECT_API_URL.value()
    assert api_url
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "EGGAPI_API_KEY": emulator_api_key,
        "EGGAPI_BASE_URL": emulator.base_url,
        "EGGAPI_LEDGER_DIR": str(tmp_path / "ledger"),
    }
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "flows" / "follow_up.py")],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90

        def deployed() -> bool:
            async def check() -> bool:
                from prefect import get_client

                async with get_client() as client:
                    try:
                        deployment = await client.read_deployment_by_name(
                            "eggapi-follow-up/eggapi-follow-up"
                        )
                    except Exception:
                        return False
                    automations = await client.read_automations()
                    return deployment is not None and any(
                        "eggapi.task.completed" in str(a.trigger) for a in automations
                    )

            return asyncio.run(check())

        while not deployed():
            assert server.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)

        # A real webhook through the receiver, which re-reads the task and emits the event.
        credentials = EggAPICredentials(api_key=emulator_api_key, base_url=emulator.base_url)
        receiver = WebhookReceiver(
            [SECRET],
            processor=EggAPIReconciler(credentials, announce=emit_webhook_event),
            signals=SQLiteSignals(tmp_path / "signals.sqlite"),
        )
        emulator.set_config(manual=True, webhook_secret=SECRET)
        with (
            serve_asgi(receiver.app) as url,
            EggAPIClient(emulator_api_key, emulator.base_url) as api,
        ):
            task = api.generate(
                model="nanobanana", prompt="a lighthouse", webhook_url=url + receiver.path
            )
            emulator.complete(task.id)
            while receiver.stats["processed"] < 1:
                assert time.monotonic() < deadline, dict(receiver.stats)
                time.sleep(0.05)
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all()

        deadline = time.monotonic() + 120
        while True:
            found = [r for r in runs() if r.parameters.get("task_id") == task.id]
            if found and found[0].state is not None and found[0].state.is_final():
                break
            assert server.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, (found, log_path.read_text()[-3000:])
            time.sleep(0.5)
        [run] = found
        assert run.state.is_completed(), run.state
        # the follow-up re-read the task itself: receiver GET + follow-up GET
        assert emulator.request_count(emulator_api_key, "get_task") >= 2
        assert httpx.get(emulator.base_url + "/_emulator/health").status_code == 200
    finally:
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            server.wait()
