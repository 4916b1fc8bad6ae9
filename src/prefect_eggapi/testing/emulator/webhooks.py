"""Signed webhook deliveries of the emulator (eggapi-api.md section 11, assumptions 17.15–17.17).

When a task with a ``webhook_url`` completes or fails, :class:`WebhookDispatcher` POSTs
``{event, task_id, status, model, output: {url, urls}, error, cost, timestamp}`` as compact JSON
(``cost`` is a plain 6-decimal string such as ``"0.016000"``; ``timestamp`` equals the
``X-EggAPI-Timestamp`` header) with ``X-EggAPI-Signature: sha256=<hex HMAC-SHA256(secret,
"{timestamp}.{raw_body}")>`` when ``webhook_secret`` is configured, and without it otherwise.

- A 2xx answer counts as delivered. 5xx, 429, timeouts and network errors are retried
  ``webhook_retries`` times after 1 s, 2 s, 4 s ... (``webhook_backoff_seconds`` doubled); each
  attempt is signed afresh with its own timestamp. Other 4xx answers are final ("rejected").
- Like the real API, any valid http(s) ``webhook_url`` is accepted at create time, but deliveries
  go only to hosts on ``webhook_allowed_hosts`` (loopback by default); others are recorded as
  ``skipped`` and never sent. Redirects are not followed and proxies are ignored, so the
  emulator never calls out anywhere else.
- Every attempt (and every skipped or lost delivery) is recorded in the audit
  (``webhook_deliveries``) with its outcome, HTTP status and timings.

Fault kinds (endpoint ``webhook``; one opportunity per terminal task with a ``webhook_url``; several
kinds may fire for the same delivery):

- ``webhook_lost``: never sent (recorded as ``lost``).
- ``webhook_duplicate``: the whole delivery is repeated once, ``delay`` seconds after the first
  copy ended (signed afresh, so within the same second it is a byte-identical replay).
- ``webhook_delayed``: the first attempt waits ``delay`` seconds (default 2).
- ``webhook_out_of_order``: held until a later delivery has been sent (at most ``delay`` seconds,
  default 5), so it arrives after a webhook of a task that finished later.
- ``webhook_bad_signature``: signed with a wrong secret (or a made-up one when unsigned).

The module signs by itself: the emulator shares no code with the client it is used to test.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from .faults import WEBHOOK_KINDS

if TYPE_CHECKING:
    from .records import Task
    from .state import EmulatorState

logger = logging.getLogger("prefect_eggapi.testing.emulator.webhooks")

USER_AGENT = "EggAPI-Webhooks/1.0 (emulator)"
DEFAULT_DELAY_SECONDS = 2.0
DEFAULT_OUT_OF_ORDER_HOLD_SECONDS = 5.0


def signature_for(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=`` + hex HMAC-SHA256(secret, ``"{timestamp}.{body}"``)."""
    digest = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, "sha256")
    return "sha256=" + digest.hexdigest()


def host_allowed(
    url: str, allowed: list[str], setting: str = "webhook_allowed_hosts"
) -> tuple[bool, str]:
    """Whether ``url`` may be called; the reason when not. No DNS lookups.

    ``allowed`` holds exact host names, IP networks (CIDR) or ``*`` (any host); ``setting``
    names the option in the reason, so a refused call says what to change.
    """
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False, "invalid URL"
    if parts.scheme not in ("http", "https") or not host:
        return False, "not an http(s) URL"
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in allowed:
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True, ""
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True, ""
            except ValueError:
                pass
        if host == entry.strip("[]"):
            return True, ""
    return False, f"host {host!r} is not on {setting}"


def _cost(value: Decimal | None) -> str:
    return f"{(value or Decimal('0')):.6f}"


@dataclass
class _Plan:
    task_id: str
    event: str
    url: str
    payload: dict[str, Any]
    completed_at: float | None
    faults: list[str] = field(default_factory=list)
    delay: float = 0.0
    duplicate_delay: float | None = None
    out_of_order_hold: float | None = None
    bad_signature: bool = False


