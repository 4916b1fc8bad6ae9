"""With webhooks on, a lost answer is attributed exactly, whatever else uses the key.

Real processes only: the emulator (HTTP, manual lifecycle, signed webhooks), SeaweedFS holding
the shared S3 ledger, ``prefect-eggapi webhooks`` as its own process writing deliveries into that
ledger, and each submitter as its own process (``tests/wh_submitter.py``).

The scene that cannot be attributed from the task list: someone else's job is created on the key
just before our POST and another one *during* it; our POST creates its task but is held 4 s and
answered 502; the submitting process is SIGKILLed during the hold and a fresh process takes the
entry over. Three same-model tasks sit in the window and the list shows no prompt, so without
webhooks the only honest answer is a loud ``ReconciliationError`` (the control). With webhooks the
POST carried its own ``.../s/<nonce>`` URL: the fresh process waits for that delivery and adopts
exactly the task it names. Judged from the emulator's audit (billable tasks, their prompts and
the webhook URL each was created with), never from the ledger.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from multiworker_common import foreign_task
from prefect_procs import BIN, REPO, clean_env, free_port, stop
from reliability_common import environ, wait_until

pytestmark = pytest.mark.integration

SECRET = "whsec_attribution_suite_5c1e"
SUBMITTER = REPO / "tests" / "wh_submitter.py"


@dataclass
class Scene:
    emulator: Any
    api_key: str
    env: dict[str, str]
    ledger: str
    webhook_url: str
    tmp: Path

    def submitter(self, name: str, prompt: str, *, webhooks: bool, wait: float = 120) -> Any:
        out = self.tmp / f"{name}.json"
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        args = [
            sys.executable,
            str(SUBMITTER),
            "--ledger",
            self.ledger,
            "--prompt",
            prompt,
            "--key",
            f"item/{prompt}",
            "--webhook-url",
            self.webhook_url if webhooks else "",
            "--delivery-wait",
            str(wait),
            "--out",
            str(out),
        ]
        proc = subprocess.Popen(
            args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        proc.out = out  # type: ignore[attr-defined]
        proc.log_path = self.tmp / f"{name}.log"  # type: ignore[attr-defined]
        return proc

    def ours(self, prompt: str) -> list[dict[str, Any]]:
        return [t for t in self.emulator.created_tasks(self.api_key) if t["prompt"] == prompt]


def _result(proc: Any, timeout: float = 180) -> dict[str, Any]:
    proc.wait(timeout)
    assert proc.out.exists(), proc.log_path.read_text(errors="replace")[-4000:]
    result: dict[str, Any] = json.loads(proc.out.read_text())
    return result


def _receiver(env: dict[str, str], log: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """``prefect-eggapi webhooks`` as its own process; (process, delivery URL)."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "prefect-eggapi"), "webhooks", "--port", str(port), "--no-events", *extra],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")
        try:
            return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, 60, "the webhook receiver")
    return proc, f"{base}/eggapi/webhook"


@pytest.fixture
def scene(
    emulator: Any, emulator_api_key: str, local_s3: Any, s3_bucket: str, tmp_path: Path
) -> Iterator[Scene]:
    emulator.set_config(manual=True, webhook_secret=SECRET)
    ledger = f"s3://{s3_bucket}/wh-ledger-{tmp_path.name}"
    env = {
        **clean_env(),
        **local_s3.env(),
        "EGGAPI_API_KEY": emulator_api_key,
        "EGGAPI_BASE_URL": emulator.base_url,
        "EGGAPI_WEBHOOK_SECRETS": SECRET,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": str(REPO / "src"),
    }
    receiver, url = _receiver(env, tmp_path / "receiver.log", "--ledger", ledger)
    try:
        yield Scene(emulator, emulator_api_key, env, ledger, url, tmp_path)
    finally:
        stop(receiver)


