"""Sharded batch: one manifest fanned out over a work pool, crashed shards rerun, one status.

::

    sharded_batch_generate (the parent flow run)
      ├─ reads and validates the WHOLE manifest; the run key is the unsharded batch's
      ├─ K line ranges, about equal in items ──► run_deployment(shard_deployment,
      │        lines="a:b", run_key=…)           any worker of the pool takes any shard
      ├─ waits: COMPLETED is done; CRASHED or FAILED, or Running/Pending with no flow-run
      │        heartbeat for ``stale_after`` seconds (its worker was killed) → run it again,
      │        at most ``max_attempts`` runs per shard
      └─ merges the per-item status objects in S3 (the ground truth, whoever wrote them)
           → batches/{run_key}/status.jsonl (every line exactly once) + sharded-summary.json

**Why it is safe to run a shard again.** A shard is ``batch_generate`` with ``lines="a:b"``: it
uses the whole manifest's run key and item keys, so a second run of a shard (after a crash, or
beside a zombie that is still alive) reconnects to what the first paid for through the shared
ledger and never pays twice; an unsharded rerun of the manifest finds the same status objects.

**Why heartbeats.** A worker killed with its flow runs leaves them Running on the server:
nothing else marks them. Prefect's flow runs emit ``prefect.flow-run.heartbeat`` events
(``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, at least 30 s; the shard deployment sets 30), so a run
whose newest event is older than ``stale_after`` is marked Crashed by the parent and run again.
A Pending run (infrastructure starting, no engine yet) is timed from its state's timestamp:
give slow infrastructure (image pulls) a ``stale_after`` longer than its start-up. Calling a
live run dead costs time, never money: the two runs of the shard share its items' keys.

**Cost.** ``total_cost`` is what this parent's shard runs paid, read from the status objects
(each names the flow run that paid for it), crashed attempts included; ``killed_runs_cost`` is
the part written by attempts that did not complete (they report nothing themselves).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from functools import partial

from prefect import flow
from pydantic import Field, StrictInt

from prefect_eggapi.client.errors import InvalidRequestError
from prefect_eggapi.client.pricing import format_cost
from prefect_eggapi.client.types import AspectRatio, Model, Resolution
from prefect_eggapi.flows.batch import BatchSummary, batch_key, open_manifest
from prefect_eggapi.flows.context import scheduled_slot
from prefect_eggapi.flows.manifests import BatchItem, BrokenLine
from prefect_eggapi.flows.params import (
    DEFAULT_SHARD_DEPLOYMENT,
    BatchParams,
    ManifestFormat,
    ShardPlan,
    in_range,
)
from prefect_eggapi.flows.report import publish_problems
from prefect_eggapi.flows.shard_runs import (
    Shard,
    ShardAttempt,
    ShardReport,
    plan_ranges,
    run_shards,
)
from prefect_eggapi.flows.status import (
    FINAL,
    ItemResult,
    batch_base,
    list_item_statuses,
    load_item_status,
    write_status_file,
)
from prefect_eggapi.storage import OutputStore, put
from prefect_eggapi.tasks.artifacts import artifact_key
from prefect_eggapi.tasks.runtime import flow_run_id, in_thread, run_logger

__all__ = [
    "DEFAULT_SHARD_DEPLOYMENT",
    "ShardAttempt",
    "ShardPlan",
    "ShardReport",
    "ShardedSummary",
    "plan_ranges",
    "run_sharded",
    "sharded_batch_generate",
]


class ShardedSummary(BatchSummary):
    """The whole manifest's outcome, from the status objects in S3.

    ``total_cost`` is what this parent's shard runs (every attempt) paid; ``batch_cost`` what
    all persisted items cost, runs before this one included (their items count as ``resumed``).
    """

    shards: list[ShardReport] = Field(default_factory=list)
    rescued: int = Field(0, description="Shard runs started again after a crash or failure.")
    incomplete_shards: int = 0
    killed_runs_cost: Decimal = Field(
        Decimal(0), description="Paid by shard runs that did not complete (in total_cost)."
    )
    missing: int = Field(0, description="Lines without any status object (ShardIncomplete).")
    parent_run_id: str | None = None


def _final_statuses(store: OutputStore, base: str) -> dict[str, ItemResult]:
    """Every item's one final status object under ``{base}/items/`` (persisted wins), read in
    parallel: these, not the shard runs' return values, say what happened to each line."""

    def load(item_id: str, statuses: set[str]) -> ItemResult | None:
        for status in FINAL:  # persisted first: a failure never stands beside it
            if status in statuses:
                got = load_item_status(store, base, item_id, status)
                if got is not None:
                    return got
        return None

    found = list_item_statuses(store, base)
    with ThreadPoolExecutor(max_workers=16) as pool:
        loaded = list(pool.map(lambda kv: load(*kv), found.items()))
    return {r.id: r for r in loaded if r is not None and r.id is not None}


def _merge(
    store: OutputStore,
    base: str,
    items: list[BatchItem],
    broken: list[BrokenLine],
    shards: list[Shard],
) -> list[ItemResult]:
    """Write ``status.jsonl`` for the whole manifest from the status objects; return the rows.

    Conditional on the status file read first (If-Match), as the unsharded run does: when
    another run of the batch wrote it meanwhile, read everything again."""

    def results() -> list[ItemResult]:
        final = _final_statuses(store, base)
        return [
            final[i.id].model_copy(update={"line": i.line})  # the line as this manifest says
            if i.id in final
            else _incomplete(i, shards)
            for i in items
        ]

    return write_status_file(store, f"{base}/status.jsonl", results, broken)


