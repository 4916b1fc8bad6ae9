"""Pydantic models at the edge of the EggAPI HTTP API.

Requests are strict and mirror the API's validation rules, so that a bad request fails here, naming
the field and the rule, before anything is paid for. Responses are lenient: keys may be missing or
null (the docs show both styles), timestamps may be any RFC 3339 form, unknown keys are kept.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Literal, Self, TypeAlias, TypedDict
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from prefect_eggapi.client.errors import InvalidRequestError
from prefect_eggapi.client.pricing import parse_cost

Model = Literal["nanobanana", "nanobanana-pro"]
AspectRatio = Literal["16:9", "9:16"]
Resolution = Literal["1k", "2k", "4k"]

MODELS: tuple[str, ...] = ("nanobanana", "nanobanana-pro")
MAX_PROMPT_CHARS = 2000
MAX_NEGATIVE_PROMPT_CHARS = 1000
MAX_IMAGE_URLS = 9
MAX_OUTPUTS = 4
MAX_WEBHOOK_URL_CHARS = 2048

# What JSON can hold: request bodies and the ``data`` of a response envelope.
JSONValue: TypeAlias = "str | int | float | bool | list[JSONValue] | dict[str, JSONValue] | None"
JSONObject: TypeAlias = "dict[str, JSONValue]"


def problems_from(exc: ValidationError) -> list[tuple[str, str]]:
    """Pydantic's errors as (field, rule) pairs, without echoing the (possibly long) input."""
    out = []
    for err in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(p) for p in err["loc"]) or "request"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not part of the EggAPI request)"
        out.append((field, msg))
    return out


def check_http_url(value: str, *, field: str = "url") -> str:
    """The API accepts only absolute http(s) URLs that it can fetch or call."""
    if value != value.strip() or any(c.isspace() for c in value):
        raise ValueError(f"{field} must not contain whitespace")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{field} must be an absolute http(s) URL")
    if not parts.hostname:
        raise ValueError(f"{field} must include a host")
    return value


class StrictModel(BaseModel):
    """Requests: unknown fields are typos, and typos cost money."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **data: object) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InvalidRequestError(problems_from(exc), what=type(self).__name__) from None

    @classmethod
    def parse(cls, data: object) -> Self:
        """Validate a mapping, raising :class:`InvalidRequestError` like the constructor."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise InvalidRequestError(
                [("request", "must be a mapping of fields")], what=cls.__name__
            )
        return cls(**data)


class GenerateRequest(StrictModel):
    """Body of ``POST /v1/generate``; ``image_urls`` turns it into an edit."""

    model: Model
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_NEGATIVE_PROMPT_CHARS)
    aspect_ratio: AspectRatio = "16:9"
    num_outputs: int = Field(default=1, ge=1, le=MAX_OUTPUTS, strict=True)
    resolution: Resolution | None = None
    image_urls: tuple[str, ...] = Field(default=(), max_length=MAX_IMAGE_URLS)
    webhook_url: str | None = Field(default=None, max_length=MAX_WEBHOOK_URL_CHARS)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain non-whitespace characters")
        return value

    @field_validator("image_urls", mode="before")
    @classmethod
    def _urls_sequence(cls, value: object) -> object:
        if isinstance(value, str):
            raise ValueError("must be a list of URLs, not a single string")
        return value

    @field_validator("image_urls")
    @classmethod
    def _urls_valid(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, url in enumerate(value):
            check_http_url(url, field=f"image_urls[{i}]")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook_valid(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value, field="webhook_url")

    @property
    def is_edit(self) -> bool:
        return bool(self.image_urls)

    @property
    def task_type(self) -> str:
        return "image_edit" if self.image_urls else "image_generate"

    def to_payload(self) -> JSONObject:
        """The JSON body: unset optional fields are left out so the server applies its defaults."""
        body: JSONObject = self.model_dump(exclude_none=True)
        if not self.image_urls:
            body.pop("image_urls")
        else:
            body["image_urls"] = list(self.image_urls)
        return body

    def fingerprint(self) -> str:
        """sha256 of what determines the output (not where the webhook goes)."""
        canonical = {
            "model": self.model,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "aspect_ratio": self.aspect_ratio,
            "resolution": self.resolution,
            "num_outputs": self.num_outputs,
            "image_urls": list(self.image_urls),
        }
        raw = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(raw.encode()).hexdigest()


class EditFields(TypedDict, total=False):
    """The keyword fields of ``edit(image_urls, **fields)``: a :class:`GenerateRequest`'s, less
    the images. Typed once here so the clients' signatures name every field (mypy flags a typo)
    while the values are still checked by the model, naming the field, before anything is paid."""

    model: Model
    prompt: str
    negative_prompt: str | None
    aspect_ratio: AspectRatio
    num_outputs: int
    resolution: Resolution | None
    webhook_url: str | None


class GenerateFields(EditFields, total=False):
    """The keyword fields of ``generate(**fields)``: every :class:`GenerateRequest` field."""

    image_urls: list[str] | tuple[str, ...]


# --------------------------------------------------------------------------- responses


class Lenient(BaseModel):
    """Responses: tolerate missing/null keys and keep unknown ones for forward compatibility."""

    model_config = ConfigDict(extra="allow", frozen=True)


class TaskStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    UNKNOWN = "unknown"

    @classmethod
    def _missing_(cls, value: object) -> TaskStatus:
        return cls.UNKNOWN

    @property
    def is_terminal(self) -> bool:
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED)