def _lost_answer_with_foreign_traffic_and_a_kill(
    scene: Scene, prompt: str, webhooks: bool, wait: float = 120
) -> tuple[Any, list[str], int]:
    """Foreign job, our POST (created, held 4 s, 502), foreign job during the hold, SIGKILL;
    then a fresh process on the same entry: (fresh process, foreign task ids, list calls so far).
    """
    em = scene.emulator
    foreign = [foreign_task(em.base_url, scene.api_key, "someone else's job: a tin robot")]
    em.add_fault("error_after_create", status=502, delay=4, times=1)
    first = scene.submitter("first", prompt, webhooks=webhooks)
    try:

        def held() -> bool:
            assert first.poll() is None, first.log_path.read_text(errors="replace")
            return bool(em.faults()[0]["fired"])

        wait_until(held, 60, "our POST to be created and held")
        foreign.append(foreign_task(em.base_url, scene.api_key, "someone else's job: a tin cat"))
    finally:
        os.killpg(first.pid, 9)
        first.wait(10)
    assert len(scene.ours(prompt)) == 1  # our POST did create its task before the kill
    lists_before = em.request_count(scene.api_key, "list_tasks")
    fresh = scene.submitter("fresh", prompt, webhooks=webhooks, wait=wait)
    return fresh, foreign, lists_before


def test_with_webhooks_a_fresh_process_adopts_exactly_the_task_its_post_made(
    scene: Scene,
) -> None:
    prompt = "a lighthouse in fog, webhooks on"
    fresh, foreign, lists_before = _lost_answer_with_foreign_traffic_and_a_kill(
        scene, prompt, webhooks=True
    )
    em = scene.emulator
    try:
        # The fresh process looked at the list (and could not attribute); only then does our
        # task finish, so the adoption can only come from the delivery to its nonce.
        wait_until(
            lambda: em.request_count(scene.api_key, "list_tasks") > lists_before,
            60,
            "the fresh process to reconcile",
        )
        (ours,) = scene.ours(prompt)
        for task_id in [ours["task_id"], *foreign]:
            em.complete(task_id)
        result = _result(fresh)
    finally:
        stop(fresh)
    assert "error" not in result, result
    (billed,) = scene.ours(prompt)  # paid once
    assert result["task_id"] == billed["task_id"]
    assert result["task_id"] not in foreign
    assert result["adopted"] is True
    # The POST that made it carried this entry's own nonce, and the receiver saw it signed.
    (nonce,) = result["nonces"]
    assert billed["webhook_url"] == f"{scene.webhook_url}/s/{nonce}"
    deliveries = em.webhook_deliveries(billed["task_id"])
    assert any(d["http_status"] == 202 and d["signed"] for d in deliveries), deliveries


def test_without_webhooks_the_same_scene_fails_loudly_and_pays_nothing_more(
    scene: Scene,
) -> None:
    """The control: the list alone cannot attribute this, so it must not guess."""
    prompt = "a lighthouse in fog, webhooks off"
    fresh, _, _ = _lost_answer_with_foreign_traffic_and_a_kill(scene, prompt, webhooks=False)
    try:
        result = _result(fresh)
    finally:
        stop(fresh)
    assert result.get("error") == "ReconciliationError", result
    assert len(scene.ours(prompt)) == 1
    assert scene.ours(prompt)[0]["webhook_url"] is None


def test_a_nonce_url_too_long_for_the_api_is_refused_before_any_paid_call(
    scene: Scene,
) -> None:
    prompt = "a lighthouse with a long webhook url"
    scene.webhook_url = "http://127.0.0.1:9/" + "x" * 2020
    proc = scene.submitter("long", prompt, webhooks=True)
    result = _result(proc)
    assert result.get("error") == "InvalidRequestError", result
    assert "webhook_url" in result["message"]
    assert scene.ours(prompt) == []


def test_an_unsigned_delivery_never_attributes(
    emulator: Any, emulator_api_key: str, local_s3: Any, s3_bucket: str, tmp_path: Path
) -> None:
    """Without a secret the receiver takes deliveries as hints only: anyone could post them."""
    emulator.set_config(manual=True, webhook_secret=None)
    ledger = f"s3://{s3_bucket}/wh-unsigned-{tmp_path.name}"
    env = {
        **clean_env(),
        **local_s3.env(),
        "EGGAPI_API_KEY": emulator_api_key,
        "EGGAPI_BASE_URL": emulator.base_url,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PYTHONPATH": str(REPO / "src"),
    }
    log = tmp_path / "receiver.log"
    receiver, url = _receiver(env, log, "--ledger", ledger, "--allow-unsigned")
    try:
        scene = Scene(emulator, emulator_api_key, env, ledger, url, tmp_path)
        prompt = "a lighthouse in fog, unsigned"
        fresh, foreign, lists_before = _lost_answer_with_foreign_traffic_and_a_kill(
            scene, prompt, webhooks=True, wait=20
        )
        try:
            wait_until(
                lambda: emulator.request_count(emulator_api_key, "list_tasks") > lists_before,
                60,
                "the fresh process to reconcile",
            )
            (ours,) = scene.ours(prompt)
            for task_id in [ours["task_id"], *foreign]:
                emulator.complete(task_id)
            wait_until(
                lambda: any(
                    d["http_status"] == 202 for d in emulator.webhook_deliveries(ours["task_id"])
                ),
                30,
                "the receiver to accept the unsigned delivery",
            )
            assert fresh.poll() is None, "the submitter must still be waiting when it arrives"
            result = _result(fresh)
        finally:
            stop(fresh)
    finally:
        stop(receiver)
    assert result.get("error") == "ReconciliationError", result
    assert len(scene.ours(prompt)) == 1


