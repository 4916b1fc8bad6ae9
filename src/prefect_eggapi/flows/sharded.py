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

import asyncio
import datetime as dt
import json
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from functools import partial
from typing import Any, Literal
from uuid import UUID

from prefect import flow
from pydantic import BaseModel, Field, StrictInt

from prefect_eggapi.client.errors import InvalidRequestError
from prefect_eggapi.client.pricing import format_cost
from prefect_eggapi.flows.batch import (
    BatchError,
    BatchParams,
    BatchSummary,
    ItemResult,
    _batch_key,
    _status_lines,
    in_range,
    open_manifest,
    publish_problems,
)
from prefect_eggapi.flows.manifests import BatchItem, BrokenLine
from prefect_eggapi.flows.pipeline import FlowParams, _scheduled_slot
from prefect_eggapi.storage import OutputStore, put_if, read_object
from prefect_eggapi.tasks.runtime import flow_run_id, in_thread, run_logger

DEFAULT_SHARD_DEPLOYMENT = "eggapi-batch/batch-shard"
FINAL = ("persisted", "failed", "skipped")


class ShardPlan(FlowParams):
    """How to fan out; validated before any shard run is created."""

    # One read of the shard runs per poll: the API returns at most 200 runs a page.
    shards: int = Field(4, ge=1, le=200, strict=True)
    shard_deployment: str = Field(DEFAULT_SHARD_DEPLOYMENT, min_length=3, pattern=r".+/.+")
    max_attempts: int = Field(3, ge=1, le=20, strict=True, description="Runs per shard at most.")
    # Heartbeats come at most every 30 s: anything shorter than ~40 s would call live runs dead.
    stale_after: float = Field(120.0, ge=40, le=24 * 3600)
    poll_interval: float = Field(2.0, gt=0, le=300)


class ShardAttempt(BaseModel):
    """One flow run of a shard and how it ended (as the parent saw it)."""

    flow_run_id: str
    state: str
    message: str | None = None


class ShardReport(BaseModel):
    """One line range and every flow run it took (the last one decides ``completed``)."""

    lines: str
    items: int
    attempts: list[ShardAttempt] = Field(default_factory=list)
    completed: bool = False


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


