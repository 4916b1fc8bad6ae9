"""``prefect-eggapi webhooks``: runs the receiver (:mod:`prefect_eggapi.webhooks.receiver`) with a
credentials block, the workers' ledger and Prefect events.

The receiver itself imports no Prefect and no block; this command wires them in: the block
re-reads tasks, :func:`emit_webhook_event` announces each confirmed one as an
``eggapi.task.<status>`` Prefect event, and the ledger the workers use records attributions.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import Any

import uvicorn
from prefect.events import emit_event
from prefect.events.worker import EventsWorker
from pydantic import SecretStr

from prefect_eggapi.cli._args import Subparsers, add_command
from prefect_eggapi.client.types import EggAPITask, WebhookPayload
from prefect_eggapi.credentials import EggAPICredentials
from prefect_eggapi.safety.ledger import (
    LEDGER_DIR_ENV,
    LEDGER_URI_ENV,
    LedgerStore,
    default_ledger,
    ledger_at,
)
from prefect_eggapi.storage import OutputStore, S3Settings
from prefect_eggapi.tasks.artifacts import EVENT_PREFIX, task_resource
from prefect_eggapi.webhooks.receiver import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PATH,
    DEFAULT_PORT,
    SECRETS_ENV,
    EggAPIReconciler,
    WebhookReceiver,
    log,
    secrets_from_env,
)
from prefect_eggapi.webhooks.signals import SQLiteSignals, default_signals_path
from prefect_eggapi.webhooks.verify import DEFAULT_TOLERANCE_SECONDS, coerce_secrets

__all__ = ["build_receiver", "configure_parser", "emit_webhook_event", "receiver_ledger", "run"]


def emit_webhook_event(task: EggAPITask, payload: WebhookPayload) -> None:
    """``eggapi.task.<status>`` (status as re-read), resource ``eggapi.task.<id>``."""
    body: dict[str, Any] = {"status": task.status.value, "source": "webhook"}
    if task.cost is not None:
        body["cost"] = str(task.cost_amount)
    if task.error:
        body["error"] = task.error
    if task.output is not None:
        body["urls"] = task.output.all_urls
    body["webhook_event"] = payload.event
    labels = {"model": task.model or "", "type": task.type or "", "source": "webhook"}
    try:
        emit_event(
            f"{EVENT_PREFIX}.{task.status.value}",
            resource=task_resource(task.id, **labels),
            payload=body,
        )
    except Exception:  # telemetry must not fail the receiver
        log.warning("could not emit the event for %s", task.id, exc_info=True)


DESCRIPTION = """\
Run the EggAPI webhook receiver: verifies X-EggAPI-Signature over the raw body, refuses stale,
future, replayed, oversized and unsigned deliveries, answers 202 at once, re-reads each task with
GET /v1/tasks/{id}, emits eggapi.task.completed / eggapi.task.failed Prefect events (point
PREFECT_API_URL at your server), and wakes waiting flows through a SQLite signal file.
Secrets come from the credentials block (webhook_secrets) and/or EGGAPI_WEBHOOK_SECRETS
(comma-separated); never from the command line.
"""


def configure_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add the ``webhooks`` subcommand to ``subparsers`` (from ``add_subparsers()``)."""
    parser = add_command(
        subparsers,
        "webhooks",
        summary="Run the webhook receiver (verify, dedupe, re-read, emit Prefect events).",
        description=DESCRIPTION,
        run=run,
    )
    parser.add_argument("--host", default="127.0.0.1", help="Bind address (default: 127.0.0.1).")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"Port (default: {DEFAULT_PORT})."
    )
    parser.add_argument("--path", default=DEFAULT_PATH, help=f"URL path (default: {DEFAULT_PATH}).")
    parser.add_argument(
        "--credentials-block",
        default=None,
        metavar="NAME",
        help="EggAPICredentials block to load (default: EGGAPI_API_KEY / EGGAPI_BASE_URL).",
    )
    parser.add_argument(
        "--secrets-env",
        default=SECRETS_ENV,
        metavar="VAR",
        help=f"Environment variable with comma-separated secrets (default: {SECRETS_ENV}).",
    )
    parser.add_argument(
        "--signals",
        default=None,
        metavar="PATH",
        help="SQLite signal file shared with waiting flows (default: EGGAPI_WEBHOOK_SIGNALS, "
        "else .eggapi/webhook-signals.sqlite).",
    )
    parser.add_argument(
        "--ledger",
        default=None,
        metavar="LOCATION",
        help="Ledger that submitters use, where deliveries to per-submission URLs are "
        "attributed: s3://bucket/prefix or a directory (default: EGGAPI_LEDGER_URI, "
        "EGGAPI_LEDGER_DIR, else beside EGGAPI_S3_BUCKET's outputs, else .eggapi).",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE_SECONDS,
        help="Accepted timestamp skew in seconds (default: 300).",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"Larger bodies get 413 (default: {DEFAULT_MAX_BODY_BYTES}).",
    )
    parser.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="Without any secret, accept unsigned deliveries as untrusted hints.",
    )
    parser.add_argument(
        "--no-events", action="store_true", help="Do not emit Prefect events (signals only)."
    )
    parser.add_argument("--log-level", default="info", help="Log level (default: info).")
    return parser


def _load_credentials(block: str | None) -> EggAPICredentials:
    if block:
        loaded = EggAPICredentials.load(block)
        assert isinstance(loaded, EggAPICredentials)
        return loaded
    return EggAPICredentials()


def receiver_ledger(location: str | None) -> LedgerStore:
    """The ledger the flows of this configuration use (same rules as ``default_ledger``)."""
    if location:
        return ledger_at(location)
    configured = os.environ.get(LEDGER_URI_ENV) or os.environ.get(LEDGER_DIR_ENV)
    if not configured and os.environ.get("EGGAPI_S3_BUCKET"):
        return default_ledger(beside=OutputStore.from_settings(S3Settings.from_env()))
    return default_ledger()


def build_receiver(args: argparse.Namespace) -> WebhookReceiver:
    credentials = _load_credentials(args.credentials_block)
    secrets: Sequence[SecretStr] = [*secrets_from_env(args.secrets_env)]
    secrets = [*secrets, *coerce_secrets(credentials.webhook_secrets)]
    signals = SQLiteSignals(args.signals or default_signals_path())
    return WebhookReceiver(
        secrets,
        processor=EggAPIReconciler(
            credentials, announce=None if args.no_events else emit_webhook_event
        ),
        signals=signals,
        deliveries=receiver_ledger(args.ledger),
        tolerance=args.tolerance,
        max_body_bytes=args.max_body_bytes,
        allow_unsigned=args.allow_unsigned,
        path=args.path,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    try:
        receiver = build_receiver(args)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    if not args.no_events and not os.environ.get("PREFECT_API_URL"):
        log.warning(
            "PREFECT_API_URL is not set: events go to this process's own ephemeral API, "
            "where no automation or other process sees them"
        )
    host = args.host
    shown = f"[{host}]" if ":" in host else host
    signals_path = receiver.signals.path if receiver.signals else None
    print(
        f"EggAPI webhook receiver on http://{shown}:{args.port}{receiver.path} "
        f"({len(receiver.secrets)} secret(s); signals: {signals_path}; "
        f"deliveries attributed in {receiver.deliveries!r})",
        flush=True,
    )
    try:
        uvicorn.run(receiver.app, host=host, port=args.port, log_level=args.log_level.lower())
    finally:
        if isinstance(receiver.processor, EggAPIReconciler):
            receiver.processor.close()
        if not args.no_events:
            EventsWorker.drain_all()
    return 0