class TaskOutput(Lenient):
    url: str | None = None
    urls: list[str] | None = None

    @property
    def all_urls(self) -> list[str]:
        if self.urls:
            return list(self.urls)
        return [self.url] if self.url else []


def _aware(value: datetime | None) -> datetime | None:
    """RFC 3339 requires an offset; a timestamp without one is taken as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class EggAPITask(Lenient):
    """A generation or edit task as returned by ``GET /v1/tasks/{id}`` (and the 202)."""

    id: str
    status: TaskStatus
    model: str | None = None
    type: str | None = None
    output: TaskOutput | None = None
    error: str | None = None
    cost: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None

    _utc = field_validator("created_at", "started_at", "completed_at")(_aware)

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    @property
    def output_urls(self) -> list[str]:
        return self.output.all_urls if self.output else []

    @property
    def cost_amount(self) -> Decimal:
        return parse_cost(self.cost)

    @property
    def queue_seconds(self) -> float | None:
        if self.created_at and self.started_at:
            return (self.started_at - self.created_at).total_seconds()
        return None

    @property
    def processing_seconds(self) -> float | None:
        if self.started_at and self.completed_at:
            return (self.completed_at - self.started_at).total_seconds()
        return None


class Pagination(Lenient):
    page: int = 1
    per_page: int = 20
    total: int = 0
    total_pages: int = 0


class TaskPage(Lenient):
    items: list[EggAPITask] = Field(default_factory=list)
    pagination: Pagination = Field(default_factory=Pagination)


class UsageRecord(Lenient):
    task_id: str | None = None
    model: str | None = None
    type: str | None = None
    units: int | None = None
    cost: str | None = None
    created_at: datetime | None = None


class UsagePage(Lenient):
    items: list[UsageRecord] = Field(default_factory=list)
    pagination: Pagination = Field(default_factory=Pagination)


class UsageSummaryItem(Lenient):
    model: str
    total_units: int = 0
    total_cost: str = "$0.00"
    request_count: int = 0

    @property
    def total_cost_amount(self) -> Decimal:
        return parse_cost(self.total_cost)


class WebhookPayload(Lenient):
    """A webhook body; a hint only: the task is always re-read before acting on it."""

    event: str
    task_id: str
    status: TaskStatus
    model: str | None = None
    output: TaskOutput | None = None
    error: str | None = None
    cost: str | None = None
    timestamp: int | None = None


def __getattr__(name: str) -> type[EggAPITask]:
    # ``Task`` was this model's name in 0.1; it collided with Prefect's ``Task`` in user code.
    # Kept for one release, with a warning.
    if name == "Task":
        warnings.warn(
            "prefect_eggapi.client.types.Task is deprecated; use EggAPITask",
            DeprecationWarning,
            stacklevel=2,
        )
        return EggAPITask
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
