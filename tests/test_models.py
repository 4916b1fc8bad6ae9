"""Request validation (a catalogue of bad inputs) and lenient response parsing.

Invalid requests must fail before any HTTP call, naming the field (eggapi-api.md §7.1, DESIGN
"Bad input and secrets"); responses must parse in every documented generation's style (§7.2, §8).
"""

from __future__ import annotations

from datetime import UTC, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
import respx
from pydantic import ValidationError

from prefect_eggapi.client import EggAPIClient
from prefect_eggapi.client.errors import InvalidRequestError
from prefect_eggapi.client.types import (
    EditFields,
    EggAPITask,
    GenerateFields,
    GenerateRequest,
    TaskPage,
    TaskStatus,
    UsagePage,
    UsageSummaryItem,
    WebhookPayload,
)

API = "https://api.test"
KEY = "egg_sk_models_unit_test_key_000000"
BASE: dict[str, Any] = {"model": "nanobanana", "prompt": "a red apple on a table"}
URL = "https://example.com/in.png"


def without(*keys: str) -> dict[str, Any]:
    return {k: v for k, v in BASE.items() if k not in keys}


# (id, fields, offending field) -- each a distinct way to be wrong.
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("prompt-2001-chars", {**BASE, "prompt": "x" * 2001}, "prompt"),
    ("prompt-empty", {**BASE, "prompt": ""}, "prompt"),
    ("prompt-whitespace-only", {**BASE, "prompt": " \t\n  "}, "prompt"),
    ("prompt-int", {**BASE, "prompt": 123}, "prompt"),
    ("prompt-none", {**BASE, "prompt": None}, "prompt"),
    ("prompt-list", {**BASE, "prompt": ["a", "b"]}, "prompt"),
    ("prompt-missing", without("prompt"), "prompt"),
    ("negative-prompt-1001", {**BASE, "negative_prompt": "n" * 1001}, "negative_prompt"),
    ("negative-prompt-int", {**BASE, "negative_prompt": 5}, "negative_prompt"),
    ("aspect-1:1", {**BASE, "aspect_ratio": "1:1"}, "aspect_ratio"),
    ("aspect-16x9", {**BASE, "aspect_ratio": "16x9"}, "aspect_ratio"),
    ("aspect-trailing-space", {**BASE, "aspect_ratio": "16:9 "}, "aspect_ratio"),
    ("aspect-none", {**BASE, "aspect_ratio": None}, "aspect_ratio"),
    ("num-outputs-0", {**BASE, "num_outputs": 0}, "num_outputs"),
    ("num-outputs-5", {**BASE, "num_outputs": 5}, "num_outputs"),
    ("num-outputs-negative", {**BASE, "num_outputs": -1}, "num_outputs"),
    ("num-outputs-str", {**BASE, "num_outputs": "2"}, "num_outputs"),
    ("num-outputs-bool", {**BASE, "num_outputs": True}, "num_outputs"),
    ("num-outputs-float", {**BASE, "num_outputs": 1.5}, "num_outputs"),
    ("num-outputs-integral-float", {**BASE, "num_outputs": 2.0}, "num_outputs"),
    ("resolution-4K-upper", {**BASE, "resolution": "4K"}, "resolution"),
    ("resolution-8k", {**BASE, "resolution": "8k"}, "resolution"),
    ("resolution-empty", {**BASE, "resolution": ""}, "resolution"),
    ("resolution-int", {**BASE, "resolution": 4}, "resolution"),
    ("image-urls-10", {**BASE, "image_urls": [URL] * 10}, "image_urls"),
    ("image-urls-ftp", {**BASE, "image_urls": ["ftp://example.com/a.png"]}, "image_urls"),
    ("image-urls-relative", {**BASE, "image_urls": ["/images/a.png"]}, "image_urls"),
    ("image-urls-no-scheme", {**BASE, "image_urls": ["example.com/a.png"]}, "image_urls"),
    ("image-urls-space", {**BASE, "image_urls": ["https://example.com/a b.png"]}, "image_urls"),
    ("image-urls-leading-space", {**BASE, "image_urls": [" " + URL]}, "image_urls"),
    ("image-urls-no-host", {**BASE, "image_urls": ["https://"]}, "image_urls"),
    ("image-urls-bad-ipv6", {**BASE, "image_urls": ["http://[::1/a.png"]}, "image_urls"),
    ("image-urls-bare-string", {**BASE, "image_urls": URL}, "image_urls"),
    ("image-urls-int", {**BASE, "image_urls": 5}, "image_urls"),
    ("image-urls-dict", {**BASE, "image_urls": {"url": URL}}, "image_urls"),
    ("image-urls-item-int", {**BASE, "image_urls": [URL, 123]}, "image_urls"),
    (
        "image-urls-second-bad",
        {**BASE, "image_urls": [URL, "data:image/png;base64,AA"]},
        "image_urls",
    ),
    (
        "webhook-2049-chars",
        {**BASE, "webhook_url": "https://hooks.example.com/" + "a" * (2049 - 26)},
        "webhook_url",
    ),
    ("webhook-not-a-url", {**BASE, "webhook_url": "not-a-url"}, "webhook_url"),
    ("webhook-ftp", {**BASE, "webhook_url": "ftp://hooks.example.com/x"}, "webhook_url"),
    ("webhook-javascript", {**BASE, "webhook_url": "javascript:alert(1)"}, "webhook_url"),
    ("webhook-space", {**BASE, "webhook_url": "https://hooks.example.com/a b"}, "webhook_url"),
    ("webhook-int", {**BASE, "webhook_url": 42}, "webhook_url"),
    ("unknown-field-num_output", {**BASE, "num_output": 2}, "num_output"),
    ("unknown-field-image_url", {**BASE, "image_url": URL}, "image_url"),
    ("unknown-field-negativePrompt", {**BASE, "negativePrompt": "blurry"}, "negativePrompt"),
    ("model-nanobanana-ultra", {**BASE, "model": "nanobanana-ultra"}, "model"),
    ("model-wrong-case", {**BASE, "model": "NanoBanana"}, "model"),
    ("model-catalog-name", {**BASE, "model": "nano-banana"}, "model"),
    ("model-veo", {**BASE, "model": "veo3.1"}, "model"),
    ("model-none", {**BASE, "model": None}, "model"),
    ("model-missing", without("model"), "model"),
]
assert len({case_id for case_id, _, _ in INVALID}) == len(INVALID) >= 30


