"""The emulator's signed webhooks: payload, signature, retries, allow-list, fault injection.

Deliveries go over real HTTP from the emulator subprocess to a recording ASGI app served by
uvicorn in a thread on a free loopback port. Signatures are checked here with ``hmac`` directly,
not with the package's verifier. Lifecycles are driven through the admin API (manual mode).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_server import free_port, serve_asgi
from prefect_eggapi.testing.emulator import EmulatorProcess
from prefect_eggapi.testing.emulator.webhooks import host_allowed

SECRET = "whsec_emulator_test_secret"


class Recorder:
    """A webhook endpoint that records every request; can answer with scripted statuses."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.statuses: list[int] = []  # consumed first; then 200
        self.lock = threading.Lock()
        self.app = Starlette(routes=[Route("/hook", self.handle, methods=["POST"])])

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        with self.lock:
            self.requests.append(
                {"headers": dict(request.headers), "body": body, "at": time.time()}
            )
            status = self.statuses.pop(0) if self.statuses else 200
        return JSONResponse({"ok": status < 300}, status_code=status)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            time.sleep(0.02)
        raise AssertionError(f"expected {count} deliveries, got {len(self.requests)}")


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, str]]:
    rec = Recorder()
    with serve_asgi(rec.app) as url:
        yield rec, f"{url}/hook"


def hmac_ok(secret: str, headers: dict[str, str], body: bytes) -> bool:
    ts = headers["x-eggapi-timestamp"]
    expected = hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest("sha256=" + expected, headers.get("x-eggapi-signature", ""))


def submit(
    client: httpx.Client, webhook_url: str, prompt: str = "a lighthouse", **extra: Any
) -> str:
    body = {"model": "nanobanana-pro", "prompt": prompt, "webhook_url": webhook_url, **extra}
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 202, response.text
    task_id: str = response.json()["data"]["id"]
    return task_id


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def deliveries(emulator: EmulatorProcess, task_id: str, count: int) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = wait_until(
        lambda: (r := emulator.webhook_deliveries(task_id)) and len(r) >= count and r
    )
    return records


def test_completed_task_sends_one_signed_webhook(
    emulator: EmulatorProcess, emulator_client: httpx.Client, recorder: tuple[Recorder, str]
) -> None:
    rec, url = recorder
    emulator.set_config(manual=True, webhook_secret=SECRET)
    task_id = submit(emulator_client, url, num_outputs=2)
    assert rec.requests == []
    done = emulator.complete(task_id)
    [request] = rec.wait_for(1)
    headers, body = request["headers"], request["body"]
    assert headers["content-type"] == "application/json"
    assert hmac_ok(SECRET, headers, body)
    payload = json.loads(body)
    assert payload == {
        "event": "task.completed",
        "task_id": task_id,
        "status": "completed",
        "model": "nanobanana-pro",
        "output": {"url": done["output"]["url"], "urls": done["output"]["urls"]},
        "error": None,
        "cost": "0.032000",
        "timestamp": int(headers["x-eggapi-timestamp"]),
    }
    assert abs(payload["timestamp"] - time.time()) < 5
    [record] = deliveries(emulator, task_id, 1)
    assert record["outcome"] == "delivered" and record["http_status"] == 200
    assert record["signed"] is True and record["attempt"] == 1
    assert record["completed_at_unix"] <= record["sent_at"] <= record["answered_at"]
    # the secret is not shown by the admin config
    assert SECRET not in json.dumps(emulator.get_config())


def test_failed_task_sends_task_failed(
    emulator: EmulatorProcess, emulator_client: httpx.Client, recorder: tuple[Recorder, str]
) -> None:
    rec, url = recorder
    emulator.set_config(manual=True, webhook_secret=SECRET)
    task_id = submit(emulator_client, url)
    emulator.fail(task_id, "Upstream provider error: boom")
    [request] = rec.wait_for(1)
    payload = json.loads(request["body"])
    assert hmac_ok(SECRET, request["headers"], request["body"])
    assert payload["event"] == "task.failed" and payload["status"] == "failed"
    assert payload["error"] == "Upstream provider error: boom"
    assert payload["cost"] == "0.000000" and payload["output"] is None


def test_moderation_failure_through_the_scheduler_sends_task_failed(
    emulator: EmulatorProcess, emulator_client: httpx.Client, recorder: tuple[Recorder, str]
) -> None:
    rec, url = recorder
    emulator.set_config(webhook_secret=SECRET)  # automatic lifecycle, background scheduler
    task_id = submit(emulator_client, url, prompt="something forbidden")
    [request] = rec.wait_for(1)
    payload = json.loads(request["body"])
    assert (payload["task_id"], payload["event"]) == (task_id, "task.failed")
    assert payload["error"].startswith("Content moderation")


