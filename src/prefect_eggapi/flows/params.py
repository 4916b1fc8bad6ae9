"""The flows' parameters: one validated model per flow, on one shared base.

Every flow function keeps an explicit signature (Prefect builds the UI form and the deployment
schema from it) and hands its arguments to :meth:`FlowParams.from_flow`, which keeps the fields
of the model and validates them: the model, not the signature, decides what a value may be, and
an error names the field. ``tests/test_flows_params.py`` checks that each signature offers every
field of its model with the same default, so a field cannot be left unreachable again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from prefect_eggapi.client.errors import InvalidRequestError
from prefect_eggapi.client.types import (
    MAX_NEGATIVE_PROMPT_CHARS,
    MAX_PROMPT_CHARS,
    AspectRatio,
    Model,
    Resolution,
    problems_from,
)
from prefect_eggapi.flows.prompts import (
    PromptInput,
    PromptSource,
    TemplatePrompts,
    as_prompt_source,
)
from prefect_eggapi.storage import MAX_PRESIGN_SECONDS, validate_bucket_name, validate_prefix

__all__ = [
    "DEFAULT_EDIT_INSTRUCTIONS",
    "DEFAULT_SHARD_DEPLOYMENT",
    "BatchParams",
    "FlowParams",
    "ManifestFormat",
    "PipelineParams",
    "ShardPlan",
    "in_range",
    "parse_lines",
    "range_label",
]

DEFAULT_EDIT_INSTRUCTIONS: tuple[str, ...] = (
    "turn the scene to night with warm window lights",
    "add gently falling snow",
)
DEFAULT_SHARD_DEPLOYMENT = "eggapi-batch/batch-shard"
ManifestFormat = Literal["jsonl", "csv"]
_RUN_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_WAIT = 7 * 24 * 3600


class FlowParams(BaseModel):
    """Shared by the flows' parameter models: where outputs go and the run key, validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("bucket", check_fields=False)
    @classmethod
    def _bucket(cls, value: str | None) -> str | None:
        return None if value is None else validate_bucket_name(value, field="bucket")

    @field_validator("prefix", check_fields=False)
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        return None if value is None else validate_prefix(value, field="prefix")

    @field_validator("run_key", check_fields=False)
    @classmethod
    def _run_key(cls, value: str | None) -> str | None:
        if value is not None and not _RUN_KEY_RE.match(value):
            raise ValueError(
                "must be 1-128 characters: letters, digits, '.', '_' or '-', starting with a "
                "letter or digit"
            )
        return value

    @classmethod
    def parse(cls, data: Mapping[str, object]) -> Self:
        """Validate, raising :class:`InvalidRequestError` that names every bad field."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise InvalidRequestError(problems_from(exc), what="flow parameters") from None

    @classmethod
    def from_flow(cls, arguments: Mapping[str, object]) -> Self:
        """The model of a flow call's ``locals()``: its fields only, ``None`` meaning "the
        default", a ``float`` budget (what a JSON form sends) taken as its decimal text."""
        data = {
            name: value
            for name, value in arguments.items()
            if name in cls.model_fields and value is not None
        }
        budget = data.get("budget")
        if isinstance(budget, float):
            data["budget"] = Decimal(str(budget))
        return cls.parse(data)


