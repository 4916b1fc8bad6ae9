"""The image pipeline: prompts → generation → N edit rounds → S3 → manifest + report.

::

    prompts (templates × subjects × styles, seeded; or your list / callable / LLM)
      └─ item i: round 0  submit → wait → persist      (generation)
                 round 1  submit → wait → persist      (edits round 0's image)
                 ...      round N edits round N-1's image
    → s3://{bucket}/{prefix}/{task_id}/{index}.png     (sha256, size, pixels, cost as metadata)
    → s3://{bucket}/{prefix}/manifests/{run_key}.json
    → a Prefect asset per stored image (upstream: the image it edited)
    → gallery (embedded thumbnails) + cost table artifacts; returns a PipelineSummary

**Validation first.** Every parameter is validated by :class:`PipelineParams` (errors name the
field), every request is built and validated, the budget is checked against the estimate, the API
key is resolved and the bucket is reached — all before the first paid call.

**Idempotent reruns.** Each paid step has a logical key ``{run_key}/item-{i}/round-{r}``. The
run key defaults to:

- for a run created by a deployment's *schedule*: ``deployment-{id}-{scheduled slot}``, so a
  retry or a rerun of the same slot reconnects, and the next slot is new work;
- otherwise ``params-{hash}`` of what determines the images (model, resolution, aspect ratio,
  negative prompt, the resolved prompts, the edit instructions): running again with the same
  parameters creates **no new billable task** (the ledger reconnects) and **no new S3 object**
  (outputs keyed by task id are found and skipped; the manifest is rewritten only if it changed).

Pass ``run_key`` to choose your own (e.g. ``"2026-11-25"``) — a new key is new, paid work.

**Edit inputs.** Round r passes round r-1's EggAPI output URL (default: stable, so a rerun builds
identical requests). With ``use_presigned_inputs`` it passes a presigned URL of the object in your
bucket instead (for when EggAPI's output retention is too short); a presigned URL changes at every
signing, so in that mode the pipeline reconnects by logical key alone: the ledger is searched for
a live task under ``{run_key}/item-{i}/round-{r}`` before submitting.

**Bounded concurrency.** At most ``concurrency`` items are in flight (submitted and not yet
persisted) at a time; every step is its own task run named after the EggAPI task id and
``item-{i}/round-{r}``.

**What a run leaves to look at.** One gallery (items × rounds, each edit beside its source, with
prompt, what this run paid, task id and S3 URI; thumbnails embedded so it renders for good, full
size presigned links as extras; paged for big runs, see :mod:`prefect_eggapi.tasks.gallery`),
one cost
table with a total row, one progress bar for the run, and an asset per image that this run
stored. Artifact keys start with the flow or deployment name, so ad-hoc runs (the demo) and
deployment runs keep separate histories. A rerun that only reconnects shows $0.0000 paid and
emits no ``eggapi.task.completed`` / ``persisted`` events and no new materializations.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Sequence
from datetime import UTC
from decimal import Decimal
from functools import partial
from typing import Any, Literal, Self

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from prefect_eggapi.client.errors import InvalidRequestError
from prefect_eggapi.client.pricing import estimate_cost, format_cost
from prefect_eggapi.client.types import (
    MAX_NEGATIVE_PROMPT_CHARS,
    MAX_PROMPT_CHARS,
    AspectRatio,
    EggAPITask,
    GenerateRequest,
    Model,
    Resolution,
    problems_from,
)
from prefect_eggapi.flows.prompts import PromptSource, TemplatePrompts, as_prompt_source
from prefect_eggapi.storage import (
    MAX_PRESIGN_SECONDS,
    OutputStore,
    S3Settings,
    StoredImage,
    validate_bucket_name,
    validate_prefix,
)
from prefect_eggapi.tasks.runtime import in_thread, run_logger

__all__ = [
    "DEFAULT_EDIT_INSTRUCTIONS",
    "ItemRecord",
    "PipelineError",
    "PipelineParams",
    "PipelineSummary",
    "image_pipeline",
    "manifest_key",
    "run_pipeline",
]

DEFAULT_EDIT_INSTRUCTIONS: tuple[str, ...] = (
    "turn the scene to night with warm window lights",
    "add gently falling snow",
)
_RUN_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PROMPT_META_CHARS = 300


class PipelineError(RuntimeError):
    """Some items failed; the manifest and report still describe everything that succeeded."""


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
    def parse(cls, data: dict[str, Any]) -> Self:
        """Validate, raising :class:`InvalidRequestError` that names every bad field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidRequestError(problems_from(exc), what="flow parameters") from None


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
    wait_timeout: float = Field(600.0, gt=0, le=7 * 24 * 3600, description="Seconds per task.")
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

    def prompt_source_for(self, override: Any = None) -> PromptSource:
        """The prompt source these parameters describe (``override``: a Python object)."""
        if override is not None:
            return as_prompt_source(override, count=self.count, seed=self.seed)
        if self.prompt_source is not None:
            return as_prompt_source(self.prompt_source, count=self.count, seed=self.seed)
        if self.prompts is not None:
            return as_prompt_source(self.prompts, count=self.count, seed=self.seed)
        kwargs: dict[str, Any] = {}
        if self.templates is not None:
            kwargs["templates"] = self.templates
        if self.subjects is not None:
            kwargs["subjects"] = self.subjects
        if self.styles is not None:
            kwargs["styles"] = self.styles
        return TemplatePrompts(seed=self.seed, count=self.count, **kwargs)