def names(exc: InvalidRequestError) -> set[str]:
    return {field.split(".")[0] for field, _ in exc.problems}


@pytest.mark.parametrize(("fields", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_request_is_rejected_naming_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        GenerateRequest(**fields)
    exc = info.value
    assert field in names(exc), exc.problems
    assert field in str(exc)
    assert str(exc).startswith("invalid GenerateRequest: ")
    assert isinstance(exc, ValueError)
    assert exc.classification.value == "terminal"


@pytest.mark.parametrize(("fields", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_parse_rejects_the_same_inputs(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        GenerateRequest.parse(fields)
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({**BASE, "model": "nanobanana-ultra"}, "model"),
        ({**BASE, "prompt": ""}, "prompt"),
        ({**BASE, "num_output": 2}, "num_output"),
    ],
)
def test_parse_reports_the_same_problems_as_the_constructor(
    fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidRequestError) as direct:
        GenerateRequest(**fields)
    with pytest.raises(InvalidRequestError) as parsed:
        GenerateRequest.parse(fields)
    assert parsed.value.problems == direct.value.problems
    assert str(parsed.value) == str(direct.value)


@pytest.mark.parametrize(("fields", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_request_makes_no_http_call(fields: dict[str, Any], field: str) -> None:
    with (
        respx.mock(base_url=API, assert_all_called=False) as mock,
        EggAPIClient(KEY, API, rate_limit=None) as client,
    ):
        route = mock.post("/v1/generate").respond(202, json={"data": {"id": "g", "status": "x"}})
        anything = mock.route()
        with pytest.raises(InvalidRequestError) as info:
            client.generate(**fields)
        assert field in str(info.value)
        assert route.call_count == 0
        assert anything.call_count == 0


def test_error_message_does_not_echo_long_input() -> None:
    with pytest.raises(InvalidRequestError) as info:
        GenerateRequest(**{**BASE, "prompt": "Z" * 2001})
    assert "Z" * 50 not in str(info.value)
    assert "2000" in str(info.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(InvalidRequestError) as info:
        GenerateRequest(model="nanobanana-ultra", prompt="", num_outputs=9, aspect_ratio="1:1")
    assert names(info.value) == {"model", "prompt", "num_outputs", "aspect_ratio"}


def test_image_url_problem_names_the_index() -> None:
    with pytest.raises(InvalidRequestError, match=r"image_urls\[1\]"):
        GenerateRequest(**BASE, image_urls=[URL, "ftp://x/y.png"])


# --------------------------------------------------------------------------- valid edges


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"prompt": "p" * 2000}, id="prompt-exactly-2000"),
        pytest.param({"prompt": "é" * 2000}, id="prompt-2000-non-ascii"),
        pytest.param({"prompt": "x"}, id="prompt-1-char"),
        pytest.param({"negative_prompt": "n" * 1000}, id="negative-exactly-1000"),
        pytest.param({"negative_prompt": ""}, id="negative-empty"),
        pytest.param({"num_outputs": 4}, id="4-outputs"),
        pytest.param({"num_outputs": 1}, id="1-output"),
        pytest.param({"image_urls": [f"https://ex.com/{i}.png" for i in range(9)]}, id="9-urls"),
        pytest.param({"image_urls": ("http://ex.com/a.png",)}, id="http-url-tuple"),
        pytest.param({"image_urls": []}, id="no-urls"),
        pytest.param(
            {"webhook_url": "https://hooks.example.com/" + "a" * (2048 - 26)}, id="webhook-2048"
        ),
        pytest.param({"aspect_ratio": "9:16"}, id="portrait"),
        pytest.param({"resolution": "1k"}, id="1k"),
        pytest.param({"resolution": "2k"}, id="2k"),
        pytest.param({"resolution": "4k", "model": "nanobanana-pro"}, id="pro-4k"),
    ],
)
def test_valid_edge_cases_are_accepted(extra: dict[str, Any]) -> None:
    req = GenerateRequest(**{**BASE, **extra})
    for key, value in extra.items():
        got = getattr(req, key)
        assert (list(got) if isinstance(got, tuple) else got) == (
            list(value) if isinstance(value, list | tuple) else value
        )


def test_defaults_and_edit_mode() -> None:
    req = GenerateRequest(**BASE)
    assert (req.aspect_ratio, req.num_outputs, req.resolution) == ("16:9", 1, None)
    assert (req.is_edit, req.task_type) == (False, "image_generate")
    edit = GenerateRequest(**BASE, image_urls=[URL])
    assert (edit.is_edit, edit.task_type) == (True, "image_edit")
    assert edit.image_urls == (URL,)


def test_requests_are_frozen() -> None:
    req = GenerateRequest(**BASE)
    with pytest.raises(ValidationError):
        req.prompt = "changed"  # type: ignore[misc]


# --------------------------------------------------------------------------- payload


def test_minimal_payload_matches_the_g3_example_body() -> None:
    # eggapi-api.md §16.1, G3 "Create a Task": {model, prompt, aspect_ratio "16:9", num_outputs 1}
    assert GenerateRequest(**BASE).to_payload() == {
        "model": "nanobanana",
        "prompt": "a red apple on a table",
        "aspect_ratio": "16:9",
        "num_outputs": 1,
    }


def test_full_payload_equals_the_g2_example_request() -> None:
    documented = {
        "model": "nanobanana-pro",
        "prompt": "A futuristic cityscape at night, cyberpunk style",
        "negative_prompt": "blurry, low quality",
        "aspect_ratio": "16:9",
        "resolution": "2k",
        "num_outputs": 2,
        "webhook_url": "https://webhook.site/your-webhook-id",
    }
    assert GenerateRequest.parse(documented).to_payload() == documented


def test_edit_payload_sends_image_urls_as_a_json_list() -> None:
    body = GenerateRequest(**BASE, image_urls=(URL, "https://example.com/2.png")).to_payload()
    assert body["image_urls"] == [URL, "https://example.com/2.png"]
    assert isinstance(body["image_urls"], list)
    assert "webhook_url" not in body and "resolution" not in body


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_and_hex_sha256() -> None:
    a = GenerateRequest(**BASE, negative_prompt="blurry", resolution="2k")
    b = GenerateRequest(resolution="2k", negative_prompt="blurry", **BASE)
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64
    int(a.fingerprint(), 16)


def test_fingerprint_ignores_webhook_url_and_explicit_defaults() -> None:
    plain = GenerateRequest(**BASE)
    assert plain.fingerprint() == GenerateRequest(**BASE, webhook_url=URL).fingerprint()
    explicit = GenerateRequest(**BASE, aspect_ratio="16:9", num_outputs=1)
    assert plain.fingerprint() == explicit.fingerprint()


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a green apple on a table"},
        {"prompt": "a red apple on a table "},
        {"model": "nanobanana-pro"},
        {"negative_prompt": "blurry"},
        {"aspect_ratio": "9:16"},
        {"num_outputs": 2},
        {"resolution": "4k"},
        {"image_urls": [URL]},
    ],
)
def test_fingerprint_changes_with_what_determines_the_output(change: dict[str, Any]) -> None:
    assert (
        GenerateRequest(**BASE).fingerprint() != GenerateRequest(**{**BASE, **change}).fingerprint()
    )