class PipelineParams(FlowParams):
    """The pipeline's parameters, validated before any paid call (errors name the field)."""

    model: Model = "nanobanana-pro"
    count: int = Field(3, ge=1, le=1000, description="Number of prompts (items).")
    seed: int = Field(0, description="Seed of the prompt sampler.")
    prompts: list[str] | None = Field(None, description="Your own prompts (overrides templates).")
    templates: list[str] | None = Field(None, description="Templates with {subject}, {style}.")
    subjects: list[str] | None = None
    styles: list[str] | None = None
    prompt_source: str | None = Field(
        None, description="Import path 'package.module:attr' of a PromptSource, list or callable."
    )
    negative_prompt: str | None = Field(None, max_length=MAX_NEGATIVE_PROMPT_CHARS)
    aspect_ratio: AspectRatio = "16:9"
    resolution: Resolution = "1k"
    edit_instructions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EDIT_INSTRUCTIONS),
        max_length=20,
        description="One instruction per edit round; round r edits round r-1's image.",
    )
    concurrency: int = Field(4, ge=1, le=64, description="Items in flight at once.")
    budget: Decimal | None = Field(None, ge=0, description="USD cap for this run.")
    wait_timeout: float = Field(600.0, gt=0, le=_MAX_WAIT, description="Seconds per task.")
    bucket: str | None = Field(None, description="Default: EGGAPI_S3_BUCKET.")
    prefix: str | None = Field(None, description="Default: EGGAPI_S3_PREFIX, else 'eggapi'.")
    run_key: str | None = Field(None, description="Default: scheduled slot or parameter hash.")
    use_presigned_inputs: bool = False
    presign_expires_in: int = Field(3600, ge=60, le=MAX_PRESIGN_SECONDS)
    image_artifacts: bool = Field(True, description="Publish the run's gallery artifact.")

    @field_validator("prompts", "templates", "subjects", "styles", "edit_instructions")
    @classmethod
    def _texts(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for i, text in enumerate(value):
            if not text.strip():
                raise ValueError(f"item {i} must contain non-whitespace characters")
            if len(text) > MAX_PROMPT_CHARS:
                raise ValueError(f"item {i} is longer than {MAX_PROMPT_CHARS} characters")
        return value

    @property
    def rounds(self) -> int:
        return len(self.edit_instructions)

    def prompt_source_for(self, override: PromptInput = None) -> PromptSource:
        """The prompt source these parameters describe (``override``: a Python object)."""
        if override is not None:
            return as_prompt_source(override, count=self.count, seed=self.seed)
        if self.prompt_source is not None:
            return as_prompt_source(self.prompt_source, count=self.count, seed=self.seed)
        if self.prompts is not None:
            return as_prompt_source(self.prompts, count=self.count, seed=self.seed)
        kwargs: dict[str, list[str]] = {}
        if self.templates is not None:
            kwargs["templates"] = self.templates
        if self.subjects is not None:
            kwargs["subjects"] = self.subjects
        if self.styles is not None:
            kwargs["styles"] = self.styles
        return TemplatePrompts(seed=self.seed, count=self.count, **kwargs)


class BatchParams(FlowParams):
    """Validated before anything is paid for; errors name the field."""

    manifest: str = Field(description="Path or s3:// URI of a JSONL or CSV manifest.")
    manifest_format: ManifestFormat | None = None
    model: Model = "nanobanana"
    aspect_ratio: AspectRatio = "16:9"
    resolution: Resolution | None = None
    # Strict, as in GenerateRequest: "2" from a form or a CLI is refused, not paid for twice over.
    num_outputs: int = Field(1, ge=1, le=4, strict=True)
    concurrency: int = Field(16, ge=1, le=1000, strict=True, description="Items in flight.")
    items_per_task: int = Field(
        1,
        ge=1,
        le=1000,
        strict=True,
        description="Items per task run: 1 = a task run per item; e.g. 100 for big batches.",
    )
    budget: Decimal | None = Field(None, ge=0, description="USD cap for the whole batch.")
    wait_timeout: float = Field(600.0, gt=0, le=_MAX_WAIT)
    bucket: str | None = None
    prefix: str | None = None
    run_key: str | None = None
    global_rate_limit: str | None = Field(
        None, description="Prefect global concurrency limit (slot decay) shared by all workers."
    )
    fail_on_item_error: bool = True
    lines: str | None = Field(
        None,
        description="Only manifest lines start:stop (1-based, stop excluded; e.g. '1:501').",
    )

    @field_validator("manifest")
    @classmethod
    def _manifest(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a path or an s3://bucket/key URI")
        return value

    @field_validator("lines")
    @classmethod
    def _lines(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parse_lines(value)
        return value.strip()

    def line_range(self) -> tuple[int, int | None] | None:
        """``(start, stop)`` of ``lines`` (stop None: to the end), or None for every line."""
        return None if self.lines is None else parse_lines(self.lines)

    def defaults(self) -> dict[str, Any]:
        """What a manifest line that does not say gets (``read_manifest``'s ``defaults``)."""
        out: dict[str, Any] = {
            "model": self.model,
            "aspect_ratio": self.aspect_ratio,
            "num_outputs": self.num_outputs,
        }
        if self.resolution:
            out["resolution"] = self.resolution
        return out


class ShardPlan(FlowParams):
    """How to fan out; validated before any shard run is created."""

    # One read of the shard runs per poll: the API returns at most 200 runs a page.
    shards: int = Field(4, ge=1, le=200, strict=True)
    shard_deployment: str = Field(DEFAULT_SHARD_DEPLOYMENT, min_length=3, pattern=r".+/.+")
    max_attempts: int = Field(3, ge=1, le=20, strict=True, description="Runs per shard at most.")
    # Heartbeats come at most every 30 s: anything shorter than ~40 s would call live runs dead.
    stale_after: float = Field(120.0, ge=40, le=24 * 3600)
    poll_interval: float = Field(2.0, gt=0, le=300)


def parse_lines(value: str) -> tuple[int, int | None]:
    """``"start:stop"`` -> (start, stop); 1-based line numbers, stop excluded, sides optional.

    Refused before anything is paid: a reversed or empty range is a mistake, not zero work.
    """
    start_text, sep, stop_text = value.strip().partition(":")
    if not sep or not all(p.strip().isdigit() or not p.strip() for p in (start_text, stop_text)):
        raise ValueError("must be 'start:stop' with 1-based line numbers, e.g. '1:501' or '501:'")
    start = int(start_text) if start_text.strip() else 1
    stop = int(stop_text) if stop_text.strip() else None
    if start < 1:
        raise ValueError("start must be >= 1 (line numbers are 1-based)")
    if stop is not None and stop <= start:
        raise ValueError("stop must be greater than start (stop is excluded)")
    return start, stop


def in_range(line: int, bounds: tuple[int, int | None] | None) -> bool:
    """Whether manifest line ``line`` belongs to ``bounds`` (None: every line does)."""
    if bounds is None:
        return True
    start, stop = bounds
    return line >= start and (stop is None or line < stop)


def range_label(bounds: tuple[int, int | None]) -> str:
    """``lines-{start}-{stop}`` (``end`` for an open stop): names a range's files and keys."""
    start, stop = bounds
    return f"lines-{start}-{'end' if stop is None else stop}"
