"""Verification of EggAPI webhooks: no Prefect, no network, just bytes, headers and secrets.

EggAPI signs each delivery (eggapi-api.md section 11, assumption 17.17)::

    X-EggAPI-Timestamp: 1767225600
    X-EggAPI-Signature: sha256=<hex HMAC-SHA256(secret, "{timestamp}.{raw_body}")>

Verify the **raw** request body, exactly as received: re-serialised JSON never matches (the most
common cause of signature failures in other providers' clients). :func:`verify` checks, in order:
the headers are present and well formed (strict: digits only; exactly ``sha256=`` and 64 hex
digits; one value each), the signature matches one of the configured secrets (two during a
rotation; constant-time comparison), the timestamp is within ``tolerance`` seconds of ``now``
in both directions, and the body is a JSON object with ``event``, ``task_id`` and ``status``.
Each failure is a distinct :class:`WebhookError` subclass with an HTTP status a receiver can
answer with. Secrets are :class:`~pydantic.SecretStr` and never appear in messages or reprs.

A verified payload is still only a hint: act on ``GET /v1/tasks/{id}``, not on its fields.

**Per-submission nonces.** ``webhook_url`` is sent per task (section 11), so every POST can get
its own: :func:`with_nonce` appends ``/s/<nonce>`` to the user's URL, the receiver serves that
path too, and a *signed* delivery to it names exactly the task that POST created — whatever else
uses the key — which is how a lost 202 is attributed with webhooks on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr, ValidationError

from prefect_eggapi.client.types import WebhookPayload

__all__ = [
    "DEFAULT_TOLERANCE_SECONDS",
    "NONCE_RE",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "FutureTimestampError",
    "InvalidSignatureFormatError",
    "InvalidTimestampError",
    "MalformedPayloadError",
    "MissingSignatureError",
    "MissingTimestampError",
    "NoSecretConfiguredError",
    "SignatureMismatchError",
    "StaleTimestampError",
    "TimestampOutOfToleranceError",
    "WebhookError",
    "WebhookPayload",
    "coerce_secrets",
    "compute_signature",
    "new_nonce",
    "parse_payload",
    "sign",
    "verify",
    "with_nonce",
]

SIGNATURE_HEADER = "X-EggAPI-Signature"
TIMESTAMP_HEADER = "X-EggAPI-Timestamp"
SIGNATURE_PREFIX = "sha256="
DEFAULT_TOLERANCE_SECONDS = 300

NONCE_RE = re.compile(r"[A-Za-z0-9_-]{22}", re.ASCII)  # 16 random bytes, URL-safe base64
NONCE_SUFFIX_CHARS = len("/s/") + 22

_TIMESTAMP_RE = re.compile(r"[0-9]{1,15}", re.ASCII)
_SIGNATURE_RE = re.compile(r"sha256=([0-9a-fA-F]{64})", re.ASCII)

SecretLike = SecretStr | str | bytes
HeadersLike = Mapping[str, str] | Iterable[tuple[str, str]]


def new_nonce() -> str:
    """16 random bytes: unguessable, so nobody else's delivery can land on this path."""
    return secrets.token_urlsafe(16)


def with_nonce(webhook_url: str, nonce: str) -> str:
    """``webhook_url`` with ``/s/<nonce>`` appended to its path (query and fragment kept)."""
    parts = urlsplit(webhook_url)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/s/{nonce}"))


# --------------------------------------------------------------------------- errors


class WebhookError(Exception):
    """A delivery that must not be trusted. ``status_code`` is what a receiver answers."""

    status_code = 400
    reason = "invalid_webhook"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoSecretConfiguredError(WebhookError):
    """:func:`verify` was called without any secret: nothing can be verified."""

    status_code = 500
    reason = "no_secret_configured"


class MissingSignatureError(WebhookError):
    """No ``X-EggAPI-Signature`` header (EggAPI sends none before a secret exists)."""

    status_code = 401
    reason = "missing_signature"


class MissingTimestampError(WebhookError):
    status_code = 401
    reason = "missing_timestamp"


class InvalidSignatureFormatError(WebhookError):
    """The signature header is not exactly ``sha256=`` followed by 64 hex digits."""

    status_code = 400
    reason = "bad_signature_format"


class InvalidTimestampError(WebhookError):
    """The timestamp header is not a plain decimal Unix time in seconds."""

    status_code = 400
    reason = "bad_timestamp_format"


class SignatureMismatchError(WebhookError):
    """The signature matches none of the configured secrets."""

    status_code = 401
    reason = "signature_mismatch"


class TimestampOutOfToleranceError(WebhookError):
    status_code = 401
    reason = "timestamp_out_of_tolerance"

    def __init__(self, message: str, *, timestamp: int, now: float, tolerance: float) -> None:
        super().__init__(message)
        self.timestamp = timestamp
        self.now = now
        self.tolerance = tolerance


class StaleTimestampError(TimestampOutOfToleranceError):
    """Signed more than ``tolerance`` seconds ago: possibly a replay."""

    reason = "stale_timestamp"


class FutureTimestampError(TimestampOutOfToleranceError):
    """Signed more than ``tolerance`` seconds in the future."""

    reason = "future_timestamp"


class MalformedPayloadError(WebhookError):
    """The (authentic) body is not a JSON object with ``event``, ``task_id`` and ``status``."""

    status_code = 400
    reason = "malformed_payload"


# --------------------------------------------------------------------------- signing


def _secret_bytes(secret: SecretLike) -> bytes:
    if isinstance(secret, SecretStr):
        secret = secret.get_secret_value()
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not secret:
        raise ValueError("webhook secret must not be empty")
    return secret