def _incomplete(item: BatchItem, shards: list[Shard]) -> ItemResult:
    """An item no run left a status for: failed, naming how its shard ended."""
    shard = next(s for s in shards if in_range(item.line, s.bounds))
    last = shard.report.attempts[-1] if shard.report.attempts else None
    how = f"{last.state}" if last else "never started"
    return ItemResult(
        id=item.id,
        line=item.line,
        status="failed",
        error={
            "type": "ShardIncomplete",
            "message": f"no status object: shard lines {shard.report.lines} ended "
            f"{how} after {len(shard.report.attempts)} run(s)",
            "classification": "retryable",
        },
    )


async def run_sharded(
    params: BatchParams, plan: ShardPlan, *, credentials_block: str | None = None
) -> ShardedSummary:
    """The parent's body (call it inside a flow run; :func:`sharded_batch_generate` does)."""
    logger = run_logger()
    if params.lines is not None:
        raise InvalidRequestError([("lines", "shards choose their own line ranges")])
    store, items, broken = await open_manifest(params)
    run_key = params.run_key or await scheduled_slot() or batch_key(items)
    base = batch_base(store, run_key)
    shards = [
        Shard(b, sum(in_range(i.line, b) for i in items)) for b in plan_ranges(items, plan.shards)
    ]
    # What every shard run gets: the whole batch's parameters, its key, and the place the
    # parent reads from (a worker with another default bucket must not write elsewhere).
    parameters: dict[str, object] = {
        **params.model_dump(exclude={"lines"}),
        "budget": None if params.budget is None else float(params.budget),
        "bucket": store.bucket,
        "prefix": store.prefix,
        "run_key": run_key,
        "fail_on_item_error": False,  # item failures are the parent's to report
        "credentials_block": credentials_block,
    }
    logger.info(
        "Sharded batch %s: %d item(s), %d broken line(s), %d shard(s) %s on %s",
        run_key,
        len(items),
        len(broken),
        len(shards),
        [s.report.lines for s in shards],
        plan.shard_deployment,
    )
    rescued = await run_shards(shards, parameters, plan, run_key)

    results = await in_thread(partial(_merge, store, base, items, broken, shards))
    attempts = {a.flow_run_id: a for s in shards for a in s.report.attempts}
    ours = [r for r in results if r.run_id in attempts]
    total = sum((r.cost for r in ours), Decimal(0))
    killed = sum((r.cost for r in ours if attempts[str(r.run_id)].state != "COMPLETED"), Decimal(0))
    by_status = {s: [r for r in results if r.status == s] for s in FINAL}
    missing = sum(1 for r in results if (r.error or {}).get("type") == "ShardIncomplete")
    summary = ShardedSummary(
        run_key=run_key,
        status_uri=store.uri(f"{base}/status.jsonl"),
        items=len(items),
        persisted=len(by_status["persisted"]),
        resumed=sum(1 for r in by_status["persisted"] if r.run_id not in attempts),
        failed=len(by_status["failed"]),
        skipped=len(by_status["skipped"]),
        broken_lines=len(broken),
        total_cost=total,
        batch_cost=sum((r.cost for r in by_status["persisted"]), Decimal(0)),
        shards=[s.report for s in shards],
        rescued=rescued,
        incomplete_shards=sum(not s.report.completed for s in shards),
        killed_runs_cost=killed,
        missing=missing,
        parent_run_id=flow_run_id(),
    )
    body = json.dumps(json.loads(summary.model_dump_json()), indent=1).encode()
    await in_thread(partial(put, store, f"{base}/sharded-summary.json", body))
    await publish_problems(
        results,
        broken,
        key=artifact_key("eggapi-sharded-problems", run_key),
        what=f"sharded batch {run_key}",
    )
    logger.info(
        "Sharded batch %s: %d persisted (%d by earlier runs), %d failed (%d with no status), "
        "%d skipped, %d broken; %d shard run(s) rescued; paid %s (%s by runs that did not "
        "complete) of %s; status %s",
        run_key,
        summary.persisted,
        summary.resumed,
        summary.failed,
        missing,
        summary.skipped,
        summary.broken_lines,
        rescued,
        format_cost(total),
        format_cost(killed),
        format_cost(summary.batch_cost),
        summary.status_uri,
    )
    if params.fail_on_item_error:
        summary.raise_unless_complete(f"sharded batch {run_key}", len(items) + len(broken))
    return summary


@flow(name="eggapi-sharded-batch", validate_parameters=True)
async def sharded_batch_generate(
    manifest: str,
    shards: StrictInt = 4,
    shard_deployment: str = DEFAULT_SHARD_DEPLOYMENT,
    max_attempts: StrictInt = 3,
    stale_after: float = 120.0,
    poll_interval: float = 2.0,
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
) -> ShardedSummary:
    """One manifest as ``shards`` flow runs of ``shard_deployment`` (``batch_generate`` with a
    line range) on any worker of its pool; crashed shards run again; one status.jsonl.

    Args:
        manifest: as for ``batch_generate``; read by the parent and by every shard.
        shards: how many line ranges (about equal in valid items).
        shard_deployment: ``flow/deployment`` of ``batch_generate`` the shards run as.
        max_attempts: runs per shard at most (the first included).
        stale_after: seconds without a flow-run event (heartbeats come every
            ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` >= 30 s) after which a Running shard is
            declared dead, marked Crashed and run again.
        poll_interval: seconds between looks at the shard runs.
        concurrency: items in flight per shard run.
        items_per_task: items per task run in each shard (see ``batch_generate``).
        budget: USD cap for the whole batch, shared by every shard.
        Other parameters: as for ``batch_generate``; ``fail_on_item_error`` applies to the
            whole manifest (shards never fail on item errors).
    """
    arguments = locals()
    plan, params = ShardPlan.from_flow(arguments), BatchParams.from_flow(arguments)
    return await run_sharded(params, plan, credentials_block=credentials_block)