def test_no_secret_means_unsigned(
    emulator: EmulatorProcess, emulator_client: httpx.Client, recorder: tuple[Recorder, str]
) -> None:
    rec, url = recorder
    emulator.set_config(manual=True)
    emulator.complete(submit(emulator_client, url))
    [request] = rec.wait_for(1)
    assert "x-eggapi-signature" not in request["headers"]
    assert request["headers"]["x-eggapi-timestamp"].isdigit()


def test_no_webhook_url_no_delivery(
    emulator: EmulatorProcess, emulator_client: httpx.Client
) -> None:
    emulator.set_config(manual=True, webhook_secret=SECRET)
    response = emulator_client.post("/v1/generate", json={"model": "nanobanana", "prompt": "x"})
    task_id = response.json()["data"]["id"]
    emulator.complete(task_id)
    assert emulator.webhook_deliveries(task_id) == []


def test_non_allowed_hosts_are_accepted_but_never_called(
    emulator: EmulatorProcess, emulator_client: httpx.Client
) -> None:
    emulator.set_config(manual=True, webhook_secret=SECRET)
    task_id = submit(emulator_client, "https://hooks.example.com/eggapi?token=abc")
    emulator.complete(task_id)
    [record] = deliveries(emulator, task_id, 1)
    assert record["outcome"] == "skipped"
    assert "not on webhook_allowed_hosts" in record["reason"]
    assert record["sent_at"] is None and record["http_status"] is None


def test_allow_list_matching() -> None:
    default = ["localhost", "127.0.0.0/8", "::1/128"]
    assert host_allowed("http://127.0.0.1:9/x", default)[0]
    assert host_allowed("http://127.9.9.9/x", default)[0]
    assert host_allowed("http://[::1]:8080/x", default)[0]
    assert host_allowed("http://LOCALHOST/x", default)[0]
    for url in (
        "http://10.0.0.1/x",
        "http://localhost.evil.com/x",
        "http://169.254.169.254/latest",
        "http://[::ffff:10.0.0.1]/x",
        "ftp://127.0.0.1/x",
    ):
        assert not host_allowed(url, default)[0], url
    assert host_allowed("https://hooks.example.com/x", ["hooks.example.com"])[0]
    assert host_allowed("http://10.1.2.3/x", ["10.0.0.0/8"])[0]


