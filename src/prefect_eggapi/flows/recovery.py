"""Collect paid results nobody is waiting for any more: abandoned waits, crashed runs, orphans.

EggAPI cannot cancel a task, so a wait that hit its deadline (``abandoned``) or a run that died
after submitting leaves work that may still complete and bill. Output retention is unknown, so
this flow, meant to run on a schedule, finds those tasks and persists their outputs promptly:

* entries of *this* ledger that are ``abandoned``, ``submitted`` or ``completed`` but not
  ``persisted``, stored under the usual deterministic keys beside the other outputs;
* ``ambiguous`` entries (a lost answer that could not be attributed when it happened) that can
  be attributed now — from their webhook delivery, or from the task list once the submits around
  them have answers — never by posting; then stored like the others. A batch item that had
  failed for it gets its ``persisted`` status object, and the batch's ``status.jsonl`` is
  rewritten to say so;
* tasks an entry paid for beyond its own (a late answer after another worker took the claim
  over: ``extra_tasks``), stored under ``{prefix}/unattributed/``;
* only with ``include_unknown``: completed tasks in ``GET /v1/tasks`` that this ledger has never
  seen (another ledger's, another job's on the same key, or a submit whose ledger write was
  lost), also under ``{prefix}/unattributed/`` — never mixed with this ledger's outputs.

Re-running is free (stored outputs are skipped); failed tasks are recorded; unfinished ones are
left for the next run; one item that cannot be stored does not stop the others.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial

from prefect import flow
from pydantic import BaseModel, Field

from prefect_eggapi.client import EggAPIClient
from prefect_eggapi.client.errors import (
    ContentModerationError,
    EmptyOutputError,
    TaskFailedError,
    describe,
)
from prefect_eggapi.client.types import EggAPITask, TaskStatus
from prefect_eggapi.credentials import EggAPICredentials
from prefect_eggapi.flows.context import load_credentials, s3_settings
from prefect_eggapi.flows.status import (
    ItemResult,
    batch_base,
    load_item_status,
    record_item_status,
)
from prefect_eggapi.safety.ledger import (
    EntryState,
    LedgerEntry,
    LedgerStore,
    default_ledger,
    ledger_key,
)
from prefect_eggapi.safety.submitter import Submitter, record_outcome
from prefect_eggapi.storage import OutputStore, StoredImage, put_if, read_object
from prefect_eggapi.tasks import download_outputs
from prefect_eggapi.tasks.runtime import flow_run_id, in_thread, run_logger

PENDING_STATES = {EntryState.ABANDONED, EntryState.SUBMITTED, EntryState.COMPLETED}


class RecoverySummary(BaseModel):
    checked: int = 0
    attributed: list[str] = Field(
        default_factory=list, description="Ambiguous entries' tasks attributed now."
    )
    items_settled: list[str] = Field(
        default_factory=list, description="Batch items that had failed and are persisted now."
    )
    persisted: list[str] = Field(default_factory=list, description="Task ids stored now.")
    unattributed: list[str] = Field(
        default_factory=list, description="Of those, tasks stored under {prefix}/unattributed/."
    )
    failed: list[str] = Field(default_factory=list)
    still_running: list[str] = Field(default_factory=list)
    errors: dict[str, str] = Field(default_factory=dict)
    recovered_cost: Decimal = Decimal("0")


def _attribute_late(
    ledger: LedgerStore, client: EggAPIClient, min_age: float, summary: RecoverySummary
) -> None:
    """Settle ambiguous entries that can be attributed now (never posting anything)."""
    now = datetime.now(UTC)
    submitter = Submitter(client, ledger, delivery_wait_seconds=0)
    for entry in ledger.entries({EntryState.AMBIGUOUS}):
        if (now - entry.updated_at).total_seconds() < min_age:
            continue
        outcome = submitter.attribute(entry.key)
        if outcome is not None:
            summary.attributed.append(outcome.task.id)


def _candidates(
    ledger: LedgerStore,
    client: EggAPIClient,
    scan_pages: int,
    include_unknown: bool,
    min_age: float,
) -> tuple[list[str], set[str]]:
    """Task ids to look at, and which of them belong to no item of this ledger."""
    now = datetime.now(UTC)
    ids: list[str] = []
    unattributed: set[str] = set()
    for entry in ledger.entries():
        old_enough = (now - entry.updated_at).total_seconds() >= min_age
        if entry.state in PENDING_STATES and entry.task_id and old_enough:
            ids.append(entry.task_id)
        for extra in entry.extra_tasks:
            ids.append(extra)
            unattributed.add(extra)
    if scan_pages and include_unknown:
        known = ledger.known_task_ids()
        horizon = now - timedelta(seconds=min_age)
        for task in client.iter_tasks(per_page=100, max_pages=scan_pages):
            if (
                task.status is TaskStatus.COMPLETED
                and task.id not in known
                and task.id not in ids
                and (task.created_at is None or task.created_at <= horizon)
            ):
                ids.append(task.id)
                unattributed.add(task.id)
    return ids, unattributed


def _recover_one(
    task_id: str,
    client: EggAPIClient,
    store: OutputStore,
    creds: EggAPICredentials,
    ledger: LedgerStore,
    summary: RecoverySummary,
) -> tuple[EggAPITask, list[StoredImage]] | None:
    """Store one task's outputs if it completed; (task, stored) when it did."""
    task: EggAPITask = client.get_task(task_id)
    summary.checked += 1
    if not task.is_terminal:
        summary.still_running.append(task_id)
        return None
    if task.status is TaskStatus.FAILED:
        moderated = (task.error or "").lower().startswith("content moderation")
        error = ContentModerationError(task) if moderated else TaskFailedError(task)
        record_outcome(ledger, task_id, error=error)
        summary.failed.append(task_id)
        return None
    if not task.output_urls:
        record_outcome(ledger, task_id, error=EmptyOutputError(task))
        summary.failed.append(task_id)
        return None
    if ledger.find_task(task_id) is None:
        _adopt_orphan(ledger, task)
    else:
        record_outcome(ledger, task_id, task=task)
    stored = download_outputs.fn(
        task, store, credentials=creds, label="recovered", image_artifacts=False, ledger=ledger
    )
    summary.persisted.append(task_id)
    summary.recovered_cost += task.cost_amount
    return task, stored