class ItemRecord(BaseModel):
    """One image of the run, as written to the manifest."""

    item: int
    round: int
    prompt: str
    base_prompt: str
    task_id: str
    s3_uri: str
    key: str
    sha256: str
    size: int
    width: int | None = None
    height: int | None = None
    content_type: str = ""
    cost: Decimal
    reused: bool = Field(False, exclude=True)  # reconnected to a task paid in an earlier run
    created: bool = Field(False, exclude=True)  # a new S3 object was written in this run


class PipelineSummary(BaseModel):
    """What the flow returns: small, no bytes, no secrets."""

    run_key: str
    manifest_uri: str
    images: list[str]
    total_cost: Decimal = Field(description="Cost of every task in the manifest.")
    new_cost: Decimal = Field(description="Cost of tasks submitted by this run (not reconnected).")
    submitted_tasks: int = Field(description="Billable tasks this run created.")
    reused_tasks: int = Field(description="Tasks this run reconnected to instead of paying again.")
    new_objects: int = Field(description="S3 objects this run wrote (images + manifest).")
    failed: list[str] = Field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def manifest_key(store: OutputStore, run_key: str) -> str:
    return "/".join(p for p in (store.prefix, "manifests", f"{run_key}.json") if p)


def _params_hash(params: PipelineParams, prompts: Sequence[str]) -> str:
    canonical = {
        "model": params.model,
        "resolution": params.resolution,
        "aspect_ratio": params.aspect_ratio,
        "negative_prompt": params.negative_prompt,
        "prompts": list(prompts),
        "edit_instructions": list(params.edit_instructions),
        "presigned": params.use_presigned_inputs,
    }
    raw = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


async def _scheduled_slot() -> str | None:
    """``deployment-{id}-{slot}`` when this flow run was created by a deployment schedule."""
    from prefect.runtime import deployment, flow_run

    deployment_id = deployment.id
    run_id = flow_run.id
    scheduled = flow_run.scheduled_start_time
    if not deployment_id or not run_id or scheduled is None:
        return None
    try:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            run = await client.read_flow_run(run_id)
    except Exception:
        return None
    if not run.auto_scheduled:
        return None
    slot = scheduled.strftime("%Y%m%dT%H%M%SZ")
    return f"deployment-{deployment_id}-{slot}"


async def _credentials(block_name: str | None) -> Any:
    from prefect_eggapi.credentials import EggAPICredentials

    creds = await EggAPICredentials.aload(block_name) if block_name else EggAPICredentials()
    creds.resolved_api_key()  # raises InvalidRequestError naming api_key when unset
    return creds


def s3_settings(bucket: str | None, prefix: str | None, **extra: Any) -> S3Settings:
    """S3 settings from a flow's ``bucket``/``prefix`` parameters over the environment; bad or
    missing values raise :class:`InvalidRequestError` naming the field (every flow, one way)."""
    overrides: dict[str, Any] = dict(extra)
    if bucket:
        overrides["bucket"] = bucket
    if prefix is not None:
        overrides["prefix"] = prefix
    try:
        return S3Settings.from_env(**overrides)
    except ValidationError as exc:
        raise InvalidRequestError(problems_from(exc), what="S3 settings") from None
    except ValueError as exc:
        raise InvalidRequestError([("bucket", str(exc).removeprefix("bucket: "))]) from None


