"""The webhook receiver: an ASGI app (Starlette) and the ``prefect-eggapi webhooks`` command.

For each ``POST`` it reads the raw body (at most ``max_body_bytes``; larger bodies get 413 before
anything else), verifies ``X-EggAPI-Signature`` over exactly those bytes with
:func:`prefect_eggapi.webhooks.verify.verify` (two secrets during a rotation; timestamps within
``tolerance`` seconds both ways), refuses a replayed ``(timestamp, signature)`` pair within the
tolerance window, deduplicates on ``(task_id, status)``, and answers ``202`` at once. Everything
slow happens after the answer, in a worker thread: the task is re-read with
``GET /v1/tasks/{id}`` (the payload is never trusted; see :mod:`.reconciler`) and, when the API
confirms a terminal status, ``eggapi.task.completed`` / ``eggapi.task.failed`` is emitted as a
Prefect event with resource ``eggapi.task.<id>`` by the ``prefect-eggapi webhooks`` command
(:mod:`prefect_eggapi.cli.receiver`; this module imports no Prefect). Waits in other processes
wake through :class:`SQLiteSignals`.

Deliveries to ``{path}/s/<nonce>`` (the per-submission URL the submitter sends, see
:func:`prefect_eggapi.webhooks.verify.with_nonce`) are *attributions*: once the signature
checks out,
``nonce → task id`` is written to the ledger's delivery log *before* the answer (a failure
answers 503, so EggAPI tries again), where a submitter whose 202 was lost finds exactly the task
its POST created; the submitter checks that task's model and type itself. Unsigned deliveries
never attribute.

Answers: 202 accepted; 200 duplicate (already seen ``(task_id, status)``) or ignored
(non-terminal or unknown event); 400 malformed body or header; 401 missing or wrong signature,
stale or future timestamp; 405 other methods; 409 replay; 413 too large. Rejections are logged
with the reason and the client address: never the body, a signature or a secret.

Without any secret the receiver refuses to start unless ``allow_unsigned`` is set (the real API
sends no signature before a secret exists in the dashboard); unsigned payloads are then treated as
untrusted hints, which is safe only because the task is always re-read.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from prefect_eggapi.client.types import WebhookPayload
from prefect_eggapi.safety.ledger import DeliveryLog
from prefect_eggapi.webhooks.reconciler import ClientSource, EggAPIReconciler, PayloadProcessor
from prefect_eggapi.webhooks.signals import SQLiteSignals
from prefect_eggapi.webhooks.verify import (
    DEFAULT_TOLERANCE_SECONDS,
    NONCE_RE,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookError,
    coerce_secrets,
    parse_payload,
    verify,
)

# ClientSource, EggAPIReconciler and PayloadProcessor live in ``reconciler``; re-exported here,
# where they were first imported from.
__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_PATH",
    "SECRETS_ENV",
    "ClientSource",
    "EggAPIReconciler",
    "PayloadProcessor",
    "WebhookReceiver",
    "create_receiver_app",
    "secrets_from_env",
]

log = logging.getLogger("prefect_eggapi.webhooks.receiver")

SECRETS_ENV = "EGGAPI_WEBHOOK_SECRETS"
DEFAULT_PATH = "/eggapi/webhook"
DEFAULT_MAX_BODY_BYTES = 64 * 1024
DEFAULT_PORT = 8788
_TERMINAL = ("completed", "failed")
_MAX_REMEMBERED = 100_000


def secrets_from_env(name: str = SECRETS_ENV) -> list[SecretStr]:
    """Comma-separated secrets from an environment variable (current first, then previous)."""
    return coerce_secrets([s for s in os.environ.get(name, "").split(",") if s.strip()])


class WebhookReceiver:
    """State and ASGI app of one receiver. ``receiver.app`` is what uvicorn serves.

    Args:
        secrets: accepted signing secrets (two during a rotation).
        processor: called in a worker thread after the answer; default :class:`EggAPIReconciler`.
        signals: where waits in other processes learn about the delivery (None: nowhere).
        deliveries: where signed deliveries to ``{path}/s/<nonce>`` are attributed (the ledger
            the submitters use; None: nonces are not recorded).
        tolerance: accepted clock difference in seconds, both directions.
        max_body_bytes: larger bodies are refused with 413 without being read further.
        allow_unsigned: accept unsigned deliveries when no secret is configured (hints only).
        path: the URL path deliveries are posted to.
        clock: Unix time source (tests).
    """

    def __init__(
        self,
        secrets: Iterable[SecretStr | str] | None = None,
        *,
        processor: PayloadProcessor | None = None,
        signals: SQLiteSignals | None = None,
        deliveries: DeliveryLog | None = None,
        tolerance: float = DEFAULT_TOLERANCE_SECONDS,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        allow_unsigned: bool = False,
        path: str = DEFAULT_PATH,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.secrets = coerce_secrets(list(secrets or []))
        if not self.secrets and not allow_unsigned:
            raise ValueError(
                "no webhook secret configured: set EggAPICredentials.webhook_secrets or "
                f"{SECRETS_ENV}, or allow unsigned deliveries explicitly"
            )
        self.processor: PayloadProcessor = processor or EggAPIReconciler()
        self.signals = signals
        self.deliveries = deliveries
        self.tolerance = tolerance
        self.max_body_bytes = max_body_bytes
        self.allow_unsigned = allow_unsigned
        self.path = path if path.startswith("/") else f"/{path}"
        self.clock = clock
        self.stats: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._replays: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()
        self._seen: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self.app = Starlette(
            routes=[
                Route(self.path, self._handle, methods=["POST"]),
                Route(f"{self.path.rstrip('/')}/s/{{nonce}}", self._handle, methods=["POST"]),
                Route("/healthz", self._health, methods=["GET"]),
            ]
        )
        self.app.add_exception_handler(405, self._method_not_allowed)

    def __repr__(self) -> str:
        return f"WebhookReceiver(path={self.path!r}, secrets={len(self.secrets)})"

    # ------------------------------------------------------------------ HTTP

    async def _health(self, request: Request) -> Response:
        with self._lock:
            stats = dict(self.stats)
        return JSONResponse({"status": "ok", "signed": bool(self.secrets), "stats": stats})

    async def _method_not_allowed(self, request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "method_not_allowed"}, status_code=405)

    def _reject(self, request: Request, status: int, reason: str, message: str) -> Response:
        client = request.client.host if request.client else "?"
        log.warning("rejected webhook from %s: %s (%s)", client, reason, message)
        self._count(f"rejected:{reason}")
        return JSONResponse({"error": reason, "message": message}, status_code=status)

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    async def _read_body(self, request: Request) -> bytes | None:
        """The raw body, or None once it exceeds ``max_body_bytes``."""
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return None
            if int(declared) > self.max_body_bytes:
                return None
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _handle(self, request: Request) -> Response:
        nonce: str | None = request.path_params.get("nonce")
        if nonce is not None and not NONCE_RE.fullmatch(nonce):
            return self._reject(request, 404, "unknown_path", "not a submission's webhook path")
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            return self._reject(
                request, 415, "unsupported_media_type", "webhooks are sent as application/json"
            )
        raw = await self._read_body(request)
        if raw is None:
            return self._reject(
                request, 413, "body_too_large", f"body exceeds {self.max_body_bytes} bytes"
            )
        now = self.clock()
        signed = bool(self.secrets)
        try:
            if signed:
                payload = verify(
                    raw, request.headers, self.secrets, tolerance=self.tolerance, now=now
                )
            else:
                payload = parse_payload(raw)
        except WebhookError as exc:
            return self._reject(request, exc.status_code, exc.reason, exc.message)
        if signed and not self._first_use(request, now):
            return self._reject(
                request, 409, "replay", "this (timestamp, signature) pair was already used"
            )
        status = payload.status.value
        if payload.event not in ("task.completed", "task.failed") or status not in _TERMINAL:
            self._count("ignored")
            log.info("ignored webhook %s (%s) for %s", payload.event, status, payload.task_id)
            return JSONResponse({"status": "ignored"}, status_code=200)
        if not self._first_delivery(payload.task_id, status):
            self._count("duplicate")
            log.info("duplicate webhook for %s (%s)", payload.task_id, status)
            return JSONResponse({"status": "duplicate"}, status_code=200)
        if nonce is not None and not signed:
            log.info("unsigned delivery for %s: its nonce attributes nothing", payload.task_id)
        elif nonce is not None and self.deliveries is not None:
            # Recorded before the answer: a receiver killed after a 202 must not lose the one
            # delivery that attributes a lost submit (EggAPI does not redeliver a 2xx).
            try:
                await asyncio.to_thread(self._attribute, nonce, payload.task_id)
            except Exception as exc:
                self._forget(payload.task_id, status)  # the redelivery may try again
                self._count("attribution_failed")
                log.warning("could not record the delivery of %s: %s", payload.task_id, type(exc))
                return JSONResponse({"error": "unavailable"}, status_code=503)
        self._count("accepted")
        return JSONResponse(
            {"status": "accepted"},
            status_code=202,
            background=BackgroundTask(self.process, payload, now),
        )

    def _attribute(self, nonce: str, task_id: str) -> None:
        assert self.deliveries is not None
        recorded = self.deliveries.record_delivery(nonce, task_id)
        if recorded != task_id:  # one POST, one task: a second one is someone's forgery
            self._count("nonce_conflict")
            log.warning(
                "a delivery for %s came to a nonce already delivered for %s; kept %s",
                task_id,
                recorded,
                recorded,
            )
        else:
            self._count("attributed")

    # ------------------------------------------------------------------ bookkeeping

    def _first_use(self, request: Request, now: float) -> bool:
        """Replay protection: remember each (timestamp, signature) for the tolerance window."""
        key = (
            request.headers.get(TIMESTAMP_HEADER, ""),
            request.headers.get(SIGNATURE_HEADER, "").lower(),
        )
        with self._lock:
            while self._replays:
                oldest_key, expires = next(iter(self._replays.items()))
                if expires >= now and len(self._replays) < _MAX_REMEMBERED:
                    break
                del self._replays[oldest_key]
            if key in self._replays:
                return False
            # the pair stays acceptable (fresh) until timestamp + tolerance
            self._replays[key] = float(key[0]) + self.tolerance
            return True

    def _first_delivery(self, task_id: str, status: str) -> bool:
        # A recorded signal means an earlier run of this receiver already took this delivery.
        if self.signals is not None and self.signals.has(task_id, status):
            return False
        key = (task_id, status)
        with self._lock:
            if key in self._seen:
                return False
            self._seen[key] = None
            if len(self._seen) > _MAX_REMEMBERED:
                self._seen.popitem(last=False)
        return True

    def _forget(self, task_id: str, status: str) -> None:
        with self._lock:
            self._seen.pop((task_id, status), None)

    def process(self, payload: WebhookPayload, received_at: float) -> None:
        """Re-read and announce one new delivery (runs in a worker thread, after the answer)."""
        status = payload.status.value
        try:
            task = self.processor(payload)
        except Exception as exc:
            self._forget(payload.task_id, status)  # a redelivery may try again
            self._count("reread_failed")
            log.warning(
                "could not re-read task %s after its webhook: %s", payload.task_id, type(exc)
            )
            return
        if task is None:
            self._forget(payload.task_id, status)
            self._count("not_confirmed")
            log.warning(
                "webhook said %s is %s but the API does not confirm it", payload.task_id, status
            )
            return
        if self.signals is not None:
            # Wakes the waits with the task just read, so they need no GET of their own.
            try:
                self.signals.signal(
                    task.id,
                    task.status.value,
                    event=payload.event,
                    received_at=received_at,
                    task=task,
                )
            except Exception as exc:
                self._forget(payload.task_id, status)  # a redelivery may try again
                self._count("signal_failed")
                log.warning("could not record the signal of %s: %s", task.id, type(exc))
                return
        self._count("processed")
        log.info(
            "task %s is %s (webhook %s, %.3fs after receipt)",
            task.id,
            task.status.value,
            payload.event,
            self.clock() - received_at,
        )


def create_receiver_app(
    secrets: Iterable[SecretStr | str] | None = None, **options: Any
) -> Starlette:
    """Shortcut for ``WebhookReceiver(secrets, **options).app``."""
    return WebhookReceiver(secrets, **options).app
