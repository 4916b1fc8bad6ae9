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

The module is above the ~400-line mark because it is one run's state (``_Batch``) and the flow
that drives it; parameters, context, status objects and reports already live in their own modules.
"""

from __future__ import annotations

import asyncio
import hashlib
from decimal import Decimal
from functools import partial

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field, StrictInt

from prefect_eggapi.client.errors import BudgetExceededError, InvalidRequestError, describe
from prefect_eggapi.client.pricing import estimate_cost, format_cost
from prefect_eggapi.client.types import AspectRatio, Model, Resolution
from prefect_eggapi.flows.context import RunContext, load_credentials, s3_settings, scheduled_slot
from prefect_eggapi.flows.manifests import BatchItem, BrokenLine, read_manifest
from prefect_eggapi.flows.params import (
    BatchParams,
    ManifestFormat,
    in_range,
    parse_lines,
    range_label,
)
from prefect_eggapi.flows.report import publish_problems
from prefect_eggapi.flows.status import (
    ItemResult,
    ItemStatus,
    batch_base,
    item_status_key,
    list_item_statuses,
    load_item_status,
    record_item_status,
    write_status_file,
)
from prefect_eggapi.flows.status import status_lines as _status_lines
from prefect_eggapi.safety.ledger import default_ledger
from prefect_eggapi.storage import OutputStore, build_s3_client, is_transient_s3_error
from prefect_eggapi.tasks import Budget, GenerationResult, agenerate_image
from prefect_eggapi.tasks.artifacts import Progress, artifact_key
from prefect_eggapi.tasks.generate import GenerateArgs, agenerate_with_retries
from prefect_eggapi.tasks.runtime import flow_run_id, in_thread, quiet_steps, run_logger

# Names other modules and tests import from here; they live in params, status and report now.
__all__ = [
    "BatchError",
    "BatchParams",
    "BatchSummary",
    "ItemResult",
    "ItemStatus",
    "_status_lines",
    "batch_base",
    "batch_generate",
    "in_range",
    "item_status_key",
    "load_item_status",
    "open_manifest",
    "parse_lines",
    "publish_problems",
    "range_label",
    "record_item_status",
    "run_batch",
]


#: Delays between an item's tries (two retries): shorter than a lone task's, a batch has many.
ITEM_RETRY_DELAYS = (1.0, 5.0)


class BatchError(RuntimeError):
    """Some items failed or were skipped; the status manifest accounts for every line."""


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

    def raise_unless_complete(self, what: str, lines: int) -> None:
        """:class:`BatchError` when any of the ``lines`` failed, was skipped or was broken."""
        if self.failed or self.skipped or self.broken_lines:
            raise BatchError(
                f"{what}: {self.failed} failed, {self.skipped} skipped, "
                f"{self.broken_lines} broken line(s) of {lines}; "
                f"every line is accounted for in {self.status_uri}"
            )


def batch_key(items: list[BatchItem]) -> str:
    """The default run key: a hash of the manifest's items (ids and requests), so running the
    same manifest again resumes it."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.id}\n{item.request.fingerprint()}\n".encode())
    return "batch-" + digest.hexdigest()[:20]