def _store(params: PipelineParams, block: Any) -> OutputStore:
    from botocore.exceptions import BotoCoreError, ClientError

    if block is not None:
        store = OutputStore.from_prefect_aws(
            block, prefix=params.prefix, presign_expires_in=params.presign_expires_in
        )
    else:
        settings = s3_settings(
            params.bucket, params.prefix, presign_expires_in=params.presign_expires_in
        )
        store = OutputStore.from_settings(settings)
    try:
        store.client.head_bucket(Bucket=store.bucket)
    except (ClientError, BotoCoreError) as exc:
        raise InvalidRequestError(
            [("bucket", f"s3://{store.bucket} is not reachable: {exc}")], what="S3 settings"
        ) from None
    return store


def _write_manifest(store: OutputStore, key: str, body: bytes) -> bool:
    """PUT the manifest unless an identical one is there; True when a new object was written."""
    from botocore.exceptions import ClientError

    from prefect_eggapi.storage import is_not_found

    sha = hashlib.sha256(body).hexdigest()
    existed = False
    try:
        head = store.client.head_object(Bucket=store.bucket, Key=key)
        existed = True
        if (head.get("Metadata") or {}).get("sha256") == sha:
            return False
    except ClientError as exc:
        if not is_not_found(exc):
            raise
    store.client.put_object(
        Bucket=store.bucket,
        Key=key,
        Body=body,
        ContentType="application/json",
        Metadata={"sha256": sha},
    )
    return not existed


# ------------------------------------------------------------------------------------------------
# the work
# ------------------------------------------------------------------------------------------------


