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

**Line ranges.** ``lines="start:stop"`` runs only the manifest lines numbered ``start`` up to,
not including, ``stop`` (1-based, as status.jsonl numbers them; either side may be empty). The
whole manifest is still read and validated, and the run key and every item's key are those of
the whole manifest, so a range run, a rerun of it, or an unsharded run of the same manifest
share their work and never pay twice. A range run writes its lines' status to
``batches/{run_key}/shards/lines-{start}-{stop}.status.jsonl``; ``status.jsonl`` is the whole
manifest's, written by an unsharded run or by :func:`~prefect_eggapi.flows.sharded
.sharded_batch_generate`, which runs K ranges as flow runs of a deployment.

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
from pydantic import BaseModel, Field, StrictInt, field_validator

from prefect_eggapi.client.errors import BudgetExceededError, InvalidRequestError, describe
from prefect_eggapi.client.pricing import estimate_cost, format_cost
from prefect_eggapi.client.types import AspectRatio, Model, Resolution
from prefect_eggapi.flows.manifests import BatchItem, BrokenLine, read_manifest
from prefect_eggapi.flows.pipeline import FlowParams, _credentials, _scheduled_slot, s3_settings
from prefect_eggapi.safety.ledger import LedgerStore, default_ledger
from prefect_eggapi.storage import (
    OutputStore,
    is_transient_s3_error,
    put_if,
    read_object,
)
from prefect_eggapi.tasks.artifacts import Progress, artifact_key
from prefect_eggapi.tasks.runtime import flow_run_id, in_thread, run_logger

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
    # Strict, as in GenerateRequest: "2" from a form or a CLI is refused, not paid for twice over.
    num_outputs: int = Field(1, ge=1, le=4, strict=True)
    concurrency: int = Field(16, ge=1, le=1000, strict=True, description="Items in flight.")
    budget: Decimal | None = Field(None, ge=0, description="USD cap for the whole batch.")
    wait_timeout: float = Field(600.0, gt=0, le=7 * 24 * 3600)
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
        out: dict[str, Any] = {
            "model": self.model,
            "aspect_ratio": self.aspect_ratio,
            "num_outputs": self.num_outputs,
        }
        if self.resolution:
            out["resolution"] = self.resolution
        return out


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


class ItemResult(BaseModel):
    """One manifest line's outcome, as written to the status manifest."""

    id: str | None = None
    line: int
    status: ItemStatus | Literal["broken"]
    task_id: str | None = None
    cost: Decimal = Decimal("0")
    s3_uris: list[str] = Field(default_factory=list)
    error: dict[str, Any] | None = None
    # The flow run whose status object this is: it accounts for the item's cost. A retry of
    # that flow run (same id) takes over what a crashed attempt persisted.
    run_id: str | None = None


class BatchSummary(BaseModel):
    """One run's view of the batch. ``total_cost`` is what *this run* paid: every persisted
    item's cost is counted by exactly one run (the one whose status object for it was written
    first), so the runs of a batch add up to what was billed; ``batch_cost`` is the whole
    batch's."""

    run_key: str
    status_uri: str
    items: int
    persisted: int
    resumed: int = Field(description="Items already persisted by an earlier run (skipped).")
    reused: int = Field(0, description="Items another run of the batch persisted meanwhile.")
    failed: int
    skipped: int
    broken_lines: int
    total_cost: Decimal = Field(description="What this run paid.")
    batch_cost: Decimal = Field(Decimal(0), description="What the batch's items cost in all.")
    lines: str | None = Field(None, description="The line range this run covered (None: all).")


def _budget_for(cap: Decimal, scope: str) -> Any:
    from prefect_eggapi.tasks import Budget

    return Budget(cap=cap, scope=scope)


def _batch_key(params: BatchParams, items: list[BatchItem]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.id}\n{item.request.fingerprint()}\n".encode())
    return "batch-" + digest.hexdigest()[:20]


def batch_base(store: OutputStore, run_key: str) -> str:
    """Where a batch's status objects and ``status.jsonl`` live."""
    return "/".join(p for p in (store.prefix, "batches", run_key) if p)


def item_status_key(base: str, item_id: str, status: str) -> str:
    return f"{base}/items/{item_id}.{status}.json"


def load_item_status(store: OutputStore, base: str, item_id: str, status: str) -> ItemResult | None:
    found = read_object(store.client, store.bucket, item_status_key(base, item_id, status))
    return ItemResult.model_validate_json(found[0]) if found else None


def _delete_statuses(store: OutputStore, base: str, item_id: str, statuses: set[str]) -> None:
    """Remove the item's other status objects in one request (missing keys are fine): every
    persisted item pays this once, so two DELETEs per item would add up in a large batch."""
    if not statuses:
        return
    store.client.delete_objects(
        Bucket=store.bucket,
        Delete={
            "Objects": [{"Key": item_status_key(base, item_id, s)} for s in sorted(statuses)],
            "Quiet": True,
        },
    )


def record_item_status(
    store: OutputStore, base: str, result: ItemResult
) -> tuple[ItemResult, bool]:
    """Write the item's one final status; returns it and whether ``result`` is it.

    ``persisted`` is written only where none exists (If-None-Match): when two runs finish
    one item, the first write stands and the other run reports the item as reused, at no
    cost. A failure never stands beside a persisted result: it is written only while none
    exists, and taken back if one appeared meanwhile (the persisting run deletes stale
    failures after its own write, so either order leaves one status).
    """
    assert result.id is not None
    client, bucket = store.client, store.bucket
    body = result.model_dump_json().encode()
    others = {"persisted", "failed", "skipped"} - {result.status}
    persisted_key = item_status_key(base, result.id, "persisted")
    if result.status == "persisted":
        if put_if(client, bucket, persisted_key, body, None) is None:
            winner = load_item_status(store, base, result.id, "persisted")
            if winner is not None:
                return winner, False
            client.put_object(  # deleted in between: ours is the only one now
                Bucket=bucket, Key=persisted_key, Body=body
            )
        _delete_statuses(store, base, result.id, others)
        return result, True
    winner = load_item_status(store, base, result.id, "persisted")
    if winner is not None:
        return winner, False
    client.put_object(
        Bucket=bucket,
        Key=item_status_key(base, result.id, result.status),
        Body=body,
        ContentType="application/json",
    )
    _delete_statuses(store, base, result.id, others - {"persisted"})
    winner = load_item_status(store, base, result.id, "persisted")
    if winner is not None:
        _delete_statuses(store, base, result.id, {result.status})
        return winner, False
    return result, True


class _Batch:
    """Per-run state; status objects are the durable record of what finished."""

    def __init__(
        self,
        params: BatchParams,
        run_key: str,
        store: OutputStore,
        creds: Any,
        ledger: LedgerStore,
    ) -> None:
        self.params = params
        self.run_key = run_key
        self.store = store
        self.creds = creds
        self.ledger = ledger
        self.paid = Decimal(0)  # what this run's own status objects account for
        self.reused = 0
        self.run_id = flow_run_id()
        self.base = batch_base(store, run_key)
        self.semaphore = asyncio.Semaphore(params.concurrency)
        self.stop_submitting = False
        self.finished = 0
        self.existing: dict[str, set[str]] = {}  # item id -> statuses stored, from the listing
        # The cap spans every run of this batch (resumes included), not one flow run.
        self.budget = (
            None if params.budget is None else _budget_for(params.budget, f"batch:{run_key}")
        )

    def status_key(self, item_id: str, status: str) -> str:
        return item_status_key(self.base, item_id, status)

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

    def load_persisted(self, item_id: str) -> ItemResult | None:
        return load_item_status(self.store, self.base, item_id, "persisted")

    def record(self, result: ItemResult) -> tuple[ItemResult, bool]:
        """The item's one final status (see :func:`record_item_status`), written by this run."""
        result.run_id = self.run_id
        return record_item_status(self.store, self.base, result)

    async def record_durably(self, result: ItemResult, attempts: int = 8) -> ItemResult:
        """The item's final status (see :meth:`record`), counted once into this run's spend.

        Status objects survive a short S3 outage: transient errors are retried with backoff
        (about a minute in all); if S3 stays away the result still reaches status.jsonl, and a
        rerun redoes the item for free (ledger + deterministic keys)."""
        final, ours = result, True
        for attempt in range(attempts):
            try:
                final, ours = await in_thread(partial(self.record, result))
                break
            except Exception as exc:
                if not is_transient_s3_error(exc) or attempt == attempts - 1:
                    run_logger().warning(
                        "Could not write the status object of %s: %s", result.id, exc
                    )
                    break
                await asyncio.sleep(min(16.0, 0.5 * 2**attempt))
        if ours:
            self.paid += final.cost
        elif final.status == "persisted":
            self.reused += 1
        return final

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
                        credentials=self.creds,
                        key=f"{self.run_key}/{item.id}",
                        label=item.id,
                        budget=self.budget,
                        timeout=self.params.wait_timeout,
                        image_artifacts=False,
                        ledger=self.ledger,
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
            result = await self.record_durably(result)
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


def _write_status(
    batch: _Batch, key: str, results: list[ItemResult], broken: list[BrokenLine]
) -> list[ItemResult]:
    """Write ``status.jsonl`` from each item's final status; returns those statuses.

    Items this run did not see persisted are read again first (another run of the batch may
    have persisted them since), and the write is conditional on the status file this run read
    before that: if another run wrote it meanwhile, look again. So the last file written never
    says failed for an item that is persisted.
    """
    store = batch.store
    while True:
        current = read_object(store.client, store.bucket, key)
        final = []
        for result in results:
            if result.status != "persisted" and result.id is not None:
                result = batch.load_persisted(result.id) or result
            final.append(result)
        body = _status_lines(final, broken)
        version = current[1] if current else None
        if put_if(
            store.client, store.bucket, key, body, version, content_type="application/x-ndjson"
        ):
            return final


async def publish_problems(
    results: list[ItemResult], broken: list[BrokenLine], *, key: str, what: str
) -> None:
    """The table of every line that did not end persisted (failed, skipped, broken)."""
    from prefect_eggapi.tasks.artifacts import ReportRow, publish_report

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
        partial(publish_report, problems, key=key, title=f"EggAPI {what}: items not persisted")
    )


async def open_manifest(
    params: BatchParams,
) -> tuple[OutputStore, list[BatchItem], list[BrokenLine]]:
    """The output store and the manifest's items and broken lines; refuses a manifest with no
    valid line before anything is paid."""
    from prefect_eggapi.storage import build_s3_client

    settings = s3_settings(params.bucket, params.prefix)
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
    if not items:
        raise InvalidRequestError([("manifest", f"no valid lines ({len(broken)} broken)")])
    return store, items, broken


async def run_batch(params: BatchParams, *, credentials_block: str | None = None) -> BatchSummary:
    """The batch's body (call it inside a flow run; :func:`batch_generate` does)."""

    logger = run_logger()
    store, items, broken = await open_manifest(params)
    # The key names the whole manifest, never the range: every range run and the unsharded run
    # of one manifest share its items' keys (ledger entries, status objects, outputs).
    run_key = params.run_key or await _scheduled_slot() or _batch_key(params, items)
    bounds = params.line_range()
    if bounds is not None:
        items = [i for i in items if in_range(i.line, bounds)]
        broken = [b for b in broken if in_range(b.line, bounds)]
    for b in broken:
        logger.warning("Manifest line %d skipped: %s", b.line, b.reason)
    creds = await _credentials(credentials_block)
    if params.global_rate_limit:
        creds = creds.model_copy(update={"global_rate_limit": params.global_rate_limit})
    # A range's progress and report artifacts are its own: K ranges run at once.
    label = run_key if bounds is None else f"{run_key}-{range_label(bounds)}"
    # Beside the outputs unless configured: a run retried in a fresh container finds it.
    ledger = await in_thread(partial(default_ledger, beside=store))
    batch = _Batch(params, run_key, store, creds, ledger)

    done_before = await in_thread(batch.already_persisted)
    resumed = [
        r
        for r in [
            await in_thread(partial(batch.load_persisted, i.id))
            for i in items
            if i.id in done_before
        ]
        if r is not None
    ]
    resumed_ids = {r.id for r in resumed}
    # What an earlier, crashed attempt of this same flow run persisted is this run's to report.
    mine = [r.cost for r in resumed if r.run_id and r.run_id == batch.run_id]
    batch.paid += sum(mine, Decimal(0))
    todo = [i for i in items if i.id not in resumed_ids]
    estimate = sum((estimate_cost(i.request) for i in todo), Decimal(0))
    logger.info(
        "Batch %s%s: %d item(s) (%d already persisted, %d broken line(s)), up to %s, "
        "concurrency %d, into s3://%s/%s",
        run_key,
        "" if params.lines is None else f" lines {params.lines}",
        len(items),
        len(resumed),
        len(broken),
        format_cost(estimate),
        params.concurrency,
        store.bucket,
        store.prefix,
    )

    progress = await in_thread(
        partial(Progress, f"EggAPI batch {label}", artifact_key("eggapi-batch", label))
    )
    batch.finished = len(resumed)
    results = list(resumed)
    results += await asyncio.gather(*(batch.run_item(i, progress, len(items)) for i in todo))

    status_key = (
        f"{batch.base}/status.jsonl"
        if bounds is None
        else f"{batch.base}/shards/{range_label(bounds)}.status.jsonl"
    )
    results = await in_thread(partial(_write_status, batch, status_key, results, broken))
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
        reused=batch.reused,
        total_cost=batch.paid,
        batch_cost=total,
        lines=params.lines,
    )
    await publish_problems(
        results, broken, key=artifact_key("eggapi-batch-problems", label), what=f"batch {label}"
    )
    logger.info(
        "Batch %s: %d persisted (%d resumed, %d by another run), %d failed, %d skipped, "
        "%d broken line(s); this run paid %s of %s; status %s",
        run_key,
        summary.persisted,
        summary.resumed,
        summary.reused,
        summary.failed,
        summary.skipped,
        summary.broken_lines,
        format_cost(batch.paid),
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
    num_outputs: StrictInt = 1,
    concurrency: StrictInt = 16,
    budget: float | None = None,
    wait_timeout: float = 600.0,
    bucket: str | None = None,
    prefix: str | None = None,
    run_key: str | None = None,
    global_rate_limit: str | None = None,
    fail_on_item_error: bool = True,
    credentials_block: str | None = None,
    lines: str | None = None,
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
        lines: ``"start:stop"``, only those manifest lines (1-based, stop excluded) under the
            whole manifest's run key and item keys; for shards (see ``sharded_batch_generate``).
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
            "lines": lines,
        }
    )
    return await run_batch(params, credentials_block=credentials_block)