class _Batch:
    """Per-run state; status objects are the durable record of what finished."""

    def __init__(self, params: BatchParams, ctx: RunContext) -> None:
        self.params = params
        self.ctx = ctx
        self.paid = Decimal(0)  # what this run's own status objects account for
        self.reused = 0
        self.run_id = flow_run_id()
        self.base = batch_base(ctx.store, ctx.run_key)
        self.semaphore = asyncio.Semaphore(params.concurrency)
        self.slots_taken = 0  # items that got one of the ``concurrency`` slots (run_chunks)
        self._slot_taken = asyncio.Event()
        self.stop_submitting = False
        self.finished = 0
        # The cap spans every run of this batch (resumes included), not one flow run.
        self.budget = (
            None
            if params.budget is None
            else Budget(cap=params.budget, scope=f"batch:{ctx.run_key}")
        )

    def already_persisted(self) -> set[str]:
        found = list_item_statuses(self.ctx.store, self.base)
        return {item_id for item_id, statuses in found.items() if "persisted" in statuses}

    def load_persisted(self, item_id: str) -> ItemResult | None:
        return load_item_status(self.ctx.store, self.base, item_id, "persisted")

    def record(self, result: ItemResult) -> tuple[ItemResult, bool]:
        """The item's one final status (see :func:`record_item_status`), written by this run."""
        result.run_id = self.run_id
        return record_item_status(self.ctx.store, self.base, result)

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

    async def generate(self, item: BatchItem) -> GenerationResult:
        """One item's submit -> wait -> persist: its own task run, or (``items_per_task`` > 1)
        inside its chunk's task run with the same retries and one log line of its own."""
        args = GenerateArgs(
            item.request,
            self.ctx.store,
            credentials=self.ctx.credentials,
            key=f"{self.ctx.run_key}/{item.id}",
            label=item.id,
            budget=self.budget,
            timeout=self.params.wait_timeout,
            image_artifacts=False,
            ledger=self.ctx.ledger,
        )
        if self.params.items_per_task == 1:
            # The task binds the record's fields as its parameters (see tasks.twins).
            own_run = agenerate_image.with_options(retry_delay_seconds=list(ITEM_RETRY_DELAYS))
            done: GenerationResult = await own_run(**vars(args))
            return done
        with quiet_steps():
            return await agenerate_with_retries(args, ITEM_RETRY_DELAYS)

    async def run_item(self, item: BatchItem, progress: Progress, total: int) -> ItemResult:
        async with self.semaphore:
            self.slots_taken += 1
            self._slot_taken.set()
            if self.stop_submitting:
                result = ItemResult(
                    id=item.id,
                    line=item.line,
                    status="skipped",
                    error={"message": "budget cap reached before this item was submitted"},
                )
            else:
                try:
                    done = await self.generate(item)
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
        if self.params.items_per_task > 1:
            log_item(result)
        self.finished += 1
        percent = 100 * self.finished / max(total, 1)
        await progress.aupdate(percent, f"{self.finished}/{total} items")
        return result

    async def run_chunk(
        self, items: list[BatchItem], progress: Progress, total: int
    ) -> list[ItemResult]:
        """``items`` in one task run named after their lines (see :func:`generate_items`)."""
        name = f"items · lines {items[0].line}-{items[-1].line} · {len(items)}"
        return await generate_items.with_options(task_run_name=name)(self, items, progress, total)

    async def run_chunks(
        self, chunks: list[list[BatchItem]], progress: Progress, total: int
    ) -> list[ItemResult]:
        """The chunks' task runs, each started once every item of the chunks before it holds a
        slot: at most one chunk waits for slots, the rest are not started yet.

        Started all at once, a 10,000-item batch showed 100 chunk runs as Running for its whole
        length, most of them with nothing running, and kept every item's coroutine alive from
        the start. In turn, a run shows Running while its items run; a chunk whose last items
        are slow (retries, long waits) holds only those, and the next chunk takes the free slots.
        """
        runs: list[asyncio.Future[list[ItemResult]]] = []
        queued = 0
        for chunk in chunks:
            run = asyncio.ensure_future(self.run_chunk(chunk, progress, total))
            runs.append(run)
            queued += len(chunk)
            while self.slots_taken < queued and not run.done():
                self._slot_taken.clear()
                taken = asyncio.ensure_future(self._slot_taken.wait())
                await asyncio.wait({taken, run}, return_when=asyncio.FIRST_COMPLETED)
                taken.cancel()
        return [result for chunk_results in await asyncio.gather(*runs) for result in chunk_results]

    def write_status(
        self, key: str, results: list[ItemResult], broken: list[BrokenLine]
    ) -> list[ItemResult]:
        """Write ``status.jsonl`` from each item's final status; returns those statuses.

        Items this run did not see persisted are read again first (another run of the batch
        may have persisted them since), at every attempt of the conditional write."""

        def final() -> list[ItemResult]:
            return [
                (self.load_persisted(r.id) or r)
                if r.status != "persisted" and r.id is not None
                else r
                for r in results
            ]

        return write_status_file(self.ctx.store, key, final, broken)


