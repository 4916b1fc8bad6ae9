"""Issue 9, part 4: webhook attacks end to end; all are rejected and none reaches a flow.

A real flow run waits (webhook mode, polling only every 30 s) for a real emulator task that stays
pending (manual mode). Forged deliveries that claim the task completed are posted to the verified
receiver over HTTP: bad signature, wrong secret, tampered body, stale and future timestamps,
replay, oversized body (declared and chunked), unsigned, wrong content type, malformed JSON,
malformed headers. Each must be answered 4xx, never re-read from the API, never signalled to the
waiting flow, and the flow must still be waiting. Then the emulator completes the task and sends
its genuine signed webhook: the flow wakes at once (positive control: the pathway works, so the
silence after the attacks means something).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect import flow
from pydantic import SecretStr

from asgi_server import serve_asgi
from prefect_eggapi.cli.receiver import emit_webhook_event
from prefect_eggapi.client import EggAPIClient
from prefect_eggapi.client.polling import PollPolicy
from prefect_eggapi.credentials import EggAPICredentials
from prefect_eggapi.tasks import wait_for_task
from prefect_eggapi.webhooks.receiver import EggAPIReconciler, WebhookReceiver
from prefect_eggapi.webhooks.signals import SQLiteSignals
from reliability_common import find_secrets, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]

SECRET = "whsec_attack_suite_current_8d3f"
OLD_SECRET = "whsec_attack_suite_previous_1a2b"
SLOW_POLL = PollPolicy(initial_interval=30, max_interval=30, min_interval=30, jitter=0)


def sign(body: bytes, ts: int, secret: str = SECRET) -> str:
    digest = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def forged(task_id: str, status: str = "completed") -> bytes:
    return json.dumps(
        {
            "event": f"task.{status}",
            "task_id": task_id,
            "status": status,
            "model": "nanobanana",
            "output": {"url": "http://evil.example/0.png", "urls": ["http://evil.example/0.png"]},
            "error": None,
            "cost": "0.000000",
            "timestamp": int(time.time()),
        },
        separators=(",", ":"),
    ).encode()


def headers(body: bytes, ts: int | None = None, secret: str = SECRET, **extra: str) -> dict:
    ts = int(time.time()) if ts is None else ts
    return {
        "Content-Type": "application/json",
        "X-EggAPI-Timestamp": str(ts),
        "X-EggAPI-Signature": sign(body, ts, secret),
        **extra,
    }


def attacks(task_id: str) -> list[tuple[str, bytes | Iterator[bytes], dict[str, str], set[int]]]:
    body = forged(task_id)
    now = int(time.time())
    big = forged(task_id)[:-1] + b',"pad":"' + b"x" * 70_000 + b'"}'
    bad_json = b'{"event":"task.completed","task_id":"' + task_id.encode() + b'",'

    def chunks() -> Iterator[bytes]:
        yield big[:1000]
        yield big[1000:]

    signed_chunks = headers(big)
    return [
        (
            "bad-signature",
            body,
            {**headers(body), "X-EggAPI-Signature": "sha256=" + "0" * 64},
            {401},
        ),
        ("wrong-secret", body, headers(body, secret="whsec_guessed"), {401}),
        ("tampered-body", body.replace(b"completed", b"failed__"), headers(body), {401}),
        ("stale-timestamp", body, headers(body, ts=now - 301), {401}),
        ("very-stale-timestamp", body, headers(body, ts=now - 86_400), {401}),
        # 60 s beyond the tolerance: the list is built before the sends, and on a loaded machine
        # a few seconds pass before this one is checked (now + 301 was accepted once in CI-like
        # load: by then it was within 300 s of the receiver's clock).
        ("future-timestamp", body, headers(body, ts=now + 360), {401}),
        ("unsigned", body, {"Content-Type": "application/json"}, {401}),
        (
            "signature-without-timestamp",
            body,
            {k: v for k, v in headers(body).items() if k != "X-EggAPI-Timestamp"},
            {400, 401},
        ),
        (
            "sha1-signature",
            body,
            {**headers(body), "X-EggAPI-Signature": "sha1=" + "a" * 40},
            {400, 401},
        ),
        (
            "non-numeric-timestamp",
            body,
            {**headers(body), "X-EggAPI-Timestamp": "yesterday"},
            {400, 401},
        ),
        ("oversized-body", big, headers(big), {413}),
        ("oversized-chunked", chunks(), signed_chunks, {413}),
        ("text-plain", body, {**headers(body), "Content-Type": "text/plain"}, {415}),
        (
            "form-encoded",
            body,
            {**headers(body), "Content-Type": "application/x-www-form-urlencoded"},
            {415},
        ),
        (
            "no-content-type",
            body,
            {k: v for k, v in headers(body).items() if k != "Content-Type"},
            {415},
        ),
        ("malformed-json-signed", bad_json, headers(bad_json), {400}),
        ("json-array-signed", b"[1,2,3]", headers(b"[1,2,3]"), {400}),
        ("empty-body-signed", b"", headers(b""), {400, 401}),
    ]


@pytest.fixture
def scene(emulator, emulator_api_key: str, tmp_path: Path):
    creds = EggAPICredentials(
        api_key=SecretStr(emulator_api_key),
        base_url=emulator.base_url,
        webhook_secrets=[SecretStr(SECRET), SecretStr(OLD_SECRET)],
    )
    signals_path = tmp_path / "signals.sqlite"
    receiver = WebhookReceiver(
        creds.webhook_secrets,
        processor=EggAPIReconciler(creds, announce=emit_webhook_event),
        signals=SQLiteSignals(signals_path),
    )
    emulator.set_config(manual=True, webhook_secret=SECRET)
    with serve_asgi(receiver.app) as base:
        url = base + receiver.path
        with EggAPIClient(emulator_api_key, emulator.base_url) as api:
            task = api.generate(model="nanobanana", prompt="a guarded gate", webhook_url=url)
        outcome: dict[str, Any] = {}

        @flow(name="eggapi-webhook-target")
        def target() -> str:
            done = wait_for_task(
                task.id,
                credentials=creds,
                timeout=90,
                poll=SLOW_POLL,
                signals=SQLiteSignals(signals_path),
            )
            return done.status.value

        def run() -> None:
            try:
                outcome["status"] = target()
            except BaseException as exc:
                outcome["error"] = exc
            outcome["at"] = time.monotonic()

        waiter = threading.Thread(target=run, daemon=True)
        waiter.start()
        # the flow is waiting once it has polled the task the first time
        wait_until(
            lambda: emulator.request_count(emulator_api_key, "get_task") >= 1, 60, "first poll"
        )
        yield {
            "task": task,
            "url": url,
            "receiver": receiver,
            "signals": SQLiteSignals(signals_path),
            "waiter": waiter,
            "outcome": outcome,
        }
        if waiter.is_alive():  # release the waiting flow
            with contextlib.suppress(Exception):
                emulator.complete(task.id)
            waiter.join(60)


def test_every_attack_is_rejected_and_none_reaches_the_flow(scene, emulator, emulator_api_key):
    task_id = scene["task"].id
    receiver: WebhookReceiver = scene["receiver"]
    polls_before = emulator.request_count(emulator_api_key, "get_task")
    answers: dict[str, int] = {}
    with httpx.Client(timeout=10, trust_env=False) as http:
        for name, body, hdrs, expected in attacks(task_id):
            response = http.post(scene["url"], content=body, headers=hdrs)
            answers[name] = response.status_code
            assert response.status_code in expected, (name, response.status_code, response.text)
            assert SECRET not in response.text and OLD_SECRET not in response.text
        # replay: a genuine, validly signed (non-terminal) delivery, then the same bytes again
        hint = forged(task_id, status="processing")
        hint_headers = headers(hint, secret=OLD_SECRET)
        first = http.post(scene["url"], content=hint, headers=hint_headers)
        replay = http.post(scene["url"], content=hint, headers=hint_headers)
        answers["replay"] = replay.status_code
    assert first.status_code == 200 and first.json()["status"] == "ignored"
    assert replay.status_code == 409, replay.text
    assert len(answers) >= 19

    stats = dict(receiver.stats)
    rejected = sum(v for k, v in stats.items() if k.startswith("rejected:"))
    assert rejected == len(answers), stats
    assert stats.get("accepted", 0) == 0 and stats.get("processed", 0) == 0
    # nothing reached the flow: no signal, no re-read by the receiver, the flow still waiting
    assert not scene["signals"].is_signalled(task_id)
    assert emulator.request_count(emulator_api_key, "get_task") == polls_before
    assert scene["waiter"].is_alive() and not scene["outcome"]
    assert emulator.task(task_id)["status"] == "pending"

    # positive control: the genuine webhook wakes the flow long before its next poll (30 s)
    completed_at = time.monotonic()
    emulator.complete(task_id)
    scene["waiter"].join(25)
    outcome = scene["outcome"]
    assert outcome.get("status") == "completed", outcome
    assert outcome["at"] - completed_at < 20
    wait_until(lambda: receiver.stats["processed"] == 1, 10, "the genuine delivery")
    assert receiver.stats["accepted"] == 1


def test_rejection_logs_name_the_reason_but_no_secret(scene, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="prefect_eggapi.webhooks.receiver")
    task_id = scene["task"].id
    with httpx.Client(timeout=10, trust_env=False) as http:
        for _name, body, hdrs, _expected in attacks(task_id):
            http.post(scene["url"], content=body, headers=hdrs)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "rejected webhook" in text and "signature_mismatch" in text
    assert find_secrets({"receiver-log": text}, [SECRET, OLD_SECRET]) == []
    assert not re.search(r"[0-9a-f]{64}", text)  # never a signature either
    assert scene["receiver"].stats.get("processed", 0) == 0