class WebhookDispatcher:
    """Sends the webhooks of one :class:`EmulatorState` on its event loop."""

    def __init__(self, state: EmulatorState) -> None:
        self.state = state
        self._jobs: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        self._sent: asyncio.Event | None = None
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ planning

    def on_terminal(self, task: Task) -> None:
        """Called once per terminal task (from the event loop); never raises."""
        url = task.request.webhook_url
        if not url:
            return
        try:
            self._dispatch(task, url)
        except Exception:  # a webhook bug must not break the task lifecycle
            logger.exception("webhook dispatch failed for %s", task.id)

    def _payload(self, task: Task) -> dict[str, Any]:
        base = self.state.config.public_base_url or self.state.server_base_url or ""
        output = None
        if task.status == "completed":
            urls = task.urls(base)
            output = {"url": urls[0] if urls else "", "urls": urls}
        return {
            "event": f"task.{task.status}",
            "task_id": task.id,
            "status": task.status,
            "model": task.model,
            "output": output,
            "error": task.error if task.status == "failed" else None,
            "cost": _cost(task.cost if task.status == "completed" else None),
        }

    def _dispatch(self, task: Task, url: str) -> None:
        plan = _Plan(
            task_id=task.id,
            event=f"task.{task.status}",
            url=url,
            payload=self._payload(task),
            completed_at=task.completed_at,
        )
        ok, reason = host_allowed(url, self.state.config.webhook_allowed_hosts)
        if not ok:
            self._record(plan, outcome="skipped", reason=reason)
            logger.info("webhook for %s skipped: %s", task.id, reason)
            return
        remaining = set(WEBHOOK_KINDS)
        while remaining:
            fired = self.state.faults.match(frozenset(remaining), "webhook", task.api_key, task.id)
            if fired is None:
                break
            remaining.discard(fired.kind)
            plan.faults.append(fired.kind)
            task.faults.append(fired.kind)
            delay = fired.rule.delay
            if fired.kind == "webhook_delayed":
                plan.delay = delay or DEFAULT_DELAY_SECONDS
            elif fired.kind == "webhook_duplicate":
                plan.duplicate_delay = delay
            elif fired.kind == "webhook_out_of_order":
                plan.out_of_order_hold = delay or DEFAULT_OUT_OF_ORDER_HOLD_SECONDS
            elif fired.kind == "webhook_bad_signature":
                plan.bad_signature = True
        if "webhook_lost" in plan.faults:
            self._record(plan, outcome="lost", reason="fault: webhook_lost")
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._record(plan, outcome="skipped", reason="no running event loop")
            return
        job = loop.create_task(self._run(plan))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    # ------------------------------------------------------------------ sending

    async def _run(self, plan: _Plan) -> None:
        if plan.out_of_order_hold is not None:
            gate = self._sent_event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(gate.wait(), plan.out_of_order_hold)
        if plan.delay:
            await asyncio.sleep(plan.delay)
        await self._deliver(plan, copy=1)
        if plan.duplicate_delay is not None:
            if plan.duplicate_delay:
                await asyncio.sleep(plan.duplicate_delay)
            await self._deliver(plan, copy=2)

    def _sent_event(self) -> asyncio.Event:
        if self._sent is None:
            self._sent = asyncio.Event()
        return self._sent

    def _mark_sent(self) -> None:
        gate = self._sent_event()
        self._sent = asyncio.Event()
        gate.set()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                trust_env=False,
                follow_redirects=False,
                headers={"User-Agent": USER_AGENT},
            )
        return self._client

    async def _deliver(self, plan: _Plan, *, copy: int) -> None:
        cfg = self.state.config
        attempts = cfg.webhook_retries + 1
        for attempt in range(1, attempts + 1):
            outcome = await self._attempt(plan, copy=copy, attempt=attempt)
            if attempt == 1 and copy == 1:
                self._mark_sent()
            if outcome != "failed":
                return
            if attempt < attempts:
                await asyncio.sleep(cfg.webhook_backoff_seconds * 2 ** (attempt - 1))

    async def _attempt(self, plan: _Plan, *, copy: int, attempt: int) -> str:
        cfg = self.state.config
        timestamp = str(int(self.state.clock()))
        body = json.dumps(
            {**plan.payload, "timestamp": int(timestamp)}, separators=(",", ":")
        ).encode("utf-8")
        headers = {"Content-Type": "application/json", "X-EggAPI-Timestamp": timestamp}
        secret = cfg.webhook_secret
        if plan.bad_signature:
            wrong = (secret or "emulator-made-up-secret") + "-wrong"
            headers["X-EggAPI-Signature"] = signature_for(wrong, timestamp, body)
        elif secret:
            headers["X-EggAPI-Signature"] = signature_for(secret, timestamp, body)
        sent_at = time.time()
        http_status: int | None = None
        error: str | None = None
        try:
            response = await self._http().post(
                plan.url, content=body, headers=headers, timeout=cfg.webhook_timeout_seconds
            )
            http_status = response.status_code
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        if http_status is not None and 200 <= http_status < 300:
            outcome = "delivered"
        elif http_status is not None and 400 <= http_status < 500 and http_status != 429:
            outcome = "rejected"
        else:
            outcome = "failed"
        self._record(
            plan,
            outcome=outcome,
            copy=copy,
            attempt=attempt,
            signed="X-EggAPI-Signature" in headers,
            timestamp=int(timestamp),
            http_status=http_status,
            error=error,
            sent_at=sent_at,
            answered_at=time.time(),
            body_sha256=hashlib.sha256(body).hexdigest(),
        )
        logger.info(
            "webhook %s for %s copy %d attempt %d -> %s (%s)",
            plan.event,
            plan.task_id,
            copy,
            attempt,
            outcome,
            http_status or error,
        )
        return outcome

    def _record(
        self, plan: _Plan, *, outcome: str, reason: str | None = None, **extra: Any
    ) -> None:
        record: dict[str, Any] = {
            "delivery_id": f"whd_{next(self._ids)}",
            "task_id": plan.task_id,
            "event": plan.event,
            "url": plan.url,
            "outcome": outcome,
            "reason": reason,
            "faults": list(plan.faults),
            "completed_at_unix": plan.completed_at,
            "copy": 1,
            "attempt": 0,
            "signed": False,
            "timestamp": None,
            "http_status": None,
            "error": None,
            "sent_at": None,
            "answered_at": None,
        }
        record.update(extra)
        self.state.webhook_deliveries.append(record)

    # ------------------------------------------------------------------ lifecycle

    def cancel_all(self) -> None:
        """Drop in-flight deliveries (on reset): a new test must not see old webhooks."""
        for job in list(self._jobs):
            job.cancel()
        self._jobs.clear()

    async def aclose(self) -> None:
        self.cancel_all()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
