"""Batch generation over a manifest of prompts: bounded, resumable, accounted for item by item.

::

    manifest (JSONL/CSV, local or s3://) ──► validated items + reported broken lines
      └─ item: one ``agenerate_image`` task run (submit → wait → persist), ≤ concurrency at once
           └─ s3://{bucket}/{prefix}/batches/{run_key}/items/{id}.{status}.json   as it goes
    → batches/{run_key}/status.jsonl (every line of the manifest, broken ones included)
    → progress artifact, summary + partial-failure table, a BatchSummary

**Resume.** Items are keyed ``{run_key}/{item id}`` in the submission ledger. A rerun (or a
restart after the process was killed) skips items whose ``persisted`` status object exists,
reconnects to tasks already submitted, and never pays twice. ``run_key`` defaults to a hash of the
manifest's items and defaults, so re-running the same batch resumes it; scheduled deployment runs
use their slot instead (two runs of one slot share the work).

**Scale.** Put the ledger in S3 (``EGGAPI_LEDGER_URI=s3://bucket/prefix``) and set a Prefect
global rate limit (``global_rate_limit``) so any number of workers share one request budget.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from decimal import Decimal
from functools import partial
from typing import Any, Literal

from prefect import flow
from pydantic import BaseModel, Field, ValidationError, field_validator

from prefect_eggapi.artifacts import Progress, artifact_key
from prefect_eggapi.batch_input import BatchItem, BrokenLine, read_manifest
from prefect_eggapi.errors import BudgetExceededError, InvalidRequestError, describe
from prefect_eggapi.flows.pipeline import FlowParams, _credentials, _scheduled_slot
from prefect_eggapi.models import AspectRatio, Model, Resolution
from prefect_eggapi.pricing import estimate_cost, format_cost
from prefect_eggapi.runtime import in_thread, run_logger
from prefect_eggapi.storage import OutputStore, S3Settings

ItemStatus = Literal["persisted", "failed", "skipped"]


class BatchError(RuntimeError):
    """Some items failed or were skipped; the status manifest accounts for every line."""


class BatchParams(FlowParams):
    """Validated before anything is paid for; errors name the field."""

    manifest: str = Field(description="Path or s3:// URI of a JSONL or CSV manifest.")
    manifest_format: Literal["jsonl", "csv"] | None = None
    model: Model = "nanobanana"
    aspect_ratio: AspectRatio = "16:9"
    resolution: Resolution | None = None
    num_outputs: int = Field(1, ge=1, le=4)
    concurrency: int = Field(16, ge=1, le=1000, description="Items in flight at once.")
    budget: Decimal | None = Field(None, ge=0, description="USD cap for the whole batch.")
    wait_timeout: float = Field(600.0, gt=0, le=7 * 24 * 3600)
    bucket: str | None = None
    prefix: str | None = None
    run_key: str | None = None
    global_rate_limit: str | None = Field(
        None, description="Prefect global concurrency limit (slot decay) shared by all workers."
    )
    fail_on_item_error: bool = True

    @field_validator("manifest")
    @classmethod
    def _manifest(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a path or an s3://bucket/key URI")
        return value

    def defaults(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "aspect_ratio": self.aspect_ratio,
            "num_outputs": self.num_outputs,
        }
        if self.resolution:
            out["resolution"] = self.resolution
        return out


class ItemResult(BaseModel):
    """One manifest line's outcome, as written to the status manifest."""

    id: str | None = None
    line: int
    status: ItemStatus | Literal["broken"]
    task_id: str | None = None
    cost: Decimal = Decimal("0")
    s3_uris: list[str] = Field(default_factory=list)
    error: dict[str, Any] | None = None


class BatchSummary(BaseModel):
    run_key: str
    status_uri: str
    items: int
    persisted: int
    resumed: int = Field(description="Items already persisted by an earlier run (skipped).")
    failed: int
    skipped: int
    broken_lines: int
    total_cost: Decimal