def _settle_item(
    store: OutputStore, entry: LedgerEntry, task: EggAPITask, stored: list[StoredImage], run: str
) -> bool:
    """The batch item that failed for this entry's lost answer is persisted now: its status
    object says so (the failed one is removed), and so does the batch's ``status.jsonl``."""
    item_id, suffix = entry.label, f"/{entry.label}"
    if not item_id or not entry.logical_key.endswith(suffix):
        return False  # not a batch item (batches key items as "{run_key}/{item_id}")
    base = batch_base(store, entry.logical_key[: -len(suffix)])
    failed = load_item_status(store, base, item_id, "failed")
    if failed is None:
        return False
    result = ItemResult(
        id=item_id,
        line=failed.line,
        status="persisted",
        task_id=task.id,
        cost=task.cost_amount,
        s3_uris=[image.uri for image in stored],
        run_id=run,
    )
    final, ours = record_item_status(store, base, result)
    if ours:
        _rewrite_status_line(store, f"{base}/status.jsonl", final)
    return ours


def _rewrite_status_line(store: OutputStore, key: str, result: ItemResult, tries: int = 8) -> None:
    """Replace the item's row in ``status.jsonl`` (conditional on the version read)."""
    for _ in range(tries):
        found = read_object(store.client, store.bucket, key)
        if found is None:
            return
        rows = [json.loads(line) for line in found[0].decode().splitlines() if line.strip()]
        fresh = result.model_dump(mode="json")
        rows = [fresh if row.get("id") == result.id else row for row in rows]
        body = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()
        if put_if(
            store.client, store.bucket, key, body, found[1], content_type="application/x-ndjson"
        ):
            return


def _adopt_orphan(ledger: LedgerStore, task: EggAPITask) -> None:
    """A paid task no entry knows (its ledger write was lost): record it so it is kept once."""
    ledger.put(
        LedgerEntry(
            key=ledger_key(f"orphan/{task.id}", "unknown"),
            logical_key=f"orphan/{task.id}",
            fingerprint="unknown",
            state=EntryState.COMPLETED,
            task_id=task.id,
            model=task.model or "unknown",
            task_type=task.type or "unknown",
            prompt_sha256="unknown",
            cost=task.cost_amount,
            history=[f"task {task.id} found by recovery in GET /v1/tasks"],
        )
    )


@flow(name="eggapi-recovery", validate_parameters=True)
async def recover_outputs(
    bucket: str | None = None,
    prefix: str | None = None,
    scan_api_pages: int = 5,
    include_unknown: bool = False,
    min_age_seconds: float = 0.0,
    credentials_block: str | None = None,
) -> RecoverySummary:
    """Persist outputs of tasks whose callers gave up; record failures; leave running ones.

    Args:
        bucket, prefix: where outputs go (default ``EGGAPI_S3_BUCKET`` / ``EGGAPI_S3_PREFIX``).
        scan_api_pages: pages of ``GET /v1/tasks`` (100 each, newest first) to search for
            completed tasks no ledger entry persisted; 0 checks the ledger only.
        include_unknown: also persist completed tasks this ledger has never seen, under
            ``{prefix}/unattributed/`` (off by default: they may be another job's).
        min_age_seconds: leave entries younger than this to the runs that own them.
    """
    logger = run_logger()
    store = OutputStore.from_settings(s3_settings(bucket, prefix))
    creds = await load_credentials(credentials_block)
    ledger = default_ledger(beside=store)
    summary = RecoverySummary()
    aside = OutputStore(store.client, store.bucket, f"{store.prefix}/unattributed".lstrip("/"))
    with creds.get_client() as client:
        await in_thread(partial(_attribute_late, ledger, client, min_age_seconds, summary))
        late = set(summary.attributed)
        ids, unattributed = await in_thread(
            partial(_candidates, ledger, client, scan_api_pages, include_unknown, min_age_seconds)
        )
        for task_id in ids:
            target = aside if task_id in unattributed else store
            try:
                done = await in_thread(
                    partial(_recover_one, task_id, client, target, creds, ledger, summary)
                )
                entry = ledger.find_task(task_id) if done is not None and task_id in late else None
                if done is not None and entry is not None:
                    run = f"recovery:{flow_run_id() or 'local'}"
                    if await in_thread(partial(_settle_item, store, entry, *done, run)):
                        summary.items_settled.append(entry.label)
            except Exception as exc:  # one bad item must not stop the sweep
                summary.errors[task_id] = str(describe(exc)["message"])
                logger.warning("Recovery of %s failed: %s", task_id, summary.errors[task_id])
            else:
                if task_id in unattributed and task_id in summary.persisted:
                    summary.unattributed.append(task_id)
    logger.info(
        "Recovery: %d attributed late, %d checked, %d persisted (%s), %d failed, "
        "%d still running, %d error(s)",
        len(summary.attributed),
        summary.checked,
        len(summary.persisted),
        summary.recovered_cost,
        len(summary.failed),
        len(summary.still_running),
        len(summary.errors),
    )
    return summary