def test_fingerprint_depends_on_image_order() -> None:
    one = GenerateRequest(**BASE, image_urls=[URL, "https://example.com/2.png"])
    two = GenerateRequest(**BASE, image_urls=["https://example.com/2.png", URL])
    assert one.fingerprint() != two.fingerprint()


# --------------------------------------------------------------------------- responses

G1_PENDING = {
    "id": "task_abc123",
    "status": "pending",
    "model": "veo3.1",
    "type": "video_generate",
    "output": None,
    "error": None,
    "cost": "$0.0000",
    "created_at": "2024-01-15T10:30:00Z",
    "started_at": None,
    "completed_at": None,
}
G3_PENDING = {
    "id": "gen_abc123def456",
    "status": "pending",
    "model": "nanobanana",
    "type": "image_generate",
    "cost": "$0.00",
    "created_at": "2026-05-08T10:30:00Z",
}
G3_COMPLETED = {
    "id": "gen_abc123def456",
    "status": "completed",
    "model": "nanobanana",
    "type": "image_generate",
    "output": {
        "url": "https://file.eggapi.ai/images/gen_abc123def456/0.png",
        "urls": ["https://file.eggapi.ai/images/gen_abc123def456/0.png"],
    },
    "cost": "$0.0100",
    "created_at": "2026-05-08T10:30:00Z",
    "started_at": "2026-05-08T10:30:01Z",
    "completed_at": "2026-05-08T10:30:10Z",
}
G2_FAILED = {
    "id": "gen_abc123def456",
    "status": "failed",
    "model": "nanobanana-pro",
    "type": "image_generate",
    "error": "Content moderation: prompt contains prohibited content",
    "cost": "$0.00",
    "created_at": "2025-12-25T21:03:47.879577+08:00",
    "started_at": "2025-12-25T21:03:50.000000+08:00",
    "completed_at": "2025-12-25T21:04:10.000000+08:00",
}