class _Run:
    """State shared by the items of one run."""

    def __init__(
        self,
        params: PipelineParams,
        prompts: list[str],
        run_key: str,
        store: OutputStore,
        credentials: Any,
    ) -> None:
        from prefect_eggapi.safety.ledger import default_ledger

        self.params = params
        self.prompts = prompts
        self.run_key = run_key
        self.store = store
        self.credentials = credentials
        # Beside the outputs unless configured: a run retried in a fresh container finds it.
        self.ledger = default_ledger(beside=store)
        self.semaphore = asyncio.Semaphore(params.concurrency)
        self.rows: list[Any] = []
        self.thumbnails: dict[str, str] = {}  # S3 key -> data: URI
        self.steps_total = len(prompts) * (params.rounds + 1)
        self.steps_done = 0
        self.progress: Any = None

    def request(self, prompt: str, image_url: str | None) -> GenerateRequest:
        p = self.params
        return GenerateRequest(
            model=p.model,
            prompt=prompt,
            negative_prompt=p.negative_prompt,
            aspect_ratio=p.aspect_ratio,
            resolution=p.resolution,
            image_urls=(image_url,) if image_url else (),
        )

    def _known_task(self, logical_key: str, request: GenerateRequest) -> str | None:
        """The task id already recorded for this work (so the submit will not pay), or None."""
        from prefect_eggapi.safety.ledger import LIVE_STATES, ledger_key

        entry = self.ledger.get(ledger_key(logical_key, request.fingerprint()))
        if entry is not None and entry.state in LIVE_STATES and entry.task_id:
            return entry.task_id
        if request.is_edit and self.params.use_presigned_inputs:
            # Presigned inputs change at every signing: match on the logical key alone.
            live = [
                e
                for e in self.ledger.entries(set(LIVE_STATES))
                if e.logical_key == logical_key and e.task_id
            ]
            if live:
                return max(live, key=lambda e: e.updated_at).task_id
        return None

    async def item(self, index: int, base_prompt: str) -> list[ItemRecord]:
        from prefect_eggapi.tasks import (
            adownload_outputs,
            asubmit_edit,
            asubmit_generation,
            await_for_task,
            result_of,
        )

        p = self.params
        records: list[ItemRecord] = []
        source_url: str | None = None
        source_uri_s3: str | None = None
        for rnd in range(p.rounds + 1):
            prompt = base_prompt if rnd == 0 else p.edit_instructions[rnd - 1]
            label = f"item-{index}/round-{rnd}"
            logical_key = f"{self.run_key}/item-{index}/round-{rnd}"
            request = self.request(prompt, source_url)
            async with self.semaphore:
                known = await in_thread(partial(self._known_task, logical_key, request))
                task: EggAPITask | str
                if known is not None and request.is_edit and p.use_presigned_inputs:
                    task = known  # reconnect by logical key: the presigned URL is new
                else:
                    submit = asubmit_edit if request.is_edit else asubmit_generation
                    task = await submit(
                        request,
                        credentials=self.credentials,
                        key=logical_key,
                        label=label,
                        budget=p.budget,
                        ledger=self.ledger,
                    )
                done = await await_for_task(
                    task,
                    credentials=self.credentials,
                    timeout=p.wait_timeout,
                    label=label,
                    progress=False,  # one progress bar for the run, not one per task
                    ledger=self.ledger,
                )
                was_persisted = await in_thread(partial(self._persisted_before, done.id))
                stored: list[StoredImage] = await adownload_outputs(
                    done,
                    self.store,
                    credentials=self.credentials,
                    label=label,
                    image_artifacts=False,  # the run's gallery shows them, for good
                    ledger=self.ledger,
                    metadata={
                        "prompt": prompt[:_PROMPT_META_CHARS],
                        "pipeline-item": str(index),
                        "pipeline-round": str(rnd),
                        "pipeline-run-key": self.run_key,
                    },
                )
            row = result_of(request, done, stored, label=label, ledger=self.ledger).report_row()
            row.paid = Decimal("0") if known is not None else row.cost
            self.rows.append(row)
            first = stored[0]
            if not was_persisted or any(s.created for s in stored):
                await self._materialize(
                    stored,
                    done,
                    source_uri=source_uri_s3,
                    prompt=prompt,
                    label=label,
                    index=index,
                    rnd=rnd,
                )
            await self._step_done(stored, index * (p.rounds + 1) + rnd)
            for s in stored:
                records.append(
                    ItemRecord(
                        item=index,
                        round=rnd,
                        prompt=prompt,
                        base_prompt=base_prompt,
                        task_id=done.id,
                        s3_uri=s.uri,
                        key=s.key,
                        sha256=s.sha256,
                        size=s.size,
                        width=s.width,
                        height=s.height,
                        content_type=s.content_type,
                        cost=done.cost_amount if s is first else Decimal("0"),
                        reused=known is not None,
                        created=s.created,
                    )
                )
            if p.use_presigned_inputs:
                source_url = self.store.presign_get(first.key)
            else:
                source_url = done.output_urls[0]
            source_uri_s3 = first.uri
        return records

    def _persisted_before(self, task_id: str) -> bool:
        """The ledger already had this task's outputs stored (a rerun): not a materialization."""
        from prefect_eggapi.safety.ledger import EntryState

        entry = self.ledger.find_task(task_id)
        return (
            entry is not None and entry.task_id == task_id and entry.state is EntryState.PERSISTED
        )

    async def _materialize(
        self,
        stored: list[StoredImage],
        done: EggAPITask,
        *,
        source_uri: str | None,
        prompt: str,
        label: str,
        index: int,
        rnd: int,
    ) -> None:
        """Each stored image becomes an asset; an edit's upstream asset is the image it edited."""
        from prefect_eggapi.tasks import amaterialize_images

        await amaterialize_images(
            stored,
            done,
            sources=[source_uri] if source_uri else [],
            prompt=prompt,
            label=label,
            metadata={"item": str(index), "round": str(rnd), "run_key": self.run_key},
        )

    async def _step_done(self, stored: list[StoredImage], cell: int) -> None:
        """Thumbnails from the stored bytes (for the gallery; none past the gallery's cap, which
        counts cells in item, round order) and the run's progress bar."""
        from prefect_eggapi.tasks.gallery import MAX_CELLS, thumbnail_of

        if self.params.image_artifacts and cell < MAX_CELLS:
            for s in stored:
                thumb = await in_thread(partial(thumbnail_of, self.store, s.key))
                if thumb is not None:
                    self.thumbnails[s.key] = thumb.data_uri()
        self.steps_done += 1
        if self.progress is not None:
            percent = 100.0 * self.steps_done / max(1, self.steps_total)
            text = f"{self.steps_done} of {self.steps_total} generations stored"
            await in_thread(partial(self.progress.update, percent, text))


def _row_order(row: Any) -> tuple[int, ...]:
    """item-2/round-1 before item-10/round-0: numbers, not text."""
    return tuple(int(n) for n in re.findall(r"\d+", str(row.label))) or (0,)