def _budget_for(cap: Decimal, scope: str) -> Any:
    from prefect_eggapi.tasks import Budget

    return Budget(cap=cap, scope=scope)


def _batch_key(params: BatchParams, items: list[BatchItem]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.id}\n{item.request.fingerprint()}\n".encode())
    return "batch-" + digest.hexdigest()[:20]


class _Batch:
    """Per-run state; status objects are the durable record of what finished."""

    def __init__(self, params: BatchParams, run_key: str, store: OutputStore, creds: Any) -> None:
        self.params = params
        self.run_key = run_key
        self.store = store
        self.creds = creds
        self.base = "/".join(p for p in (store.prefix, "batches", run_key) if p)
        self.semaphore = asyncio.Semaphore(params.concurrency)
        self.stop_submitting = False
        self.finished = 0
        self.existing: dict[str, set[str]] = {}  # item id -> statuses stored, from the listing
        # The cap spans every run of this batch (resumes included), not one flow run.
        self.budget = (
            None if params.budget is None else _budget_for(params.budget, f"batch:{run_key}")
        )

    def status_key(self, item_id: str, status: str) -> str:
        return f"{self.base}/items/{item_id}.{status}.json"

    def already_persisted(self) -> set[str]:
        prefix = f"{self.base}/items/"
        done = set()
        pages = self.store.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.store.bucket, Prefix=prefix
        )
        for page in pages:
            for obj in page.get("Contents", []):
                item_id, _, rest = obj["Key"][len(prefix) :].rpartition(".")[0].rpartition(".")
                self.existing.setdefault(item_id, set()).add(rest)
                if rest == "persisted":
                    done.add(item_id)
        return done

    def load_persisted(self, item_id: str) -> ItemResult:
        body = self.store.client.get_object(
            Bucket=self.store.bucket, Key=self.status_key(item_id, "persisted")
        )["Body"].read()
        return ItemResult.model_validate_json(body)

    def record(self, result: ItemResult) -> None:
        """Write the item's status object; remove a stale one of another status."""
        assert result.id is not None
        client = self.store.client
        client.put_object(
            Bucket=self.store.bucket,
            Key=self.status_key(result.id, result.status),
            Body=result.model_dump_json().encode(),
            ContentType="application/json",
        )
        # Only statuses the start-of-run listing saw can be stale (a fresh batch has none).
        known = self.existing.setdefault(result.id, set())
        for other in known - {result.status}:
            client.delete_object(Bucket=self.store.bucket, Key=self.status_key(result.id, other))
        self.existing[result.id] = {result.status}

    async def record_durably(self, result: ItemResult, attempts: int = 8) -> None:
        """Status objects survive a short S3 outage: transient errors are retried with backoff
        (about a minute in all); if S3 stays away the result still reaches status.jsonl, and a
        rerun redoes the item for free (ledger + deterministic keys)."""
        from prefect_eggapi.storage import is_transient_s3_error

        for attempt in range(attempts):
            try:
                await in_thread(partial(self.record, result))
                return
            except Exception as exc:
                if not is_transient_s3_error(exc) or attempt == attempts - 1:
                    run_logger().warning(
                        "Could not write the status object of %s: %s", result.id, exc
                    )
                    return
                await asyncio.sleep(min(16.0, 0.5 * 2**attempt))

    async def run_item(self, item: BatchItem, progress: Progress, total: int) -> ItemResult:
        from prefect_eggapi.tasks import agenerate_image

        async with self.semaphore:
            if self.stop_submitting:
                result = ItemResult(
                    id=item.id,
                    line=item.line,
                    status="skipped",
                    error={"message": "budget cap reached before this item was submitted"},
                )
            else:
                try:
                    done = await agenerate_image.with_options(retry_delay_seconds=[1, 5])(
                        item.request,
                        self.store,
                        self.creds,
                        key=f"{self.run_key}/{item.id}",
                        label=item.id,
                        budget=self.budget,
                        timeout=self.params.wait_timeout,
                        image_artifacts=False,
                    )
                    result = ItemResult(
                        id=item.id,
                        line=item.line,
                        status="persisted",
                        task_id=done.task_id,
                        cost=done.cost,
                        s3_uris=[s.uri for s in done.stored],
                    )
                except BudgetExceededError as exc:
                    self.stop_submitting = True
                    result = ItemResult(
                        id=item.id, line=item.line, status="skipped", error=describe(exc)
                    )
                except Exception as exc:
                    result = ItemResult(
                        id=item.id,
                        line=item.line,
                        status="failed",
                        task_id=getattr(exc, "task_id", None),
                        error=describe(exc),
                    )
            await self.record_durably(result)
        self.finished += 1
        percent = 100 * self.finished / max(total, 1)
        await in_thread(partial(progress.update, percent, f"{self.finished}/{total} items"))
        return result


