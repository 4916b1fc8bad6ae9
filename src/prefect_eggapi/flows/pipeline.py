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

The module is above the ~400-line mark by this docstring: it is the flow's user guide (the
flow's code is its run function; items and rounds are in :mod:`.rounds`).

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
from collections.abc import Sequence
from datetime import UTC
from decimal import Decimal
from functools import partial
from typing import cast

from prefect import flow
from prefect.runtime import deployment, flow_run
from pydantic import BaseModel, Field

from prefect_eggapi.client.errors import InvalidRequestError
from prefect_eggapi.client.pricing import estimate_cost, format_cost
from prefect_eggapi.client.types import AspectRatio, GenerateRequest, Model, Resolution
from prefect_eggapi.flows.context import (
    RunContext,
    artifact_scope,
    load_credentials,
    open_store,
    scheduled_slot,
)
from prefect_eggapi.flows.params import DEFAULT_EDIT_INSTRUCTIONS, PipelineParams
from prefect_eggapi.flows.prompts import PromptInput
from prefect_eggapi.flows.report import publish_cost_table, publish_pipeline_gallery
from prefect_eggapi.flows.rounds import ItemRecord, PipelineRun
from prefect_eggapi.safety.ledger import default_ledger
from prefect_eggapi.storage import OutputStore, put_if, read_object
from prefect_eggapi.tasks.artifacts import Progress, run_artifact_key
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

FLOW_NAME = "eggapi-image-pipeline"


class PipelineError(RuntimeError):
    """Some items failed; the manifest and report still describe everything that succeeded."""


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


def _write_manifest(store: OutputStore, key: str, body: bytes) -> bool:
    """PUT the manifest unless an identical one is there; True when no manifest existed before.

    Conditional on the version read (a concurrent run of the same key: look again), so a rerun
    that changes nothing writes nothing."""
    while True:
        current = read_object(store.client, store.bucket, key)
        if current is not None and current[0] == body:
            return False
        version = current[1] if current else None
        if put_if(store.client, store.bucket, key, body, version) is not None:
            return current is None


async def _artifact_scope() -> str:
    """This run's artifact scope: the flow, or the flow and its deployment."""
    return await artifact_scope(FLOW_NAME)


def _flow_run_name() -> str:
    """``3 prompts × 3 rounds · nanobanana-pro 1k`` (ad hoc) or ``on-demand · slot … · …``:
    the run's name says what it is instead of Prefect's random one. Never raises."""
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
        return FLOW_NAME


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
    prompt_source: PromptInput = None,
    credentials_block: str | None = None,
    s3_bucket_block: str | None = None,
) -> PipelineSummary:
    """The pipeline's body (call it inside a flow run; :func:`image_pipeline` does)."""
    logger = run_logger()
    try:
        prompts = params.prompt_source_for(prompt_source).prompts()
    except ValueError as exc:
        raise InvalidRequestError([("prompts", str(exc))], what="pipeline parameters") from None
    if not prompts:
        raise InvalidRequestError([("prompts", "the prompt source returned no prompts")])
    estimate = _validate_requests(params, prompts)
    credentials = await load_credentials(credentials_block)
    store = await open_store(
        params.bucket,
        params.prefix,
        s3_bucket_block=s3_bucket_block,
        presign_expires_in=params.presign_expires_in,
    )
    run_key = (
        params.run_key or await scheduled_slot() or ("params-" + _params_hash(params, prompts))
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
    # Beside the outputs unless configured: a run retried in a fresh container finds it.
    ledger = await in_thread(partial(default_ledger, beside=store))
    progress = await in_thread(partial(Progress, f"EggAPI pipeline {run_key}: generations stored"))
    run = PipelineRun(params, prompts, RunContext(run_key, store, credentials, ledger), progress)
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
        partial(publish_cost_table, run, key=run_artifact_key(scope, run_key, "cost"))
    )
    if params.image_artifacts:
        gallery_key = run_artifact_key(scope, run_key, "gallery")
        await in_thread(partial(publish_pipeline_gallery, run, records, failed, key=gallery_key))
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
    name=FLOW_NAME,
    description="Prompts → EggAPI generation → edit rounds → S3, with a manifest per run.",
    validate_parameters=True,
    flow_run_name=_flow_run_name,
)
async def image_pipeline(
    model: Model = "nanobanana-pro",
    count: int | None = None,
    seed: int = 0,
    prompts: list[str] | None = None,
    templates: list[str] | None = None,
    subjects: list[str] | None = None,
    styles: list[str] | None = None,
    prompt_source: object = None,
    negative_prompt: str | None = None,
    aspect_ratio: AspectRatio = "16:9",
    resolution: Resolution = "1k",
    edit_instructions: list[str] | None = None,
    concurrency: int = 4,
    budget: float | None = None,
    wait_timeout: float = 600.0,
    bucket: str | None = None,
    prefix: str | None = None,
    run_key: str | None = None,
    use_presigned_inputs: bool = False,
    presign_expires_in: int = 3600,
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
        presign_expires_in: seconds those presigned URLs (and the gallery's links) stay valid.
        image_artifacts: publish the run's gallery (embedded thumbnails of every image).
        credentials_block: name of an ``EggAPICredentials`` block (default: environment).
        s3_bucket_block: name of a prefect-aws ``S3Bucket`` block (default: environment).
    """
    if count is None:
        count = len(prompts) if prompts else 3
    arguments = dict(locals())
    # An import path is a parameter; a Python object goes beside them, and as_prompt_source
    # refuses what is not a source, a list or a callable (the signature stays schema-free).
    source = None if isinstance(prompt_source, str) else cast(PromptInput, prompt_source)
    arguments["prompt_source"] = prompt_source if source is None else None
    return await run_pipeline(
        PipelineParams.from_flow(arguments),
        prompt_source=source,
        credentials_block=credentials_block,
        s3_bucket_block=s3_bucket_block,
    )
