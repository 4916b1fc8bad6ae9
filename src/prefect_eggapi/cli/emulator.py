"""The ``emulator`` command.

``prefect-eggapi emulator`` or ``python -m prefect_eggapi.testing.emulator``.

:func:`configure_parser` adds the subcommand to an argparse ``subparsers`` object (and sets
``func=run``); :func:`main` is the standalone entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from prefect_eggapi.cli._args import Subparsers, add_command
from prefect_eggapi.testing.emulator.config import (
    DEFAULT_API_KEY,
    ApiKeyConfig,
    EmulatorConfig,
    FaultRule,
    mask_key,
)
from prefect_eggapi.testing.emulator.server import bind_socket, serve, url_for

DESCRIPTION = """\
Run a local EggAPI emulator (FastAPI + Pillow) on loopback: the same paths, envelopes, status
codes, validation messages, task lifecycle, balances, rate limits and output PNGs as
api.eggapi.ai, with scriptable faults. Point the client at it with EGGAPI_BASE_URL and
EGGAPI_API_KEY (printed at start-up). Scripting at runtime: see /_emulator/* (e.g.
curl -X POST URL/_emulator/faults -d '{"kind":"error_after_create","status":502}').
"""

FAULT_HELP = """\
Add a fault rule (JSON; repeatable), e.g. '{"kind":"upstream_failure","times":2}'.
Fields: kind (error_before_create, error_after_create, drop_after_create, timeout_after_create,
http_error, rate_limit_burst, upstream_failure, empty_output, slow_download, truncated_download),
endpoint (generate|get_task|list_tasks|download|usage|any), status, code, message,
times (null = forever), skip, delay (s), bytes_per_second, fraction, rate (0..1: fire with this
seeded probability; see --fault-rate).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """All options of the emulator command (defaults are filled in by :func:`build_config`)."""
    net = parser.add_argument_group("network")
    net.add_argument(
        "--host",
        default="127.0.0.1",
        help="Loopback address to listen on (default: 127.0.0.1; non-loopback is refused).",
    )
    net.add_argument(
        "--port", type=int, default=8787, help="Port (default: 8787; 0 picks a free port)."
    )
    net.add_argument(
        "--public-base-url",
        default=None,
        help="Host written into output file URLs (default: this server's own URL).",
    )
    keys = parser.add_argument_group("accounts")
    keys.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help=f"Accepted API key (repeatable). Default: the public test key {DEFAULT_API_KEY}.",
    )
    keys.add_argument(
        "--balance",
        default=None,
        metavar="USD",
        help="Starting balance of each key in USD (default: 100).",
    )
    timing = parser.add_argument_group("task lifecycle")
    timing.add_argument(
        "--pending-seconds",
        type=float,
        default=None,
        help="Seconds a task stays pending (default: 1.0).",
    )
    timing.add_argument(
        "--processing-seconds",
        type=float,
        default=None,
        help="Seconds a task stays processing (default: 3.0).",
    )
    timing.add_argument(
        "--manual",
        action="store_true",
        default=None,
        help="Tasks stay pending until POST /_emulator/tasks/{id}/advance|complete|fail.",
    )
    behaviour = parser.add_argument_group("behaviour")
    behaviour.add_argument(
        "--rate-limit",
        type=float,
        default=None,
        metavar="RPS",
        help="Per-key requests per second before 429 RATE_LIMITED (default: 100; 0 disables).",
    )
    behaviour.add_argument(
        "--rate-limit-burst",
        type=int,
        default=None,
        help="Token-bucket size (default: the rate).",
    )
    behaviour.add_argument(
        "--allowed-model",
        action="append",
        default=None,
        metavar="MODEL",
        help="Model allow-list (repeatable; default: nanobanana, nanobanana-pro). "
        "Use only 'nanobanana' to mimic the G3 validator.",
    )
    behaviour.add_argument(
        "--moderation-word",
        default=None,
        help="Prompts containing this word fail moderation (default: 'forbidden'; '' disables).",
    )
    behaviour.add_argument(
        "--seed", type=int, default=None, help="Seed for deterministic ids (and fault rates)."
    )
    behaviour.add_argument(
        "--fault", action="append", default=None, metavar="JSON", help=FAULT_HELP
    )
    behaviour.add_argument(
        "--fault-rate",
        action="append",
        default=None,
        metavar="NAME=RATE",
        help="A seeded fault rate (repeatable), e.g. post_502_before_create=0.1, "
        "post_502_after_create=0.05, drop_after_create=0.05, late_answer=0.02, "
        "upstream_failure=0.1, get_task_500=0.01, or any fault kind. Reproducible with "
        "--fault-seed (or --seed).",
    )
    behaviour.add_argument(
        "--fault-seed",
        type=int,
        default=None,
        help="Seed of the fault rates (default: --seed; none: random draws).",
    )
    edits = parser.add_argument_group("edits")
    edits.add_argument(
        "--no-fetch-inputs",
        action="store_true",
        default=None,
        help="Do not fetch edit inputs (edits are drawn like generations, with no sources).",
    )
    edits.add_argument(
        "--input-allow-host",
        action="append",
        default=None,
        metavar="HOST",
        help="Host name, CIDR or '*' edit inputs may be fetched from (repeatable; default: "
        "loopback only, the emulator never calls out elsewhere).",
    )
    behaviour.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="JSON file with a full EmulatorConfig; the options above override it.",
    )
    hooks = parser.add_argument_group("webhooks")
    hooks.add_argument(
        "--webhook-secret-env",
        default=None,
        metavar="VAR",
        help="Sign webhooks with the secret in this environment variable (never on argv); "
        "default: EGGAPI_EMULATOR_WEBHOOK_SECRET if set, else unsigned.",
    )
    hooks.add_argument(
        "--webhook-retries",
        type=int,
        default=None,
        help="Retries of a failed delivery (5xx, 429, timeouts), backing off 1, 2, 4 s.",
    )
    hooks.add_argument(
        "--webhook-allow-host",
        action="append",
        default=None,
        metavar="HOST",
        help="Host name or CIDR webhooks may be delivered to (repeatable; default: loopback "
        "only). Deliveries elsewhere are skipped and recorded in the audit.",
    )
    logs = parser.add_argument_group("logging")
    logs.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="Server log level (default: info).",
    )
    logs.add_argument("--access-log", action="store_true", help="Log every request.")


def configure_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add the ``emulator`` subcommand to ``subparsers`` (from ``add_subparsers()``)."""
    parser = add_command(
        subparsers,
        "emulator",
        summary="Run a local EggAPI emulator on loopback.",
        description=DESCRIPTION,
        run=run,
    )
    add_arguments(parser)
    return parser


def build_config(args: argparse.Namespace) -> EmulatorConfig:
    """Config file (if any), then CLI defaults for a demo, then explicit options."""
    data: dict[str, Any] = {"pending_seconds": 1.0, "processing_seconds": 3.0}
    if args.config is not None:
        data.update(json.loads(args.config.read_text()))
    if args.api_key or "api_keys" not in data or args.balance is not None:
        keys = args.api_key or list(data.get("api_keys") or {}) or [DEFAULT_API_KEY]
        existing = data.get("api_keys") or {}
        balance = Decimal("100") if args.balance is None else _decimal(args.balance)
        data["api_keys"] = {}
        for key in keys:
            entry = dict(existing.get(key, {}))
            if args.balance is not None or key not in existing:
                entry["balance"] = str(balance)
            data["api_keys"][key] = entry
    overrides = {
        "pending_seconds": args.pending_seconds,
        "processing_seconds": args.processing_seconds,
        "manual": args.manual,
        "rate_limit_per_second": args.rate_limit,
        "rate_limit_burst": args.rate_limit_burst,
        "allowed_models": args.allowed_model,
        "public_base_url": args.public_base_url,
        "seed": args.seed,
        "fault_seed": args.fault_seed,
        "input_allowed_hosts": args.input_allow_host,
    }
    data.update({k: v for k, v in overrides.items() if v is not None})
    if args.webhook_secret_env:
        secret = os.environ.get(args.webhook_secret_env)
        if not secret:
            raise ValueError(f"--webhook-secret-env: ${args.webhook_secret_env} is empty")
        data["webhook_secret"] = secret
    if args.webhook_retries is not None:
        data["webhook_retries"] = args.webhook_retries
    if args.webhook_allow_host:
        data["webhook_allowed_hosts"] = args.webhook_allow_host
    if args.moderation_word is not None:
        data["moderation_word"] = args.moderation_word or None
    if args.no_fetch_inputs:
        data["fetch_inputs"] = False
    if args.fault_rate:
        data["fault_rates"] = {**data.get("fault_rates", {}), **_fault_rates(args.fault_rate)}
    if args.fault:
        data["faults"] = [*data.get("faults", []), *(json.loads(f) for f in args.fault)]
    for rule in data.get("faults", []):
        FaultRule.model_validate(rule)
    return EmulatorConfig.model_validate(data)


def _fault_rates(values: list[str]) -> dict[str, float]:
    rates: dict[str, float] = {}
    for value in values:
        name, sep, rate = value.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            rates[name.strip()] = float(rate)
        except ValueError:
            raise ValueError(f"--fault-rate must be NAME=RATE, got {value!r}") from None
    return rates


def _decimal(value: str) -> Decimal:
    try:
        return Decimal(value)
    except InvalidOperation:
        raise ValueError(f"--balance must be a number, got {value!r}") from None


def run(args: argparse.Namespace) -> int:
    """Serve in the foreground; prints the base URL and the environment to use."""
    try:
        config = build_config(args)
    except (ValueError, ValidationError, OSError) as exc:
        print(f"emulator: invalid configuration: {exc}", file=sys.stderr)
        return 2
    try:
        sock = bind_socket(args.host, args.port)
    except (ValueError, OSError) as exc:
        print(f"emulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    base_url = url_for(host, port)
    print(f"EggAPI emulator listening on {base_url}", flush=True)
    for key, key_config in config.api_keys.items():
        state = " (suspended)" if key_config.suspended else ""
        print(f"  API key {_display_key(key)}: balance ${key_config.balance}{state}")
    mode = (
        "manual (advance via /_emulator/tasks/{id}/advance)"
        if config.manual
        else f"pending {config.pending_seconds}s, processing {config.processing_seconds}s"
    )
    print(f"  Tasks: {mode}; rate limit: {config.rate_limit_per_second or 'off'} req/s per key")
    if config.fault_rates:
        seed = config.effective_fault_seed()
        rates = ", ".join(f"{name}={spec}" for name, spec in config.fault_rates.items())
        print(f"  Fault rates: {rates} (seed {seed if seed is not None else 'random'})")
    print("Point the client at it:")
    print(f"  export EGGAPI_BASE_URL={base_url}")
    first_key = next(iter(config.api_keys), DEFAULT_API_KEY)
    if first_key == DEFAULT_API_KEY:
        print(f"  export EGGAPI_API_KEY={DEFAULT_API_KEY}")
    else:
        print(f"  export EGGAPI_API_KEY=<the key you passed, {mask_key(first_key)}>")
    print(f"Admin API (no key, loopback only): {base_url}/_emulator/health|config|faults|audit")
    print("Press Ctrl+C to stop.", flush=True)
    serve(config, sock, log_level=args.log_level, access_log=args.access_log)
    return 0


def _display_key(key: str) -> str:
    return key if key == DEFAULT_API_KEY else mask_key(key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prefect_eggapi.testing.emulator",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = ["ApiKeyConfig", "add_arguments", "build_config", "configure_parser", "main", "run"]
