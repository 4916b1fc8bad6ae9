"""The webhook receiver over real HTTP, and webhook-mode waits against the emulator.

Attack requests are signed here with ``hmac`` directly. The receiver runs under uvicorn in a
thread (or as the ``prefect-eggapi webhooks`` command in a subprocess, for the cross-process
test); the emulator is the session subprocess, driven in manual mode.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from asgi_server import free_port, serve_asgi
from prefect_eggapi.client import EggAPIClient
from prefect_eggapi.client.polling import PollPolicy
from prefect_eggapi.client.types import EggAPITask, TaskStatus, WebhookPayload
from prefect_eggapi.credentials import EggAPICredentials
from prefect_eggapi.safety.ledger import SQLiteLedger
from prefect_eggapi.testing.emulator import EmulatorProcess
from prefect_eggapi.webhooks.receiver import EggAPIReconciler, WebhookReceiver
from prefect_eggapi.webhooks.signals import SQLiteSignals
from prefect_eggapi.webhooks.verify import new_nonce

SECRET = "whsec_receiver_test_secret"
OLD_SECRET = "whsec_receiver_previous_secret"


def signed(
    payload: dict[str, Any] | bytes, *, secret: str = SECRET, ts: int | None = None
) -> tuple[bytes, dict[str, str]]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    stamp = str(int(time.time()) if ts is None else ts)
    digest = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": "application/json",
        "X-EggAPI-Timestamp": stamp,
        "X-EggAPI-Signature": f"sha256={digest}",
    }
    return body, headers


def payload(task_id: str = "gen_aaaaaaaaaaaa", status: str = "completed") -> dict[str, Any]:
    return {
        "event": f"task.{status}",
        "task_id": task_id,
        "status": status,
        "model": "nanobanana",
        "output": {"url": "http://x/0.png", "urls": ["http://x/0.png"]},
        "error": None,
        "cost": "0.010000",
        "timestamp": int(time.time()),
    }


class FakeProcessor:
    """Stands in for the GET re-read: records calls; confirms unless told otherwise."""

    def __init__(self) -> None:
        self.calls: list[WebhookPayload] = []
        self.confirm = True
        self.block = threading.Event()
        self.block.set()
        self.done = threading.Semaphore(0)

    def __call__(self, p: WebhookPayload) -> EggAPITask | None:
        self.block.wait(10)
        self.calls.append(p)
        self.done.release()
        if not self.confirm:
            return None
        return EggAPITask(id=p.task_id, status=p.status)

    def wait_calls(self, count: int) -> None:
        for _ in range(count):
            assert self.done.acquire(timeout=10), "processor not called"


def wait_stat(rec: WebhookReceiver, key: str, count: int = 1) -> None:
    """Processing runs after the answer: wait (bounded) until it has counted ``key``."""
    deadline = time.monotonic() + 10
    while rec.stats[key] < count:
        assert time.monotonic() < deadline, (key, dict(rec.stats))
        time.sleep(0.01)


@pytest.fixture
def fake() -> FakeProcessor:
    return FakeProcessor()


@pytest.fixture
def receiver(fake: FakeProcessor, tmp_path: Path) -> Iterator[tuple[WebhookReceiver, str]]:
    rec = WebhookReceiver(
        [SecretStr(SECRET), SecretStr(OLD_SECRET)],
        processor=fake,
        signals=SQLiteSignals(tmp_path / "signals.sqlite"),
        max_body_bytes=4096,
    )
    with serve_asgi(rec.app) as url:
        yield rec, url + rec.path


def test_valid_delivery_is_accepted_fast_and_processed_after_the_answer(
    receiver: tuple[WebhookReceiver, str], fake: FakeProcessor
) -> None:
    rec, url = receiver
    fake.block.clear()  # processing cannot finish until the answer has arrived
    body, headers = signed(payload())
    response = httpx.post(url, content=body, headers=headers, timeout=5)
    assert response.status_code == 202 and response.json() == {"status": "accepted"}
    assert fake.calls == []
    fake.block.set()
    fake.wait_calls(1)
    assert fake.calls[0].task_id == "gen_aaaaaaaaaaaa"
    wait_stat(rec, "processed")
    assert rec.signals is not None and rec.signals.is_signalled("gen_aaaaaaaaaaaa")
    # the waits get the task as re-read, not the payload: no second GET
    confirmed = rec.signals.confirmed("gen_aaaaaaaaaaaa")
    assert confirmed is not None and confirmed.status is TaskStatus.COMPLETED
    assert rec.stats["accepted"] == 1


def test_previous_secret_is_accepted_during_rotation(
    receiver: tuple[WebhookReceiver, str], fake: FakeProcessor
) -> None:
    _, url = receiver
    body, headers = signed(payload(), secret=OLD_SECRET)
    assert httpx.post(url, content=body, headers=headers).status_code == 202
    fake.wait_calls(1)


def test_duplicate_is_processed_once(
    receiver: tuple[WebhookReceiver, str], fake: FakeProcessor
) -> None:
    rec, url = receiver
    body, headers = signed(payload(), ts=int(time.time()) - 5)
    assert httpx.post(url, content=body, headers=headers).status_code == 202
    # a redelivery: same task and status, signed afresh
    body2, headers2 = signed(payload(), ts=int(time.time()))
    again = httpx.post(url, content=body2, headers=headers2)
    assert again.status_code == 200 and again.json() == {"status": "duplicate"}
    # the other terminal status of the same task is a different delivery
    body3, headers3 = signed(payload(status="failed"))
    assert httpx.post(url, content=body3, headers=headers3).status_code == 202
    fake.wait_calls(2)
    assert [(c.task_id, c.status.value) for c in fake.calls] == [
        ("gen_aaaaaaaaaaaa", "completed"),
        ("gen_aaaaaaaaaaaa", "failed"),
    ]
    assert rec.stats["duplicate"] == 1


def test_dedupe_survives_a_receiver_restart(fake: FakeProcessor, tmp_path: Path) -> None:
    path = tmp_path / "signals.sqlite"
    first = WebhookReceiver([SECRET], processor=fake, signals=SQLiteSignals(path))
    second = WebhookReceiver([SECRET], processor=fake, signals=SQLiteSignals(path))
    with serve_asgi(first.app) as url:
        body, headers = signed(payload(), ts=int(time.time()) - 1)
        assert httpx.post(url + first.path, content=body, headers=headers).status_code == 202
        wait_stat(first, "processed")
    with serve_asgi(second.app) as url:
        body, headers = signed(payload())
        response = httpx.post(url + second.path, content=body, headers=headers)
        assert response.json() == {"status": "duplicate"}
    fake.wait_calls(1)
    assert len(fake.calls) == 1


def test_a_delivery_whose_signal_could_not_be_written_can_be_redelivered(
    fake: FakeProcessor, tmp_path: Path
) -> None:
    class FlakySignals(SQLiteSignals):
        fail = True

        def signal(self, task_id: str, status: str, **kw: Any) -> bool:
            if self.fail:
                self.fail = False
                raise sqlite3.OperationalError("database is locked")
            return super().signal(task_id, status, **kw)

    rec = WebhookReceiver([SECRET], processor=fake, signals=FlakySignals(tmp_path / "s.sqlite"))
    with serve_asgi(rec.app) as url:
        body, headers = signed(payload(), ts=int(time.time()) - 1)
        assert httpx.post(url + rec.path, content=body, headers=headers).status_code == 202
        wait_stat(rec, "signal_failed")
        body, headers = signed(payload())
        again = httpx.post(url + rec.path, content=body, headers=headers)
        assert again.status_code == 202  # not "duplicate": nothing was recorded
        wait_stat(rec, "processed")
    assert rec.signals is not None and rec.signals.has("gen_aaaaaaaaaaaa", "completed")


def test_a_signed_delivery_to_a_nonce_path_is_attributed_once_and_unsigned_never(
    fake: FakeProcessor, tmp_path: Path
) -> None:
    """``{path}/s/<nonce>``: signed and confirmed -> nonce -> task in the delivery log; a second
    task on the same nonce is refused (first wins); malformed nonces are 404; unsigned: nothing."""
    log = SQLiteLedger(tmp_path / "ledger.sqlite3")
    nonce, other = new_nonce(), new_nonce()
    rec = WebhookReceiver([SECRET], processor=fake, deliveries=log)
    with serve_asgi(rec.app) as url:
        base = url + rec.path
        fake.block.clear()  # the re-read cannot finish: a receiver killed right after its 202
        body, headers = signed(payload("gen_ours"))
        assert httpx.post(f"{base}/s/{nonce}", content=body, headers=headers).status_code == 202
        assert log.delivered(nonce) == "gen_ours"  # recorded before the answer, not after
        assert rec.stats["attributed"] == 1
        fake.block.set()
        body, headers = signed(payload("gen_forged"), ts=int(time.time()) - 1)
        assert httpx.post(f"{base}/s/{nonce}", content=body, headers=headers).status_code == 202
        wait_stat(rec, "nonce_conflict")
        assert log.delivered(nonce) == "gen_ours"
        body, headers = signed(payload("gen_x"), ts=int(time.time()) - 2)
        for bad in ("short", "a" * 23, "../../etc"):
            response = httpx.post(f"{base}/s/{bad}", content=body, headers=headers)
            assert response.status_code == 404, (bad, response.text)
        # The plain path still works and attributes nothing.
        body, headers = signed(payload("gen_plain"), ts=int(time.time()) - 3)
        assert httpx.post(base, content=body, headers=headers).status_code == 202
        wait_stat(rec, "processed", 3)
    assert log.delivered(other) is None

    class Down(SQLiteLedger):
        def record_delivery(self, nonce: str, task_id: str) -> str:
            raise sqlite3.OperationalError("disk I/O error")

    down = WebhookReceiver([SECRET], processor=fake, deliveries=Down(tmp_path / "d.sqlite3"))
    with serve_asgi(down.app) as url:
        body, headers = signed(payload("gen_later"), ts=int(time.time()) - 4)
        first = httpx.post(f"{url}{down.path}/s/{other}", content=body, headers=headers)
        assert first.status_code == 503  # EggAPI tries again; nothing was taken as delivered
        down.deliveries = log
        body, headers = signed(payload("gen_later"), ts=int(time.time()) - 5)
        again = httpx.post(f"{url}{down.path}/s/{other}", content=body, headers=headers)
        assert again.status_code == 202
    assert log.delivered(other) == "gen_later"
    other = new_nonce()

    unsigned = WebhookReceiver(None, processor=fake, deliveries=log, allow_unsigned=True)
    with serve_asgi(unsigned.app) as url:
        body = json.dumps(payload("gen_unsigned")).encode()
        response = httpx.post(
            f"{url}{unsigned.path}/s/{other}",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 202
        wait_stat(unsigned, "processed")
    assert log.delivered(other) is None
    assert unsigned.stats["attributed"] == 0


def test_signal_files_of_an_older_version_gain_the_task_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE signals (task_id TEXT NOT NULL, status TEXT NOT NULL, event TEXT, "
            "received_at REAL NOT NULL, PRIMARY KEY (task_id, status))"
        )
        conn.execute("INSERT INTO signals VALUES ('gen_old000000001', 'completed', NULL, 1.0)")
    signals = SQLiteSignals(path)
    assert signals.has("gen_old000000001", "completed")
    assert signals.confirmed("gen_old000000001") is None  # no task recorded: the wait GETs
    task = EggAPITask(id="gen_new000000001", status=TaskStatus.COMPLETED)
    assert signals.signal(task.id, "completed", task=task)
    assert signals.confirmed(task.id) == task
    SQLiteSignals(path)  # opening it again is fine


def test_unconfirmed_delivery_can_be_redelivered(
    receiver: tuple[WebhookReceiver, str], fake: FakeProcessor
) -> None:
    rec, url = receiver
    fake.confirm = False  # the API says the task is not terminal (a lying or early payload)
    body, headers = signed(payload(), ts=int(time.time()) - 2)
    assert httpx.post(url, content=body, headers=headers).status_code == 202
    fake.wait_calls(1)
    wait_stat(rec, "not_confirmed")
    assert rec.signals is not None and not rec.signals.is_signalled("gen_aaaaaaaaaaaa")
    fake.confirm = True
    body, headers = signed(payload())
    assert httpx.post(url, content=body, headers=headers).status_code == 202
    fake.wait_calls(1)


def test_replay_is_rejected(receiver: tuple[WebhookReceiver, str], fake: FakeProcessor) -> None:
    rec, url = receiver
    body, headers = signed(payload())
    assert httpx.post(url, content=body, headers=headers).status_code == 202
    replay = httpx.post(url, content=body, headers=headers)
    assert replay.status_code == 409 and replay.json()["error"] == "replay"
    fake.wait_calls(1)
    assert len(fake.calls) == 1 and rec.stats["rejected:replay"] == 1


@pytest.mark.parametrize(
    ("make", "status", "reason"),
    [
        (lambda: signed(payload(), secret="whsec_attacker"), 401, "signature_mismatch"),
        (
            lambda: (signed(payload())[0] + b" ", signed(payload())[1]),
            401,
            "signature_mismatch",
        ),
        (lambda: signed(payload(), ts=int(time.time()) - 301), 401, "stale_timestamp"),
        (lambda: signed(payload(), ts=int(time.time()) + 400), 401, "future_timestamp"),
        (
            lambda: (
                json.dumps(payload()).encode(),
                {"X-EggAPI-Timestamp": "1", "Content-Type": "application/json"},
            ),
            401,
            "missing_signature",
        ),
        (
            lambda: (
                signed(payload())[0],
                {**signed(payload())[1], "X-EggAPI-Signature": "sha256=nothex"},
            ),
            400,
            "bad_signature_format",
        ),
        (lambda: signed(b"{not json"), 400, "malformed_payload"),
        (lambda: signed(b'{"event": "task.completed"}'), 400, "malformed_payload"),
        (lambda: signed({**payload(), "pad": "x" * 5000}), 413, "body_too_large"),
    ],
    ids=[
        "wrong-secret",
        "tampered-body",
        "stale",
        "future",
        "unsigned",
        "bad-format",
        "not-json",
        "missing-fields",
        "oversized",
    ],
)
def test_attacks_are_rejected_with_4xx_and_a_log_line_without_secrets(
    receiver: tuple[WebhookReceiver, str],
    fake: FakeProcessor,
    caplog: pytest.LogCaptureFixture,
    make: Any,
    status: int,
    reason: str,
) -> None:
    rec, url = receiver
    body, headers = make()
    with caplog.at_level(logging.WARNING, logger="prefect_eggapi.webhooks.receiver"):
        response = httpx.post(url, content=body, headers=headers)
    assert response.status_code == status
    assert response.json()["error"] == reason
    assert rec.stats[f"rejected:{reason}"] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "prefect_eggapi.webhooks.receiver"]
    assert any(reason in line for line in lines)
    for line in lines:
        assert SECRET not in line and OLD_SECRET not in line
        digest = headers.get("X-EggAPI-Signature", "")[7:]
        assert not digest or digest not in line  # no signature values either
    assert SECRET not in response.text
    assert fake.calls == []
    assert rec.signals is not None and not rec.signals.is_signalled("gen_aaaaaaaaaaaa")


def test_chunked_oversized_body_is_rejected_while_streaming(
    receiver: tuple[WebhookReceiver, str], fake: FakeProcessor
) -> None:
    _, url = receiver

    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b"x" * 1024

    response = httpx.post(
        url,
        content=chunks(),
        headers={"X-EggAPI-Timestamp": "1", "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert fake.calls == []


def test_other_methods_and_ignored_events(
    receiver: tuple[WebhookReceiver, str], fake: FakeProcessor
) -> None:
    _, url = receiver
    assert httpx.get(url).status_code == 405
    body, headers = signed({**payload(), "event": "task.processing", "status": "processing"})
    response = httpx.post(url, content=body, headers=headers)
    assert response.status_code == 200 and response.json() == {"status": "ignored"}
    assert fake.calls == []


def test_refuses_to_run_unsigned_unless_allowed(fake: FakeProcessor) -> None:
    with pytest.raises(ValueError, match="no webhook secret"):
        WebhookReceiver([], processor=fake)
    rec = WebhookReceiver([], processor=fake, allow_unsigned=True)
    with serve_asgi(rec.app) as url:
        response = httpx.post(
            url + rec.path,
            content=json.dumps(payload()).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 202
    fake.wait_calls(1)


# --------------------------------------------------------------------------- with the emulator


@pytest.fixture
def api(emulator: EmulatorProcess, emulator_api_key: str) -> Iterator[EggAPIClient]:
    with EggAPIClient(emulator_api_key, emulator.base_url) as client:
        yield client


@pytest.fixture
def live_receiver(
    emulator: EmulatorProcess, emulator_api_key: str, tmp_path: Path
) -> Iterator[tuple[WebhookReceiver, str]]:
    credentials = EggAPICredentials(api_key=emulator_api_key, base_url=emulator.base_url)
    rec = WebhookReceiver(
        [SECRET],
        processor=EggAPIReconciler(credentials),
        signals=SQLiteSignals(tmp_path / "signals.sqlite"),
    )
    emulator.set_config(manual=True, webhook_secret=SECRET)
    with serve_asgi(rec.app) as url:
        yield rec, url + rec.path


SLOW_POLL = PollPolicy(initial_interval=30, max_interval=30, min_interval=30, jitter=0)


def test_webhook_wakes_the_wait_long_before_the_next_poll(
    emulator: EmulatorProcess,
    api: EggAPIClient,
    live_receiver: tuple[WebhookReceiver, str],
    emulator_api_key: str,
) -> None:
    rec, url = live_receiver
    task = api.generate(model="nanobanana", prompt="a fox", webhook_url=url)
    signals = SQLiteSignals(rec.signals.path if rec.signals else None)
    result: list[EggAPITask] = []
    waiter = threading.Thread(
        target=lambda: result.append(
            api.wait_for_task(task, timeout=60, poll=SLOW_POLL, signals=signals)
        )
    )
    waiter.start()
    started = time.monotonic()
    emulator.complete(task.id)
    waiter.join(20)
    elapsed = time.monotonic() - started
    assert result and result[0].status.value == "completed"
    assert elapsed < 10, elapsed  # the first poll would only happen after 30 s
    wait_stat(rec, "processed")
    # the receiver re-read the task and handed it to the wait: one GET in all, not two
    assert emulator.request_count(emulator_api_key, "get_task") == 1
    assert result[0].output is not None and result[0].output.urls


def test_lost_webhook_still_completes_through_polling(
    emulator: EmulatorProcess, api: EggAPIClient, live_receiver: tuple[WebhookReceiver, str]
) -> None:
    rec, url = live_receiver
    emulator.add_fault("webhook_lost")
    task = api.generate(model="nanobanana", prompt="a fox", webhook_url=url)
    signals = SQLiteSignals(rec.signals.path if rec.signals else None)
    emulator.complete(task.id)
    poll = PollPolicy(initial_interval=0.3, max_interval=0.3, min_interval=0.3, jitter=0)
    done = api.wait_for_task(task, timeout=30, poll=poll, signals=signals)
    assert done.status.value == "completed"
    assert [r["outcome"] for r in emulator.webhook_deliveries(task.id)] == ["lost"]
    assert rec.stats["accepted"] == 0


def test_duplicated_webhook_from_the_emulator_is_processed_once(
    emulator: EmulatorProcess,
    api: EggAPIClient,
    live_receiver: tuple[WebhookReceiver, str],
    emulator_api_key: str,
) -> None:
    rec, url = live_receiver
    emulator.add_fault("webhook_duplicate", delay=0.05)
    task = api.generate(model="nanobanana", prompt="a fox", webhook_url=url)
    emulator.complete(task.id)
    deadline = time.monotonic() + 10
    while len([r for r in emulator.webhook_deliveries(task.id) if r["http_status"]]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    wait_stat(rec, "processed")
    statuses = [r["http_status"] for r in emulator.webhook_deliveries(task.id)]
    assert statuses[0] == 202 and statuses[1] in (200, 409)  # duplicate, or identical replay
    assert rec.stats["processed"] == 1
    assert emulator.request_count(emulator_api_key, "get_task") == 1  # one re-read only


def test_bad_signature_from_the_emulator_is_rejected(
    emulator: EmulatorProcess, api: EggAPIClient, live_receiver: tuple[WebhookReceiver, str]
) -> None:
    rec, url = live_receiver
    emulator.add_fault("webhook_bad_signature")
    task = api.generate(model="nanobanana", prompt="a fox", webhook_url=url)
    emulator.complete(task.id)
    wait_stat(rec, "rejected:signature_mismatch")
    # The emulator records the delivery once it has read our answer: wait for that too.
    deadline = time.monotonic() + 10
    while not (records := emulator.webhook_deliveries(task.id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    [record] = records
    assert record["http_status"] == 401 and record["outcome"] == "rejected"
    assert rec.stats["processed"] == 0


def test_cross_process_receiver_cli_wakes_waits_here(
    emulator: EmulatorProcess, api: EggAPIClient, emulator_api_key: str, tmp_path: Path
) -> None:
    """The receiver is the real CLI command in another process; the wait runs in this one."""
    port = free_port()
    signals_path = tmp_path / "shared-signals.sqlite"
    env = {
        **os.environ,
        "EGGAPI_API_KEY": emulator_api_key,
        "EGGAPI_BASE_URL": emulator.base_url,
        "EGGAPI_WEBHOOK_SECRETS": f"{SECRET},{OLD_SECRET}",
    }
    log_path = tmp_path / "receiver.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect_eggapi.cli.main",
                "webhooks",
                "--port",
                str(port),
                "--signals",
                str(signals_path),
                "--no-events",
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        emulator.set_config(manual=True, webhook_secret=SECRET)
        task = api.generate(
            model="nanobanana", prompt="a fox", webhook_url=f"{base}/eggapi/webhook"
        )
        signals = SQLiteSignals(signals_path)
        result: list[EggAPITask] = []
        waiter = threading.Thread(
            target=lambda: result.append(
                api.wait_for_task(task, timeout=60, poll=SLOW_POLL, signals=signals)
            )
        )
        waiter.start()
        started = time.monotonic()
        emulator.complete(task.id)
        waiter.join(20)
        assert result and result[0].status.value == "completed"
        assert time.monotonic() - started < 10
        stats = httpx.get(f"{base}/healthz").json()["stats"]
        assert stats["accepted"] == 1
        assert SECRET not in log_path.read_text()
    finally:
        if process.poll() is None:  # a receiver that died at start-up is reported above
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def test_signals_wake_async_waits_from_another_process(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    signals = SQLiteSignals(path)

    async def scenario() -> tuple[bool, float]:
        started = time.monotonic()
        writer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import time, sys; from prefect_eggapi.webhooks.signals import SQLiteSignals; "
                "time.sleep(0.3); SQLiteSignals(sys.argv[1]).signal('gen_x', 'completed')",
                str(path),
            ]
        )
        try:
            woke = await signals.await_signal("gen_x", 20)
        finally:
            writer.wait(20)
        return woke, time.monotonic() - started

    woke, elapsed = asyncio.run(scenario())
    assert woke and elapsed < 10
    assert not signals.wait("gen_other", 0.1)
    assert signals.wait("gen_x", 0)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_wrong_content_type_is_rejected_before_anything_else(content_type):
    seen: list[object] = []
    receiver = WebhookReceiver([SecretStr("whsec_ct_test")], processor=seen.append)
    headers = {} if content_type is None else {"content-type": content_type}
    with TestClient(receiver.app) as http:
        response = http.post("/eggapi/webhook", content=b"{}", headers=headers)
    assert response.status_code == 415
    assert response.json()["error"] == "unsupported_media_type"
    assert seen == []
    assert receiver.stats["rejected:unsupported_media_type"] == 1