@pytest.mark.parametrize("body", [G1_PENDING, G3_PENDING], ids=["g1-nulls", "g3-missing"])
def test_pending_task_parses_in_both_styles(body: dict[str, Any]) -> None:
    task = EggAPITask.model_validate(body)
    assert task.status is TaskStatus.PENDING
    assert not task.is_terminal
    assert task.output is None and task.error is None
    assert task.started_at is None and task.completed_at is None
    assert task.output_urls == []
    assert task.cost_amount == Decimal("0")
    assert task.queue_seconds is None and task.processing_seconds is None
    assert task.created_at is not None and task.created_at.utcoffset() == timedelta(0)


def test_completed_task_parses_outputs_cost_and_durations() -> None:
    task = EggAPITask.model_validate(G3_COMPLETED)
    assert task.status is TaskStatus.COMPLETED and task.is_terminal
    assert task.output_urls == ["https://file.eggapi.ai/images/gen_abc123def456/0.png"]
    assert task.cost_amount == Decimal("0.01")
    assert task.queue_seconds == 1.0
    assert task.processing_seconds == 9.0


def test_g2_timestamps_with_offset_and_microseconds() -> None:
    task = EggAPITask.model_validate(G2_FAILED)
    assert task.created_at is not None
    assert task.created_at.utcoffset() == timedelta(hours=8)
    assert task.created_at.microsecond == 879577
    assert task.created_at.astimezone(UTC).hour == 13
    assert task.queue_seconds == pytest.approx(2.120423)
    assert task.processing_seconds == 20.0
    assert task.status is TaskStatus.FAILED and task.is_terminal
    assert task.error is not None and task.error.startswith("Content moderation")