def test_a_retry_attempt_never_adopts_the_task_an_earlier_attempt_was_delivered_for(
    scene: Scene,
) -> None:
    """Attempt 1's task fails upstream (retryable) and its delivery names it under attempt 1's
    nonce; attempt 2's POST creates a new task but its answer is lost. Only attempt 2's nonce may
    attribute: adopting attempt 1's failed task would leave attempt 2's task billed and orphaned
    and make the next retry pay again (found by an adversarial run: 3 tasks, 2 billed)."""
    from prefect_eggapi.client import EggAPIClient
    from prefect_eggapi.client.errors import TaskFailedError
    from prefect_eggapi.client.types import GenerateRequest
    from prefect_eggapi.safety.ledger import ledger_at
    from prefect_eggapi.safety.submitter import Submitter, record_outcome

    em = scene.emulator
    em.set_config(manual=False, pending_seconds=0.05, processing_seconds=0.2)
    em.add_fault("upstream_failure", times=1)
    em.add_fault("error_after_create", status=502, skip=1, times=1)
    prompt = "a lighthouse in fog, second attempt"
    request = GenerateRequest(model="nanobanana", prompt=prompt, webhook_url=scene.webhook_url)
    with environ(**{k: v for k, v in scene.env.items() if k.startswith("AWS_")}):
        ledger = ledger_at(scene.ledger)
    with EggAPIClient(scene.api_key, em.base_url, rate_limit=None) as client:
        submitter = Submitter(
            client, ledger, settle_seconds=0.5, delivery_wait_seconds=60, delivery_poll=0.1
        )
        first = submitter.submit(request, logical_key="retry-item")
        with pytest.raises(TaskFailedError) as failed:
            client.wait_for_task(first.task, timeout=30)
        record_outcome(ledger, first.task.id, error=failed.value)
        wait_until(
            lambda: any(d["http_status"] == 202 for d in em.webhook_deliveries(first.task.id)),
            30,
            "attempt 1's delivery",
        )
        second = submitter.submit(request, logical_key="retry-item")  # the retry's answer is lost
    tasks = scene.ours(prompt)
    assert len(tasks) == 2, tasks  # attempt 1 (failed, $0) and attempt 2
    assert second.task.id != first.task.id
    assert second.task.id == tasks[-1]["task_id"]
    assert second.entry.attempt == 2
    assert tasks[-1]["webhook_url"].endswith(second.entry.nonces[-1])


@pytest.mark.usefixtures("prefect_harness")
def test_the_block_or_environment_webhook_url_gives_every_submit_task_its_own_nonce(
    scene: Scene, tmp_path: Path
) -> None:
    """``EGGAPI_WEBHOOK_URL`` (or ``webhook_url`` on the block): the Prefect submit tasks send it
    with a fresh nonce per POST, so flows get exact attribution without touching requests."""
    from prefect import flow

    from prefect_eggapi.client.types import GenerateRequest
    from prefect_eggapi.tasks import submit_generation

    @flow
    def two() -> None:
        for prompt in ("a kite, block url 1", "a kite, block url 2"):
            submit_generation(GenerateRequest(model="nanobanana", prompt=prompt), key=prompt)

    with environ(
        EGGAPI_API_KEY=scene.api_key,
        EGGAPI_BASE_URL=scene.emulator.base_url,
        EGGAPI_WEBHOOK_URL=scene.webhook_url,
        EGGAPI_LEDGER_DIR=str(tmp_path / "ledger"),
    ):
        two()
    urls = [t["webhook_url"] for t in scene.emulator.created_tasks(scene.api_key)]
    assert len(urls) == 2 and len(set(urls)) == 2, urls
    assert all(u.startswith(scene.webhook_url + "/s/") for u in urls), urls
