"""Signature verification (``webhooks.verify``), against independently computed vectors.

The hard-coded vector was computed with ``openssl dgst -sha256 -hmac``; the others with ``hmac``
in this file. Every attack is one test that must raise its own typed error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys

import pytest
from pydantic import SecretStr

from prefect_eggapi.webhooks.verify import (
    FutureTimestampError,
    InvalidSignatureFormatError,
    InvalidTimestampError,
    MalformedPayloadError,
    MissingSignatureError,
    MissingTimestampError,
    NoSecretConfiguredError,
    SignatureMismatchError,
    StaleTimestampError,
    WebhookError,
    compute_signature,
    sign,
    verify,
)

SECRET = "whsec_test_secret"
TS = 1767225600
# printf '%s' '1767225600.{"event":...}' | openssl dgst -sha256 -hmac whsec_test_secret
KNOWN_BODY = b'{"event":"task.completed","task_id":"gen_abc123def456","status":"completed"}'
KNOWN_SIGNATURE = "013635fcbdfd63f9275c864257ca9ab748ffbdf080784dbeac1157fdba814fcb"
KNOWN_EMPTY_BODY_SIGNATURE = "2101ed4de13a3847b9130080a81eb77b7a3727702e4665f5d4fc9fb89133b2e2"

BODY = json.dumps(
    {
        "event": "task.completed",
        "task_id": "gen_abc123def456",
        "status": "completed",
        "model": "nanobanana-pro",
        "output": {"url": "https://cdn.example/0.png", "urls": ["https://cdn.example/0.png"]},
        "error": None,
        "cost": "0.016000",
        "timestamp": TS,
    },
    indent=1,  # deliberately not compact: re-serialising would change the bytes
).encode()


def independent_signature(secret: str, timestamp: int | str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def headers(body: bytes = BODY, ts: int | str = TS, secret: str = SECRET) -> dict[str, str]:
    return {
        "X-EggAPI-Timestamp": str(ts),
        "X-EggAPI-Signature": independent_signature(secret, ts, body),
    }


def test_sign_matches_hard_coded_openssl_vectors() -> None:
    assert sign(SECRET, TS, KNOWN_BODY) == "sha256=" + KNOWN_SIGNATURE
    assert compute_signature(SecretStr(SECRET), str(TS), b"") == KNOWN_EMPTY_BODY_SIGNATURE
    assert independent_signature(SECRET, TS, KNOWN_BODY) == "sha256=" + KNOWN_SIGNATURE


def test_verify_accepts_the_known_vector_and_returns_the_payload() -> None:
    sent = {"X-EggAPI-Timestamp": str(TS), "X-EggAPI-Signature": "sha256=" + KNOWN_SIGNATURE}
    payload = verify(KNOWN_BODY, sent, [SecretStr(SECRET)], now=TS + 1)
    assert (payload.task_id, payload.status.value, payload.event) == (
        "gen_abc123def456",
        "completed",
        "task.completed",
    )


def test_verify_uses_the_raw_body_not_reserialised_json() -> None:
    payload = verify(BODY, headers(), [SECRET], now=TS)
    assert payload.cost == "0.016000"
    assert payload.output is not None and payload.output.all_urls == ["https://cdn.example/0.png"]
    compact = json.dumps(json.loads(BODY), separators=(",", ":")).encode()
    with pytest.raises(SignatureMismatchError):
        verify(compact, headers(), [SECRET], now=TS)


def test_header_names_are_case_insensitive_and_pairs_work() -> None:
    lowered = {k.lower(): v for k, v in headers().items()}
    assert verify(BODY, lowered, [SECRET], now=TS).task_id == "gen_abc123def456"
    assert verify(BODY, list(headers().items()), [SECRET], now=TS).status.value == "completed"


def test_uppercase_hex_is_the_same_signature() -> None:
    sent = headers()
    sent["X-EggAPI-Signature"] = "sha256=" + sent["X-EggAPI-Signature"][7:].upper()
    assert verify(BODY, sent, [SECRET], now=TS).task_id == "gen_abc123def456"


def test_rotation_accepts_either_secret_and_nothing_else() -> None:
    secrets = [SecretStr("whsec_new"), SecretStr("whsec_old")]
    assert verify(BODY, headers(secret="whsec_old"), secrets, now=TS)
    assert verify(BODY, headers(secret="whsec_new"), secrets, now=TS)
    with pytest.raises(SignatureMismatchError):
        verify(BODY, headers(secret="whsec_older"), secrets, now=TS)


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda h, b: (h, b + b" "), SignatureMismatchError),  # tampered body
        (lambda h, b: ({**h, "X-EggAPI-Timestamp": str(TS + 1)}, b), SignatureMismatchError),
        (lambda h, b: (headers(secret="wrong"), b), SignatureMismatchError),
        (lambda h, b: ({"X-EggAPI-Timestamp": str(TS)}, b), MissingSignatureError),
        (lambda h, b: ({**h, "X-EggAPI-Signature": ""}, b), MissingSignatureError),
        (lambda h, b: ({"X-EggAPI-Signature": h["X-EggAPI-Signature"]}, b), MissingTimestampError),
    ],
    ids=["body", "timestamp", "secret", "no-signature", "empty-signature", "no-timestamp"],
)
def test_tampering_and_missing_headers_are_rejected(mutate, error) -> None:  # type: ignore[no-untyped-def]
    sent, body = mutate(headers(), BODY)
    with pytest.raises(error) as info:
        verify(body, sent, [SECRET], now=TS)
    assert isinstance(info.value, WebhookError)
    assert 400 <= info.value.status_code < 500


@pytest.mark.parametrize(
    "value",
    [
        "sha1=" + "0" * 64,
        "sha256=" + "0" * 63,
        "sha256=" + "0" * 65,
        "sha256=" + "g" * 64,
        "SHA256=" + "0" * 64,
        " sha256=" + "0" * 64,
        "sha256=" + "0" * 64 + ",sha256=" + "1" * 64,
        "0" * 64,
    ],
)
def test_signature_header_is_parsed_strictly(value: str) -> None:
    with pytest.raises(InvalidSignatureFormatError):
        verify(BODY, {**headers(), "X-EggAPI-Signature": value}, [SECRET], now=TS)


@pytest.mark.parametrize("value", ["-1767225600", "+1767225600", "1767225600.5", "17e8", " 1", "x"])
def test_timestamp_header_is_parsed_strictly(value: str) -> None:
    sent = {"X-EggAPI-Timestamp": value, "X-EggAPI-Signature": headers()["X-EggAPI-Signature"]}
    with pytest.raises(InvalidTimestampError):
        verify(BODY, sent, [SECRET], now=TS)


def test_repeated_headers_are_rejected() -> None:
    sent = headers()
    pairs = [*sent.items(), ("x-eggapi-signature", sent["X-EggAPI-Signature"])]
    with pytest.raises(InvalidSignatureFormatError):
        verify(BODY, pairs, [SECRET], now=TS)


def test_timestamp_tolerance_in_both_directions() -> None:
    assert verify(BODY, headers(), [SECRET], now=TS + 300)
    assert verify(BODY, headers(), [SECRET], now=TS - 300)
    with pytest.raises(StaleTimestampError):
        verify(BODY, headers(), [SECRET], now=TS + 301)
    with pytest.raises(FutureTimestampError):
        verify(BODY, headers(), [SECRET], now=TS - 301)
    with pytest.raises(StaleTimestampError):
        verify(BODY, headers(), [SECRET], now=TS + 11, tolerance=10)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"event": "task.completed", "status": "completed"}',
        b'{"event": "task.completed", "task_id": 5, "status": "completed"}',
        b'{"event": "task.completed", "task_id": "../x", "status": "completed"}',
        b'{"event": "task.completed", "task_id": "gen_x", "status": "completed", "output": 3}',
        b"\xff\xfe",
    ],
)
def test_authentic_but_malformed_bodies_are_rejected(body: bytes) -> None:
    with pytest.raises(MalformedPayloadError):
        verify(body, headers(body), [SECRET], now=TS)


def test_no_secret_configured_is_an_error_not_a_pass() -> None:
    with pytest.raises(NoSecretConfiguredError):
        verify(BODY, headers(), [], now=TS)
    with pytest.raises(NoSecretConfiguredError):
        verify(BODY, headers(), [SecretStr("  ")], now=TS)


def test_secrets_never_appear_in_errors() -> None:
    secret = "whsec_must_not_leak_123"
    errors: list[WebhookError] = []
    for sent, now in [
        (headers(secret="other"), TS),
        (headers(secret=secret), TS + 10_000),
        ({**headers(secret=secret), "X-EggAPI-Signature": "bad"}, TS),
    ]:
        with pytest.raises(WebhookError) as info:
            verify(BODY, sent, [SecretStr(secret)], now=now)
        errors.append(info.value)
    for error in errors:
        assert secret not in str(error) and secret not in repr(error)
        assert secret not in repr(error.__dict__)


def test_module_does_not_import_prefect() -> None:
    code = "import sys, prefect_eggapi.webhooks.verify; print('prefect' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"