@pytest.mark.parametrize("status", ["cancelled", "timeout", "PENDING", ""])
def test_unknown_status_parses_as_unknown_and_is_not_terminal(status: str) -> None:
    task = EggAPITask.model_validate({**G3_PENDING, "status": status})
    assert task.status is TaskStatus.UNKNOWN
    assert not task.is_terminal


def test_output_with_only_url_or_only_urls() -> None:
    only_url = EggAPITask.model_validate({**G3_COMPLETED, "output": {"url": "https://cdn/a.png"}})
    assert only_url.output_urls == ["https://cdn/a.png"]
    many = ["https://f/0.png", "https://f/1.png"]
    only_urls = EggAPITask.model_validate({**G3_COMPLETED, "output": {"urls": many}})
    assert only_urls.output_urls == many
    empty = EggAPITask.model_validate({**G3_COMPLETED, "output": {"url": None, "urls": []}})
    assert empty.output_urls == []


def test_unknown_keys_are_kept_for_forward_compatibility() -> None:
    task = EggAPITask.model_validate({**G3_COMPLETED, "usage": {"units": 1}, "provider": "x"})
    assert task.model_extra == {"usage": {"units": 1}, "provider": "x"}


@pytest.mark.parametrize("missing", ["id", "status"])
def test_task_without_id_or_status_is_rejected(missing: str) -> None:
    with pytest.raises(ValidationError):
        EggAPITask.model_validate({k: v for k, v in G3_PENDING.items() if k != missing})


def test_task_page_and_usage_parse() -> None:
    page = TaskPage.model_validate(
        {
            "items": [G3_COMPLETED, G3_PENDING],
            "pagination": {"page": 1, "per_page": 20, "total": 100, "total_pages": 5},
        }
    )
    assert [t.status for t in page.items] == [TaskStatus.COMPLETED, TaskStatus.PENDING]
    assert page.pagination.total_pages == 5
    assert TaskPage.model_validate({}).items == []
    usage = UsagePage.model_validate(
        {
            "items": [
                {
                    "task_id": "gen_1",
                    "model": "nanobanana",
                    "type": "image_generate",
                    "units": 1,
                    "cost": "$0.0100",
                    "created_at": "2026-05-08T10:30:10Z",
                }
            ]
        }
    )
    assert usage.items[0].units == 1
    summary = UsageSummaryItem.model_validate(
        {"model": "nanobanana", "total_units": 3, "total_cost": "$0.0300", "request_count": 2}
    )
    assert summary.total_cost_amount == Decimal("0.03")


def test_g2_webhook_payload_parses() -> None:
    payload = WebhookPayload.model_validate(
        {
            "event": "task.completed",
            "task_id": "gen_abc123def456",
            "status": "completed",
            "model": "nanobanana-pro",
            "output": {"url": "https://cdn.eggapi.ai/outputs/abc123.png"},
            "error": None,
            "cost": "0.016000",
            "timestamp": 1767000000,
        }
    )
    assert payload.status is TaskStatus.COMPLETED
    assert payload.output is not None
    assert payload.output.all_urls == ["https://cdn.eggapi.ai/outputs/abc123.png"]
    assert payload.timestamp == 1767000000


def test_task_round_trips_through_json() -> None:
    task = EggAPITask.model_validate(G2_FAILED)
    again = EggAPITask.model_validate_json(task.model_dump_json())
    assert again == task
    assert httpx.Response(200, json={"data": G2_FAILED}).json()["data"]["id"] == task.id


def test_the_client_keywords_name_every_request_field() -> None:
    """``generate(**fields)`` / ``edit(urls, **fields)`` are typed by GenerateFields/EditFields:
    a field added to the model must be added there too, or mypy would reject it at call sites."""
    assert set(GenerateFields.__annotations__) | set(EditFields.__annotations__) == set(
        GenerateRequest.model_fields
    )
    assert set(GenerateRequest.model_fields) - set(EditFields.__annotations__) == {"image_urls"}