def plan_ranges(items: list[BatchItem], shards: int) -> list[tuple[int, int | None]]:
    """Contiguous line ranges covering every line once, about equal in valid items.

    The first starts at line 1 and the last is open-ended, so broken or blank lines anywhere
    fall in exactly one range."""
    lines = sorted(i.line for i in items)
    k = max(1, min(shards, len(lines)))
    starts = [1] + [lines[j * len(lines) // k] for j in range(1, k)]
    return [(starts[j], starts[j + 1] if j + 1 < k else None) for j in range(k)]


def _lines_param(bounds: tuple[int, int | None]) -> str:
    start, stop = bounds
    return f"{start}:{'' if stop is None else stop}"


class _Shard:
    def __init__(self, bounds: tuple[int, int | None], items: int) -> None:
        self.bounds = bounds
        self.report = ShardReport(lines=_lines_param(bounds), items=items)
        self.current: str | None = None
        self.finished = False


def _final_statuses(store: OutputStore, base: str) -> dict[str, ItemResult]:
    """Every item's one final status object under ``{base}/items/`` (persisted wins), read in
    parallel: these, not the shard runs' return values, say what happened to each line."""
    prefix = f"{base}/items/"
    found: dict[str, set[str]] = {}
    pages = store.client.get_paginator("list_objects_v2").paginate(
        Bucket=store.bucket, Prefix=prefix
    )
    for page in pages:
        for obj in page.get("Contents", []):
            name = obj["Key"][len(prefix) :]
            if not name.endswith(".json"):
                continue
            item_id, _, status = name[: -len(".json")].rpartition(".")
            if status in FINAL:
                found.setdefault(item_id, set()).add(status)

    def load(item_id: str, statuses: set[str]) -> ItemResult | None:
        for status in FINAL:  # persisted first: a failure never stands beside it
            if status in statuses:
                got = read_object(store.client, store.bucket, f"{prefix}{item_id}.{status}.json")
                if got is not None:
                    return ItemResult.model_validate_json(got[0])
        return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        loaded = list(pool.map(lambda kv: load(*kv), found.items()))
    return {r.id: r for r in loaded if r is not None and r.id is not None}


def _merge(
    store: OutputStore,
    base: str,
    items: list[BatchItem],
    broken: list[BrokenLine],
    shards: list[_Shard],
) -> list[ItemResult]:
    """Write ``status.jsonl`` for the whole manifest from the status objects; return the rows.

    Conditional on the status file read first (If-Match), as the unsharded run does: when
    another run of the batch wrote it meanwhile, read everything again."""
    key = f"{base}/status.jsonl"
    while True:
        current = read_object(store.client, store.bucket, key)
        final = _final_statuses(store, base)
        results = []
        for item in items:
            result = final.get(item.id)
            if result is not None:
                result = result.model_copy(update={"line": item.line})  # as this manifest says
            else:
                shard = next(s for s in shards if in_range(item.line, s.bounds))
                last = shard.report.attempts[-1] if shard.report.attempts else None
                how = f"{last.state}" if last else "never started"
                result = ItemResult(
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
            results.append(result)
        body = _status_lines(results, broken)
        if put_if(
            store.client,
            store.bucket,
            key,
            body,
            current[1] if current else None,
            content_type="application/x-ndjson",
        ):
            return results


async def _last_seen(client: Any, run_ids: list[str], since: dt.datetime) -> dict[str, dt.datetime]:
    """The newest flow-run event (heartbeat or state change) of each run since ``since``.

    One query per 50 runs (the API's page limit), newest event per run (``distinct``). A
    failed query says nothing about liveness: the caller then judges no run this round."""
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventResourceFilter,
    )

    seen: dict[str, dt.datetime] = {}
    for at in range(0, len(run_ids), 50):
        chunk = run_ids[at : at + 50]
        page = await client.read_events(
            filter=EventFilter(
                occurred=EventOccurredFilter(since=since, until=_now()),
                event=EventNameFilter(prefix=["prefect.flow-run."]),
                resource=EventResourceFilter(
                    id=[f"prefect.flow-run.{r}" for r in chunk], distinct=True
                ),
            ),
            limit=50,
        )
        for event in page.events:
            run_id = event.resource.id.removeprefix("prefect.flow-run.")
            if run_id not in seen or event.occurred > seen[run_id]:
                seen[run_id] = event.occurred
    return seen


async def _run_shards(
    shards: list[_Shard], parameters: dict[str, Any], plan: ShardPlan, run_key: str
) -> int:
    """Start every shard, wait, rescue; returns how many rescue runs were started."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments.flow_runs import arun_deployment
    from prefect.states import Crashed

    logger = run_logger()
    parent = flow_run_id() or "local"
    rescued = 0

    async def launch(shard: _Shard) -> None:
        attempt = len(shard.report.attempts)
        # Idempotent per parent run, shard and attempt: a retried parent finds its shard runs
        # again instead of starting new ones.
        run = await arun_deployment(
            name=plan.shard_deployment,
            parameters={**parameters, "lines": shard.report.lines},
            timeout=0,
            idempotency_key=f"{parent}:{run_key}:{shard.report.lines}:{attempt}",
            tags=["eggapi", "eggapi-shard", f"eggapi-batch:{run_key}"],
            flow_run_name=f"{run_key[:60]}-lines-{shard.report.lines.replace(':', '-')}"
            + (f"-attempt-{attempt + 1}" if attempt else ""),
        )
        shard.current = str(run.id)
        logger.info(
            "Shard lines %s: flow run %s (run %d of at most %d)",
            shard.report.lines,
            run.id,
            attempt + 1,
            plan.max_attempts,
        )

    for shard in shards:
        await launch(shard)
    async with get_client() as client:
        while active := [s for s in shards if not s.finished]:
            ids = [s.current for s in active if s.current]
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(i) for i in ids])),
                limit=len(ids),
            )
            by_id = {str(r.id): r for r in runs}
            live = [
                i
                for i, r in by_id.items()
                if r.state and r.state.type.value in ("RUNNING", "PENDING")
            ]
            window = dt.timedelta(seconds=2 * plan.stale_after)
            try:
                seen: dict[str, dt.datetime] | None = await _last_seen(
                    client, live, _now() - window
                )
            except Exception as exc:  # no evidence either way: judge nobody dead this round
                logger.warning("Could not read the shard runs' heartbeats: %s", exc)
                seen = None
            for shard in active:
                assert shard.current is not None
                run = by_id.get(shard.current)
                if run is None or run.state is None:
                    continue
                kind, state = run.state.type.value, run.state
                message: str | None = state.message
                if kind in ("RUNNING", "PENDING"):
                    if seen is None:
                        continue
                    last = max(filter(None, [state.timestamp, seen.get(shard.current)]))
                    silent = (_now() - last).total_seconds()
                    if silent <= plan.stale_after:
                        continue
                    message = (
                        f"no heartbeat for {silent:.0f} s (stale_after={plan.stale_after:.0f} s): "
                        "its worker is gone; marked Crashed by the sharded batch parent"
                    )
                    await client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                    kind = "CRASHED"
                elif kind not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    continue  # Scheduled, Late, Paused, Cancelling: not ours to judge
                shard.report.attempts.append(
                    ShardAttempt(flow_run_id=shard.current, state=kind, message=message)
                )
                if kind == "COMPLETED":
                    shard.report.completed = shard.finished = True
                elif (
                    kind in ("FAILED", "CRASHED") and len(shard.report.attempts) < plan.max_attempts
                ):
                    logger.warning(
                        "Shard lines %s: flow run %s ended %s (%s); running it again",
                        shard.report.lines,
                        shard.current,
                        kind,
                        (message or "")[:300],
                    )
                    rescued += 1
                    await launch(shard)
                else:  # cancelled by someone, or out of attempts: its lines say so
                    logger.error(
                        "Shard lines %s: flow run %s ended %s after %d run(s); not retried",
                        shard.report.lines,
                        shard.current,
                        kind,
                        len(shard.report.attempts),
                    )
                    shard.finished = True
            if any(not s.finished for s in shards):
                await asyncio.sleep(plan.poll_interval)
    return rescued


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def run_sharded(
    params: BatchParams, plan: ShardPlan, *, credentials_block: str | None = None
) -> ShardedSummary:
    """The parent's body (call it inside a flow run; :func:`sharded_batch_generate` does)."""
    from prefect_eggapi.tasks.artifacts import artifact_key

    logger = run_logger()
    if params.lines is not None:
        raise InvalidRequestError([("lines", "shards choose their own line ranges")])
    store, items, broken = await open_manifest(params)
    run_key = params.run_key or await _scheduled_slot() or _batch_key(params, items)
    base = "/".join(p for p in (store.prefix, "batches", run_key) if p)
    shards = [
        _Shard(b, sum(in_range(i.line, b) for i in items)) for b in plan_ranges(items, plan.shards)
    ]
    # What every shard run gets: the whole batch's parameters, its key, and the place the
    # parent reads from (a worker with another default bucket must not write elsewhere).
    parameters: dict[str, Any] = {
        "manifest": params.manifest,
        "manifest_format": params.manifest_format,
        "model": params.model,
        "aspect_ratio": params.aspect_ratio,
        "resolution": params.resolution,
        "num_outputs": params.num_outputs,
        "concurrency": params.concurrency,
        "budget": None if params.budget is None else float(params.budget),
        "wait_timeout": params.wait_timeout,
        "bucket": store.bucket,
        "prefix": store.prefix,
        "run_key": run_key,
        "global_rate_limit": params.global_rate_limit,
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
    rescued = await _run_shards(shards, parameters, plan, run_key)

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
    await in_thread(
        partial(
            store.client.put_object,
            Bucket=store.bucket,
            Key=f"{base}/sharded-summary.json",
            Body=json.dumps(json.loads(summary.model_dump_json()), indent=1).encode(),
            ContentType="application/json",
        )
    )
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
    if params.fail_on_item_error and (summary.failed or summary.skipped or summary.broken_lines):
        raise BatchError(
            f"sharded batch {run_key}: {summary.failed} failed, {summary.skipped} skipped, "
            f"{summary.broken_lines} broken line(s) of {len(items) + len(broken)}; "
            f"every line is accounted for in {summary.status_uri}"
        )
    return summary


@flow(name="eggapi-sharded-batch", validate_parameters=True)
async def sharded_batch_generate(
    manifest: str,
    shards: StrictInt = 4,
    shard_deployment: str = DEFAULT_SHARD_DEPLOYMENT,
    max_attempts: StrictInt = 3,
    stale_after: float = 120.0,
    poll_interval: float = 2.0,
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
        budget: USD cap for the whole batch, shared by every shard.
        Other parameters: as for ``batch_generate``; ``fail_on_item_error`` applies to the
            whole manifest (shards never fail on item errors).
    """
    plan = ShardPlan.parse(
        {
            "shards": shards,
            "shard_deployment": shard_deployment,
            "max_attempts": max_attempts,
            "stale_after": stale_after,
            "poll_interval": poll_interval,
        }
    )
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
    return await run_sharded(params, plan, credentials_block=credentials_block)
