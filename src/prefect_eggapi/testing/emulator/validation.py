"""Decoding and validation of ``POST /v1/generate`` bodies, the way the Go backend does it.

Two stages, as with Go's ``encoding/json`` followed by go-playground/validator:

1. Decoding. Malformed JSON, a non-object body, or a value of the wrong JSON type
   (``"num_outputs": "2"``) is an unmarshal error: 400 ``BAD_REQUEST`` with Go's message, e.g.
   ``json: cannot unmarshal string into Go struct field GenerateRequest.num_outputs of type int``.
   Like Go, keys match field names exactly or else case-insensitively, unknown keys are ignored,
   ``null`` leaves a field unset, and a later duplicate key wins.
2. Validation. Rule failures are 400 ``VALIDATION_ERROR``; the message has one line per failed
   field, in struct order, joined by ``"\\n"``:
   ``Key: 'GenerateRequest.Prompt' Error:Field validation for 'Prompt' failed on the 'max' tag``.
   Integers behave like Go pointer fields with ``omitempty``: absent means default, an explicit
   ``0`` fails ``min``. Empty strings for optional fields mean "use the default".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

STRUCT = "GenerateRequest"
ASPECT_RATIOS = ("16:9", "9:16")
RESOLUTIONS = ("1k", "2k", "4k")
INT64_MAX = 2**63 - 1

# json name -> (Go field name, Go type)
_FIELDS: dict[str, tuple[str, str]] = {
    "model": ("Model", "string"),
    "prompt": ("Prompt", "string"),
    "negative_prompt": ("NegativePrompt", "string"),
    "aspect_ratio": ("AspectRatio", "string"),
    "num_outputs": ("NumOutputs", "int"),
    "resolution": ("Resolution", "string"),
    "image_urls": ("ImageURLs", "[]string"),
    "webhook_url": ("WebhookURL", "string"),
    "duration": ("Duration", "int"),
}


_FOLDED = {name.lower(): name for name in _FIELDS}


class RequestError(Exception):
    """A 400 answer: ``code`` is ``BAD_REQUEST`` or ``VALIDATION_ERROR``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class GenerateRequest:
    model: str
    prompt: str
    negative_prompt: str = ""
    aspect_ratio: str = "16:9"
    num_outputs: int = 1
    resolution: str = "1k"
    image_urls: list[str] = field(default_factory=list)
    webhook_url: str | None = None
    duration: int | None = None

    @property
    def task_type(self) -> str:
        return "image_edit" if self.image_urls else "image_generate"


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _type_error(value: Any, json_name: str, go_type: str) -> RequestError:
    kind = _json_kind(value)
    if kind == "number" and go_type == "int":
        kind = f"number {json.dumps(value)}"
    return RequestError(
        "BAD_REQUEST",
        f"json: cannot unmarshal {kind} into Go struct field "
        f"{STRUCT}.{json_name} of type {go_type}",
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid character '{name[0]}' looking for beginning of value")


def decode(body: bytes) -> dict[str, Any]:
    """Stage 1: bytes -> {json field name: Python value}, Go ``encoding/json`` semantics."""
    if not body.strip():
        raise RequestError("BAD_REQUEST", "Invalid request body: EOF")
    try:
        raw = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError("BAD_REQUEST", f"Invalid request body: {exc}") from None
    if not isinstance(raw, dict):
        raise RequestError(
            "BAD_REQUEST",
            f"json: cannot unmarshal {_json_kind(raw)} into Go value of type {STRUCT}",
        )
    decoded: dict[str, Any] = {}
    for key, value in raw.items():
        name = key if key in _FIELDS else _FOLDED.get(key.lower())
        if name is None or value is None:
            if name is not None:
                decoded.pop(name, None)
            continue
        go_type = _FIELDS[name][1]
        if go_type == "string":
            if not isinstance(value, str):
                raise _type_error(value, key, go_type)
        elif go_type == "int":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _type_error(value, key, go_type)
            if isinstance(value, float) or abs(value) > INT64_MAX:
                raise _type_error(value, key, go_type)
        else:
            if not isinstance(value, list):
                raise _type_error(value, key, go_type)
            items: list[str] = []
            for item in value:
                if item is None:
                    items.append("")
                elif isinstance(item, str):
                    items.append(item)
                else:
                    raise _type_error(item, key, "string")
            value = items
        decoded[name] = value
    return decoded


def is_valid_url(value: str) -> bool:
    """``http``/``https`` URL with a host (assumption 17.21: syntax only, never fetched)."""
    if not value or any(ch.isspace() or ord(ch) < 32 for ch in value):
        return False
    try:
        parts = urlsplit(value)
        _ = parts.port
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def _line(go_name: str, tag: str) -> str:
    key = f"{STRUCT}.{go_name}"
    return f"Key: '{key}' Error:Field validation for '{go_name}' failed on the '{tag}' tag"


def validate(data: dict[str, Any], allowed_models: list[str]) -> GenerateRequest:
    """Stage 2: Go-validator rules; raises ``RequestError("VALIDATION_ERROR", ...)``."""
    errors: list[str] = []
    model = data.get("model", "")
    if model == "":
        errors.append(_line("Model", "required"))
    elif model not in allowed_models:
        errors.append(_line("Model", "oneof"))
    prompt = data.get("prompt", "")
    if prompt == "":
        errors.append(_line("Prompt", "required"))
    elif len(prompt) > 2000:
        errors.append(_line("Prompt", "max"))
    negative_prompt = data.get("negative_prompt", "")
    if len(negative_prompt) > 1000:
        errors.append(_line("NegativePrompt", "max"))
    aspect_ratio = data.get("aspect_ratio", "")
    if aspect_ratio and aspect_ratio not in ASPECT_RATIOS:
        errors.append(_line("AspectRatio", "oneof"))
    num_outputs = data.get("num_outputs")
    if num_outputs is not None and num_outputs < 1:
        errors.append(_line("NumOutputs", "min"))
    elif num_outputs is not None and num_outputs > 4:
        errors.append(_line("NumOutputs", "max"))
    resolution = data.get("resolution", "")
    if resolution and resolution not in RESOLUTIONS:
        errors.append(_line("Resolution", "oneof"))
    image_urls: list[str] = data.get("image_urls", [])
    if len(image_urls) > 9:
        errors.append(_line("ImageURLs", "max"))
    else:
        for i, url in enumerate(image_urls):
            if not is_valid_url(url):
                errors.append(_line(f"ImageURLs[{i}]", "url"))
    webhook_url = data.get("webhook_url", "")
    if webhook_url and not is_valid_url(webhook_url):
        errors.append(_line("WebhookURL", "url"))
    elif len(webhook_url) > 2048:
        errors.append(_line("WebhookURL", "max"))
    duration = data.get("duration")
    if duration is not None and duration < 1:
        errors.append(_line("Duration", "min"))
    elif duration is not None and duration > 60:
        errors.append(_line("Duration", "max"))
    if errors:
        raise RequestError("VALIDATION_ERROR", "\n".join(errors))
    return GenerateRequest(
        model=model,
        prompt=prompt,
        negative_prompt=negative_prompt,
        aspect_ratio=aspect_ratio or "16:9",
        num_outputs=num_outputs if num_outputs is not None else 1,
        resolution=resolution or "1k",
        image_urls=image_urls,
        webhook_url=webhook_url or None,
        duration=duration,
    )


def parse_generate_body(body: bytes, allowed_models: list[str]) -> GenerateRequest:
    return validate(decode(body), allowed_models)