def _status_lines(results: list[ItemResult], broken: list[BrokenLine]) -> bytes:
    rows = [r.model_dump(mode="json") for r in results]
    rows += [
        ItemResult(
            line=b.line, status="broken", error={"message": b.reason, "text": b.text}
        ).model_dump(mode="json")
        for b in broken
    ]
    rows.sort(key=lambda r: r["line"])
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()


async def run_batch(params: BatchParams, *, credentials_block: str | None = None) -> BatchSummary:
    """The batch's body (call it inside a flow run; :func:`batch_generate` does)."""
    from prefect_eggapi.artifacts import ReportRow, publish_report
    from prefect_eggapi.storage import build_s3_client

    logger = run_logger()
    overrides: dict[str, Any] = {}
    if params.bucket:
        overrides["bucket"] = params.bucket
    if params.prefix is not None:
        overrides["prefix"] = params.prefix
    try:
        settings = S3Settings.from_env(**overrides)
    except (ValidationError, ValueError) as exc:
        raise InvalidRequestError([("bucket", str(exc))], what="S3 settings") from None
    store = OutputStore.from_settings(settings)
    s3 = build_s3_client(settings) if params.manifest.startswith("s3://") else None
    items, broken = await in_thread(
        partial(
            read_manifest,
            params.manifest,
            defaults=params.defaults(),
            fmt=params.manifest_format,
            s3=s3,
        )
    )
    for b in broken:
        logger.warning("Manifest line %d skipped: %s", b.line, b.reason)
    if not items:
        raise InvalidRequestError([("manifest", f"no valid lines ({len(broken)} broken)")])
    creds = await _credentials(credentials_block)
    if params.global_rate_limit:
        creds = creds.model_copy(update={"global_rate_limit": params.global_rate_limit})
    run_key = params.run_key or await _scheduled_slot() or _batch_key(params, items)
    batch = _Batch(params, run_key, store, creds)

    done_before = await in_thread(batch.already_persisted)
    todo = [i for i in items if i.id not in done_before]
    resumed = [
        await in_thread(partial(batch.load_persisted, i.id)) for i in items if i.id in done_before
    ]
    estimate = sum((estimate_cost(i.request) for i in todo), Decimal(0))
    logger.info(
        "Batch %s: %d item(s) (%d already persisted, %d broken line(s)), up to %s, "
        "concurrency %d, into s3://%s/%s",
        run_key,
        len(items),
        len(resumed),
        len(broken),
        format_cost(estimate),
        params.concurrency,
        store.bucket,
        store.prefix,
    )

    progress = await in_thread(
        partial(Progress, f"EggAPI batch {run_key}", artifact_key("eggapi-batch", run_key))
    )
    batch.finished = len(resumed)
    results = list(resumed)
    results += await asyncio.gather(*(batch.run_item(i, progress, len(items)) for i in todo))

    status_key = f"{batch.base}/status.jsonl"
    body = _status_lines(results, broken)
    await in_thread(
        partial(
            store.client.put_object,
            Bucket=store.bucket,
            Key=status_key,
            Body=body,
            ContentType="application/x-ndjson",
        )
    )
    by_status = {
        s: [r for r in results if r.status == s] for s in ("persisted", "failed", "skipped")
    }
    total = sum((r.cost for r in results), Decimal(0))
    summary = BatchSummary(
        run_key=run_key,
        status_uri=store.uri(status_key),
        items=len(items),
        persisted=len(by_status["persisted"]),
        resumed=len(resumed),
        failed=len(by_status["failed"]),
        skipped=len(by_status["skipped"]),
        broken_lines=len(broken),
        total_cost=total,
    )
    problems = [
        ReportRow(
            label=r.id or f"line {r.line}",
            task_id=r.task_id,
            status=r.status,
            error=(r.error or {}).get("message", ""),
        )
        for r in results
        if r.status != "persisted"
    ] + [ReportRow(label=f"line {b.line}", status="broken", error=b.reason) for b in broken]
    await in_thread(
        partial(
            publish_report,
            problems,
            key=artifact_key("eggapi-batch-problems", run_key),
            title=f"EggAPI batch {run_key}: items not persisted",
        )
    )
    logger.info(
        "Batch %s: %d persisted (%d resumed), %d failed, %d skipped, %d broken line(s); %s; "
        "status %s",
        run_key,
        summary.persisted,
        summary.resumed,
        summary.failed,
        summary.skipped,
        summary.broken_lines,
        format_cost(total),
        summary.status_uri,
    )
    if params.fail_on_item_error and (summary.failed or summary.skipped or summary.broken_lines):
        raise BatchError(
            f"batch {run_key}: {summary.failed} failed, {summary.skipped} skipped, "
            f"{summary.broken_lines} broken line(s) of {len(items) + len(broken)}; "
            f"every line is accounted for in {summary.status_uri}"
        )
    return summary