def _gallery_cells(run: _Run, records: Sequence[ItemRecord]) -> list[Any]:
    from prefect_eggapi.tasks.gallery import GalleryCell

    cells = []
    for r in records:
        cells.append(
            GalleryCell(
                item=r.item,
                round=r.round,
                prompt=r.prompt,
                task_id=r.task_id,
                s3_uri=r.s3_uri,
                paid=Decimal("0") if r.reused else r.cost,
                cost=r.cost,
                reused=r.reused,
                thumbnail=run.thumbnails.get(r.key),
                link=run.store.presign_get(r.key),
            )
        )
    return cells


def _publish_gallery(
    run: _Run, records: Sequence[ItemRecord], failed: list[str], *, key: str
) -> None:
    from prefect_eggapi.tasks.artifacts import publish_gallery

    publish_gallery(
        _gallery_cells(run, records),
        key=key,
        title=f"EggAPI pipeline {run.run_key}",
        rounds=run.params.rounds + 1,
        failed=failed,
    )


async def _artifact_scope() -> str:
    """Which flow or deployment this run belongs to, for artifact keys: ad-hoc runs (the demo,
    a script) and each deployment keep their own histories under the same run key."""
    from prefect.runtime import deployment, flow_run

    flow_name = str(flow_run.flow_name or "eggapi-image-pipeline")
    name: str | None = None
    deployment_id = deployment.id
    if deployment_id:
        # prefect.runtime's own override variable, honoured as prefect.runtime does; else one
        # async read (prefect.runtime's sync getter would block this event loop on another).
        name = os.environ.get("PREFECT__RUNTIME__DEPLOYMENT__NAME")
        if not name:
            try:
                from prefect.client.orchestration import get_client

                async with get_client() as client:
                    name = (await client.read_deployment(deployment_id)).name
            except Exception:
                name = f"deployment-{str(deployment_id)[:8]}"
    return f"{flow_name}-{name}" if name else flow_name


def _flow_run_name() -> str:
    """``3 prompts × 3 rounds · nanobanana-pro 1k`` (ad hoc) or ``on-demand · slot … · …``:
    the run's name says what it is instead of Prefect's random one. Never raises."""
    from prefect.runtime import deployment, flow_run

    try:
        params = flow_run.parameters or {}
        prompts = params.get("prompts")
        count = params.get("count") or (len(prompts) if prompts else 3)
        edits = params.get("edit_instructions")
        rounds = 1 + (len(DEFAULT_EDIT_INSTRUCTIONS) if edits is None else len(edits))
        model = params.get("model") or "nanobanana-pro"
        what = f"{count} prompts × {rounds} rounds · {model} {params.get('resolution') or '1k'}"
        parts = ["pipeline"]
        if deployment.id:
            parts = [str(deployment.name or "deployment")]
            slot = flow_run.scheduled_start_time
            if slot is not None:
                utc = slot.astimezone(UTC)
                parts.append(f"slot {utc.strftime('%Y-%m-%d %H:%MZ')}")
        parts.append(what)
        if params.get("run_key"):
            parts.append(f"key {params['run_key']}")
        return " · ".join(parts)[:200]
    except Exception:
        return "eggapi-image-pipeline"


def _validate_requests(params: PipelineParams, prompts: list[str]) -> Decimal:
    """Build every request once (round 0 for real, edits with a placeholder URL): any invalid
    field fails here, before a paid call. Returns the estimated total cost."""
    total = Decimal("0")
    placeholder = "https://example.invalid/input.png"
    for i, prompt in enumerate(prompts):
        try:
            req = GenerateRequest(
                model=params.model,
                prompt=prompt,
                negative_prompt=params.negative_prompt,
                aspect_ratio=params.aspect_ratio,
                resolution=params.resolution,
            )
        except InvalidRequestError as exc:
            raise InvalidRequestError(
                [(f"prompts[{i}].{f}", rule) for f, rule in exc.problems], what="prompt"
            ) from None
        total += estimate_cost(req)
    for instruction in params.edit_instructions:
        edit = GenerateRequest(
            model=params.model,
            prompt=instruction,
            aspect_ratio=params.aspect_ratio,
            resolution=params.resolution,
            image_urls=(placeholder,),
        )
        total += estimate_cost(edit) * len(prompts)
    if params.budget is not None and total > params.budget:
        raise InvalidRequestError(
            [
                (
                    "budget",
                    f"the run costs up to {format_cost(total)} ({len(prompts)} prompts × "
                    f"{params.rounds + 1} rounds) but the budget is {format_cost(params.budget)}",
                )
            ],
            what="pipeline parameters",
        )
    return total