def test_retries_with_backoff_and_fresh_signatures(
    emulator: EmulatorProcess, emulator_client: httpx.Client, recorder: tuple[Recorder, str]
) -> None:
    rec, url = recorder
    rec.statuses = [503, 500]
    emulator.set_config(
        manual=True, webhook_secret=SECRET, webhook_retries=3, webhook_backoff_seconds=0.2
    )
    task_id = submit(emulator_client, url)
    emulator.complete(task_id)
    requests = rec.wait_for(3)
    records = deliveries(emulator, task_id, 3)
    assert [r["outcome"] for r in records] == ["failed", "failed", "delivered"]
    assert [r["http_status"] for r in records] == [503, 500, 200]
    assert all(hmac_ok(SECRET, r["headers"], r["body"]) for r in requests)
    gaps = [b["sent_at"] - a["sent_at"] for a, b in itertools.pairwise(records)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4  # 0.2 s, then doubled
    assert len(rec.requests) == 3


def test_4xx_is_final_and_exhausted_retries_stop(
    emulator: EmulatorProcess, emulator_client: httpx.Client, recorder: tuple[Recorder, str]
) -> None:
    rec, url = recorder
    rec.statuses = [401, 503, 503, 503]
    emulator.set_config(
        manual=True, webhook_secret=SECRET, webhook_retries=2, webhook_backoff_seconds=0.05
    )
    first = submit(emulator_client, url)
    emulator.complete(first)
    assert [r["outcome"] for r in deliveries(emulator, first, 1)] == ["rejected"]
    second = submit(emulator_client, url)
    emulator.complete(second)
    records = deliveries(emulator, second, 3)
    assert [r["outcome"] for r in records] == ["failed"] * 3
    assert len(rec.wait_for(4)) == 4


def test_unreachable_receiver_is_recorded(
    emulator: EmulatorProcess, emulator_client: httpx.Client
) -> None:
    emulator.set_config(manual=True, webhook_secret=SECRET, webhook_timeout_seconds=2)
    task_id = submit(emulator_client, f"http://127.0.0.1:{free_port()}/hook")
    emulator.complete(task_id)
    [record] = deliveries(emulator, task_id, 1)
    assert record["outcome"] == "failed" and record["error"] == "ConnectError"


# --------------------------------------------------------------------------- faults


def test_fault_lost(
    emulator: EmulatorProcess, emulator_client: httpx.Client, recorder: tuple[Recorder, str]
) -> None:
    rec, url = recorder
    emulator.set_config(manual=True, webhook_secret=SECRET)
    emulator.add_fault("webhook_lost")
    lost = submit(emulator_client, url, prompt="one")
    emulator.complete(lost)
    kept = submit(emulator_client, url, prompt="two")
    emulator.complete(kept)
    [request] = rec.wait_for(1)
    assert json.loads(request["body"])["task_id"] == kept
    assert [r["outcome"] for r in emulator.webhook_deliveries(lost)] == ["lost"]
    assert emulator.task(lost)["faults"] == ["webhook_lost"]


def test_fault_duplicate(
    emulator: EmulatorProcess, emulator_client: httpx.Client, recorder: tuple[Recorder, str]
) -> None:
    rec, url = recorder
    emulator.set_config(manual=True, webhook_secret=SECRET)
    emulator.add_fault("webhook_duplicate", delay=0.1)
    task_id = submit(emulator_client, url)
    emulator.complete(task_id)
    first, second = rec.wait_for(2)
    assert json.loads(first["body"])["task_id"] == json.loads(second["body"])["task_id"]
    assert hmac_ok(SECRET, first["headers"], first["body"])
    assert hmac_ok(SECRET, second["headers"], second["body"])
    assert [r["copy"] for r in deliveries(emulator, task_id, 2)] == [1, 2]


def test_fault_delayed(
    emulator: EmulatorProcess, emulator_client: httpx.Client, recorder: tuple[Recorder, str]
) -> None:
    rec, url = recorder
    emulator.set_config(manual=True, webhook_secret=SECRET)
    emulator.add_fault("webhook_delayed", delay=0.8)
    task_id = submit(emulator_client, url)
    emulator.complete(task_id)
    rec.wait_for(1)
    [record] = deliveries(emulator, task_id, 1)
    assert record["sent_at"] - record["completed_at_unix"] >= 0.8


def test_fault_out_of_order(
    emulator: EmulatorProcess, emulator_client: httpx.Client, recorder: tuple[Recorder, str]
) -> None:
    rec, url = recorder
    emulator.set_config(manual=True, webhook_secret=SECRET)
    emulator.add_fault("webhook_out_of_order", delay=10)
    early = submit(emulator_client, url, prompt="finishes first")
    late = submit(emulator_client, url, prompt="finishes second")
    emulator.complete(early)
    time.sleep(0.2)  # give a wrongly ordered delivery the chance to show up first
    emulator.complete(late)
    first, second = rec.wait_for(2)
    assert [json.loads(r["body"])["task_id"] for r in (first, second)] == [late, early]


def test_fault_bad_signature(
    emulator: EmulatorProcess, emulator_client: httpx.Client, recorder: tuple[Recorder, str]
) -> None:
    rec, url = recorder
    emulator.set_config(manual=True, webhook_secret=SECRET)
    emulator.add_fault("webhook_bad_signature")
    task_id = submit(emulator_client, url)
    emulator.complete(task_id)
    [request] = rec.wait_for(1)
    assert request["headers"]["x-eggapi-signature"].startswith("sha256=")
    assert not hmac_ok(SECRET, request["headers"], request["body"])
    assert deliveries(emulator, task_id, 1)[0]["faults"] == ["webhook_bad_signature"]


def test_reset_cancels_pending_deliveries(
    emulator: EmulatorProcess, emulator_client: httpx.Client, recorder: tuple[Recorder, str]
) -> None:
    rec, url = recorder
    emulator.set_config(manual=True, webhook_secret=SECRET)
    emulator.add_fault("webhook_delayed", delay=1.0)
    emulator.complete(submit(emulator_client, url))
    emulator.reset()
    # a marker delivery sent after the cancelled one would have been due proves the point
    emulator.set_config(manual=True, webhook_secret=SECRET)
    marker = submit(emulator_client, url)
    time.sleep(1.2)
    emulator.complete(marker)
    [request] = rec.wait_for(1)
    assert json.loads(request["body"])["task_id"] == marker
    assert len(rec.requests) == 1