def coerce_secrets(secrets: SecretLike | Iterable[SecretLike] | None) -> list[SecretStr]:
    """Secrets as a list of :class:`SecretStr`, dropping empty ones."""
    if secrets is None:
        return []
    if isinstance(secrets, SecretStr | str | bytes):
        secrets = [secrets]
    out: list[SecretStr] = []
    for secret in secrets:
        if isinstance(secret, bytes):
            secret = secret.decode("utf-8")
        value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
        if value.strip():
            out.append(SecretStr(value.strip()))
    return out


def compute_signature(secret: SecretLike, timestamp: int | str, raw_body: bytes) -> str:
    """Lower-case hex of HMAC-SHA256(secret, ``"{timestamp}.{raw_body}"``) (no prefix)."""
    message = str(timestamp).encode("ascii") + b"." + raw_body
    return hmac.new(_secret_bytes(secret), message, hashlib.sha256).hexdigest()


def sign(secret: SecretLike, timestamp: int | str, raw_body: bytes) -> str:
    """The ``X-EggAPI-Signature`` value: ``"sha256=" + compute_signature(...)``."""
    return SIGNATURE_PREFIX + compute_signature(secret, timestamp, raw_body)


# --------------------------------------------------------------------------- verification


def _header_values(headers: HeadersLike, name: str) -> list[str]:
    getlist = getattr(headers, "getlist", None)
    if callable(getlist):  # Starlette/werkzeug multi-dicts: catch repeated headers
        return [str(v) for v in getlist(name)]
    get_list = getattr(headers, "get_list", None)  # httpx.Headers
    if callable(get_list):
        return [str(v) for v in get_list(name)]
    wanted = name.lower()
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [str(v) for k, v in items if str(k).lower() == wanted]


def _single_header(headers: HeadersLike, name: str) -> str | None:
    values = _header_values(headers, name)
    if not values:
        return None
    if len(values) > 1:
        error = InvalidSignatureFormatError if name == SIGNATURE_HEADER else InvalidTimestampError
        raise error(f"{name} header appears {len(values)} times; expected exactly once")
    return values[0]


def parse_timestamp(value: str | None) -> int:
    if value is None or value == "":
        raise MissingTimestampError(f"missing {TIMESTAMP_HEADER} header")
    if not _TIMESTAMP_RE.fullmatch(value):
        raise InvalidTimestampError(
            f"{TIMESTAMP_HEADER} must be a Unix time in seconds (decimal digits only)"
        )
    return int(value)


def parse_signature(value: str | None) -> str:
    """The lower-case hex digest from a ``sha256=<64 hex>`` header value."""
    if value is None or value == "":
        raise MissingSignatureError(f"missing {SIGNATURE_HEADER} header")
    match = _SIGNATURE_RE.fullmatch(value)
    if match is None:
        raise InvalidSignatureFormatError(
            f"{SIGNATURE_HEADER} must be 'sha256=' followed by 64 hex digits"
        )
    return match.group(1).lower()


def parse_payload(raw_body: bytes) -> WebhookPayload:
    """Decode a body (verified or knowingly unsigned) into a :class:`WebhookPayload`."""
    try:
        data: Any = json.loads(raw_body)
    except (ValueError, UnicodeDecodeError):
        raise MalformedPayloadError("body is not valid UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise MalformedPayloadError("body must be a JSON object")
    for key in ("event", "task_id", "status"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise MalformedPayloadError(f"body must have a non-empty string {key!r}")
    task_id = data["task_id"]
    if len(task_id) > 128 or task_id != task_id.strip() or "/" in task_id or "?" in task_id:
        raise MalformedPayloadError("task_id is not a plausible EggAPI task id")
    try:
        return WebhookPayload.model_validate(data)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        raise MalformedPayloadError(f"body has invalid fields: {', '.join(fields)}") from None


def verify(
    raw_body: bytes,
    headers: HeadersLike,
    secrets: SecretLike | Sequence[SecretLike],
    *,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> WebhookPayload:
    """Verify one delivery and return its payload; raise a :class:`WebhookError` otherwise.

    ``raw_body`` must be the bytes as received. ``headers`` is any mapping (case-insensitive
    lookup) or list of pairs; repeated signature or timestamp headers are rejected. Every
    secret in ``secrets`` is tried (rotation), each in constant time.
    """
    keys = coerce_secrets(secrets)
    if not keys:
        raise NoSecretConfiguredError("no webhook secret configured; cannot verify")
    signature = parse_signature(_single_header(headers, SIGNATURE_HEADER))
    timestamp_text = _single_header(headers, TIMESTAMP_HEADER)
    timestamp = parse_timestamp(timestamp_text)
    assert timestamp_text is not None
    matched = False
    for key in keys:  # no early exit: time does not tell which secret matched
        expected = compute_signature(key, timestamp_text, raw_body)
        matched |= hmac.compare_digest(expected.encode("ascii"), signature.encode("ascii"))
    if not matched:
        raise SignatureMismatchError("signature does not match any configured webhook secret")
    current = time.time() if now is None else now
    if timestamp < current - tolerance:
        raise StaleTimestampError(
            f"timestamp is {current - timestamp:.0f}s old (tolerance {tolerance:g}s)",
            timestamp=timestamp,
            now=current,
            tolerance=tolerance,
        )
    if timestamp > current + tolerance:
        raise FutureTimestampError(
            f"timestamp is {timestamp - current:.0f}s in the future (tolerance {tolerance:g}s)",
            timestamp=timestamp,
            now=current,
            tolerance=tolerance,
        )
    return parse_payload(raw_body)