async def run_pipeline(
    params: PipelineParams,
    *,
    prompt_source: Any = None,
    credentials_block: str | None = None,
    s3_bucket_block: str | None = None,
) -> PipelineSummary:
    """The pipeline's body (call it inside a flow run; :func:`image_pipeline` does)."""
    from prefect_eggapi.tasks.artifacts import Progress, publish_report, run_artifact_key

    logger = run_logger()
    try:
        prompts = params.prompt_source_for(prompt_source).prompts()
    except ValueError as exc:
        raise InvalidRequestError([("prompts", str(exc))], what="pipeline parameters") from None
    if not prompts:
        raise InvalidRequestError([("prompts", "the prompt source returned no prompts")])
    estimate = _validate_requests(params, prompts)
    credentials = await _credentials(credentials_block)
    block = None
    if s3_bucket_block:
        from prefect_aws import S3Bucket

        block = await S3Bucket.aload(s3_bucket_block)
    store = await in_thread(partial(_store, params, block))
    run_key = (
        params.run_key or await _scheduled_slot() or ("params-" + _params_hash(params, prompts))
    )
    logger.info(
        "Pipeline run %s: %d prompt(s) × %d round(s) of %s %s %s, up to %s, into s3://%s/%s",
        run_key,
        len(prompts),
        params.rounds + 1,
        params.model,
        params.resolution,
        params.aspect_ratio,
        format_cost(estimate),
        store.bucket,
        store.prefix,
    )

    scope = await _artifact_scope()
    run = _Run(params, prompts, run_key, store, credentials)
    run.progress = await in_thread(
        partial(Progress, f"EggAPI pipeline {run_key}: generations stored")
    )
    outcomes = await asyncio.gather(
        *(run.item(i, prompt) for i, prompt in enumerate(prompts)), return_exceptions=True
    )
    records: list[ItemRecord] = []
    failed: list[str] = []
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, Exception):
                raise outcome
            failed.append(f"item-{i}: {type(outcome).__name__}: {outcome}")
        else:
            records.extend(outcome)
    records.sort(key=lambda r: (r.item, r.round, r.key))

    manifest = {
        "run_key": run_key,
        "model": params.model,
        "aspect_ratio": params.aspect_ratio,
        "resolution": params.resolution,
        "edit_instructions": list(params.edit_instructions),
        "prompts": prompts,
        "total_cost": str(sum((r.cost for r in records), Decimal("0"))),
        "items": [r.model_dump(mode="json") for r in records],
        "failed": failed,
    }
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    key = manifest_key(store, run_key)
    manifest_created = await in_thread(partial(_write_manifest, store, key, body))
    manifest_uri = store.uri(key)

    total = await in_thread(
        partial(
            publish_report,
            sorted(run.rows, key=_row_order),
            key=run_artifact_key(scope, run_key, "cost"),
            title=f"EggAPI pipeline {run_key}",
        )
    )
    if params.image_artifacts:
        await in_thread(
            partial(
                _publish_gallery,
                run,
                records,
                failed,
                key=run_artifact_key(scope, run_key, "gallery"),
            )
        )
    per_task = {r.task_id: r for r in records}
    summary = PipelineSummary(
        run_key=run_key,
        manifest_uri=manifest_uri,
        images=[r.s3_uri for r in records],
        total_cost=total,
        new_cost=sum((r.cost for r in per_task.values() if not r.reused), Decimal("0")),
        submitted_tasks=sum(not r.reused for r in per_task.values()),
        reused_tasks=sum(r.reused for r in per_task.values()),
        new_objects=sum(r.created for r in records) + int(manifest_created),
        failed=failed,
    )
    logger.info(
        "Pipeline run %s: %d image(s), total %s (%s new), %d task(s) submitted, %d reused, "
        "%d new S3 object(s); manifest %s",
        run_key,
        len(records),
        format_cost(summary.total_cost),
        format_cost(summary.new_cost),
        summary.submitted_tasks,
        summary.reused_tasks,
        summary.new_objects,
        manifest_uri,
    )
    if failed:
        raise PipelineError(
            f"{len(failed)} of {len(prompts)} item(s) failed ({'; '.join(failed)}); "
            f"the manifest {manifest_uri} lists the {len(records)} image(s) that succeeded"
        )
    return summary