@flow(name="eggapi-batch", validate_parameters=True)
async def batch_generate(
    manifest: str,
    manifest_format: Literal["jsonl", "csv"] | None = None,
    model: Literal["nanobanana", "nanobanana-pro"] = "nanobanana",
    aspect_ratio: Literal["16:9", "9:16"] = "16:9",
    resolution: Literal["1k", "2k", "4k"] | None = None,
    num_outputs: int = 1,
    concurrency: int = 16,
    budget: float | None = None,
    wait_timeout: float = 600.0,
    bucket: str | None = None,
    prefix: str | None = None,
    run_key: str | None = None,
    global_rate_limit: str | None = None,
    fail_on_item_error: bool = True,
    credentials_block: str | None = None,
) -> BatchSummary:
    """Generate one image set per manifest line; resumable, budgeted, accounted line by line.

    Args:
        manifest: path or ``s3://`` URI of a JSONL or CSV file; each line has ``prompt`` and
            optionally ``id``, ``model``, ``negative_prompt``, ``aspect_ratio``,
            ``resolution``, ``num_outputs``, ``image_urls``.
        model, aspect_ratio, resolution, num_outputs: defaults for lines that do not say.
        concurrency: items in flight at once.
        budget: USD cap for the whole batch (estimated before each submit).
        run_key: names the batch for resume (default: a hash of its items).
        global_rate_limit: name of a Prefect global concurrency limit shared by all workers.
        fail_on_item_error: end the run Failed when any line failed, was skipped or broken.
    """
    params = BatchParams.parse(
        {
            "manifest": manifest,
            "manifest_format": manifest_format,
            "model": model,
            "aspect_ratio": aspect_ratio,
            "resolution": resolution,
            "num_outputs": num_outputs,
            "concurrency": concurrency,
            "budget": None if budget is None else Decimal(str(budget)),
            "wait_timeout": wait_timeout,
            "bucket": bucket,
            "prefix": prefix,
            "run_key": run_key,
            "global_rate_limit": global_rate_limit,
            "fail_on_item_error": fail_on_item_error,
        }
    )
    return await run_batch(params, credentials_block=credentials_block)