def log_item(result: ItemResult) -> None:
    """The one log line of an item run inside a chunk (its steps log warnings only)."""
    logger = run_logger()
    where = f"line {result.line} ({result.id})"
    if result.status == "persisted":
        logger.info(
            "%s: EggAPI task %s persisted, %s: %s",
            where,
            result.task_id,
            format_cost(result.cost),
            ", ".join(result.s3_uris),
        )
    else:
        message = (result.error or {}).get("message", "")
        logger.warning("%s: %s (EggAPI task %s): %s", where, result.status, result.task_id, message)


@task(name="eggapi-batch-items", cache_policy=NO_CACHE)
async def generate_items(
    batch: _Batch, items: list[BatchItem], progress: Progress, total: int
) -> list[ItemResult]:
    """A chunk of a batch's items in one task run (``items_per_task`` > 1).

    At thousands of items a task run per item was most of the cost per image: its states,
    events and logs, written by this process and stored by the API server. A chunk keeps the
    per-item record elsewhere — one log line per item here, the item's status object, the
    problems table, the ``eggapi.task.*`` events — and each item keeps its own retries. The
    chunk's run completes even when some of its items failed: they are accounted for, line by
    line, in ``status.jsonl``.
    """
    return list(await asyncio.gather(*(batch.run_item(i, progress, total) for i in items)))


async def open_manifest(
    params: BatchParams,
) -> tuple[OutputStore, list[BatchItem], list[BrokenLine]]:
    """The output store and the manifest's items and broken lines; refuses a manifest with no
    valid line before anything is paid."""
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
    run_key = params.run_key or await scheduled_slot() or batch_key(items)
    bounds = params.line_range()
    if bounds is not None:
        items = [i for i in items if in_range(i.line, bounds)]
        broken = [b for b in broken if in_range(b.line, bounds)]
    for b in broken:
        logger.warning("Manifest line %d skipped: %s", b.line, b.reason)
    creds = await load_credentials(credentials_block)
    if params.global_rate_limit:
        creds = creds.model_copy(update={"global_rate_limit": params.global_rate_limit})
    # A range's progress and report artifacts are its own: K ranges run at once.
    label = run_key if bounds is None else f"{run_key}-{range_label(bounds)}"
    # Beside the outputs unless configured: a run retried in a fresh container finds it.
    ledger = await in_thread(partial(default_ledger, beside=store))
    batch = _Batch(params, RunContext(run_key, store, creds, ledger))

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
    size = params.items_per_task
    if size == 1:
        results += await asyncio.gather(*(batch.run_item(i, progress, len(items)) for i in todo))
    else:
        chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
        results += await batch.run_chunks(chunks, progress, len(items))

    status_key = (
        f"{batch.base}/status.jsonl"
        if bounds is None
        else f"{batch.base}/shards/{range_label(bounds)}.status.jsonl"
    )
    results = await in_thread(partial(batch.write_status, status_key, results, broken))
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
    if params.fail_on_item_error:
        summary.raise_unless_complete(f"batch {run_key}", len(items) + len(broken))
    return summary


@flow(name="eggapi-batch", validate_parameters=True)
async def batch_generate(
    manifest: str,
    manifest_format: ManifestFormat | None = None,
    model: Model = "nanobanana",
    aspect_ratio: AspectRatio = "16:9",
    resolution: Resolution | None = None,
    num_outputs: StrictInt = 1,
    concurrency: StrictInt = 16,
    items_per_task: StrictInt = 1,
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
        items_per_task: items per task run. 1 (the default): each item is a task run of its
            own (``generate · <model> · <id>``). Above 1, consecutive items share one
            ``eggapi-batch-items`` task run and each logs one line (its steps log warnings
            only): the cost per image no longer grows with Prefect's per-run bookkeeping.
            Retries, the ledger, status objects and events are the same either way.
        budget: USD cap for the whole batch (estimated before each submit).
        run_key: names the batch for resume (default: a hash of its items).
        global_rate_limit: name of a Prefect global concurrency limit shared by all workers.
        fail_on_item_error: end the run Failed when any line failed, was skipped or broken.
        lines: ``"start:stop"``, only those manifest lines (1-based, stop excluded) under the
            whole manifest's run key and item keys; for shards (see ``sharded_batch_generate``).
    """
    params = BatchParams.from_flow(locals())
    return await run_batch(params, credentials_block=credentials_block)