@flow(
    name="eggapi-image-pipeline",
    description="Prompts → EggAPI generation → edit rounds → S3, with a manifest per run.",
    validate_parameters=True,
    flow_run_name=_flow_run_name,
)
async def image_pipeline(
    model: Literal["nanobanana", "nanobanana-pro"] = "nanobanana-pro",
    count: int | None = None,
    seed: int = 0,
    prompts: list[str] | None = None,
    templates: list[str] | None = None,
    subjects: list[str] | None = None,
    styles: list[str] | None = None,
    prompt_source: Any = None,
    negative_prompt: str | None = None,
    aspect_ratio: Literal["16:9", "9:16"] = "16:9",
    resolution: Literal["1k", "2k", "4k"] = "1k",
    edit_instructions: list[str] | None = None,
    concurrency: int = 4,
    budget: float | None = None,
    wait_timeout: float = 600.0,
    bucket: str | None = None,
    prefix: str | None = None,
    run_key: str | None = None,
    use_presigned_inputs: bool = False,
    image_artifacts: bool = True,
    credentials_block: str | None = None,
    s3_bucket_block: str | None = None,
) -> PipelineSummary:
    """Generate ``count`` images from prompts, edit each ``len(edit_instructions)`` times, and
    store every image in S3 with a manifest per run.

    Args:
        model: ``nanobanana-pro`` or ``nanobanana``.
        count: number of prompts (items); default 3, or the length of ``prompts``.
        seed: seed of the template sampler (same seed, same prompts).
        prompts: your own prompts (instead of templates).
        templates, subjects, styles: template lists (``{subject}``, ``{style}``).
        prompt_source: import path ``package.module:attr`` (or, from Python, an object) of a
            PromptSource, a list, or a callable ``fn(count, seed)`` — e.g. an LLM.
        negative_prompt: applied to the generations.
        aspect_ratio, resolution: output geometry.
        edit_instructions: one per edit round (default: two rounds); ``[]`` for none.
        concurrency: items in flight at once.
        budget: USD cap for the run (checked against the estimate before any paid call).
        wait_timeout: seconds to wait for each EggAPI task.
        bucket, prefix: S3 target (default ``EGGAPI_S3_BUCKET`` / ``EGGAPI_S3_PREFIX``).
        run_key: logical run name for idempotent reruns (default: scheduled slot or a hash of
            the parameters).
        use_presigned_inputs: edit from presigned URLs of the stored objects instead of EggAPI
            output URLs.
        image_artifacts: publish the run's gallery (embedded thumbnails of every image).
        credentials_block: name of an ``EggAPICredentials`` block (default: environment).
        s3_bucket_block: name of a prefect-aws ``S3Bucket`` block (default: environment).
    """
    if count is None:
        count = len(prompts) if prompts else 3
    data: dict[str, Any] = {
        "model": model,
        "count": count,
        "seed": seed,
        "prompts": prompts,
        "templates": templates,
        "subjects": subjects,
        "styles": styles,
        "prompt_source": prompt_source if isinstance(prompt_source, str) else None,
        "negative_prompt": negative_prompt,
        "aspect_ratio": aspect_ratio,
        "resolution": resolution,
        "concurrency": concurrency,
        "budget": None if budget is None else Decimal(str(budget)),
        "wait_timeout": wait_timeout,
        "bucket": bucket,
        "prefix": prefix,
        "run_key": run_key,
        "use_presigned_inputs": use_presigned_inputs,
        "image_artifacts": image_artifacts,
    }
    if edit_instructions is not None:
        data["edit_instructions"] = edit_instructions
    params = PipelineParams.parse(data)
    obj = None if isinstance(prompt_source, str) else prompt_source
    return await run_pipeline(
        params,
        prompt_source=obj,
        credentials_block=credentials_block,
        s3_bucket_block=s3_bucket_block,
    )


def default_pipeline_params() -> dict[str, Any]:
    """JSON-able defaults, e.g. for deployment parameters."""
    return PipelineParams().model_dump(mode="json", exclude_none=True)


def pipeline_env_ok(environ: dict[str, str] | None = None) -> list[str]:
    """Names of required variables missing from the environment (for friendly CLI errors)."""
    env = os.environ if environ is None else environ
    return [n for n in ("EGGAPI_API_KEY", "EGGAPI_S3_BUCKET") if not env.get(n)]
