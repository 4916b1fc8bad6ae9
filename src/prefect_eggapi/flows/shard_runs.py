"""The shard flow runs of a sharded batch: start them, watch their heartbeats, rescue the dead.

A shard is a line range of the manifest run as a flow run of the shard deployment
(``batch_generate`` with ``lines``). The parent polls the runs; one whose worker is gone (Running
or Pending with no flow-run event for ``stale_after`` seconds) is marked Crashed and, like a
Failed or Crashed one, run again up to ``max_attempts`` times. Runs are idempotent per parent
run, shard and attempt, so a retried parent finds its shard runs again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from uuid import UUID

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.deployments.flow_runs import arun_deployment
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventResourceFilter,
)
from prefect.states import Crashed
from pydantic import BaseModel, Field

from prefect_eggapi.flows.manifests import BatchItem
from prefect_eggapi.flows.params import ShardPlan
from prefect_eggapi.tasks.runtime import flow_run_id, run_logger

__all__ = ["Shard", "ShardAttempt", "ShardReport", "plan_ranges", "run_shards"]


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


class Shard:
    """One line range and the flow run of it the parent is waiting for."""

    def __init__(self, bounds: tuple[int, int | None], items: int) -> None:
        self.bounds = bounds
        self.report = ShardReport(lines=_lines_param(bounds), items=items)
        self.current: str | None = None
        self.finished = False


async def _last_seen(
    client: PrefectClient, run_ids: list[str], since: dt.datetime
) -> dict[str, dt.datetime]:
    """The newest flow-run event (heartbeat or state change) of each run since ``since``.

    One query per 50 runs (the API's page limit), newest event per run (``distinct``). A
    failed query says nothing about liveness: the caller then judges no run this round."""
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


async def run_shards(
    shards: list[Shard], parameters: dict[str, object], plan: ShardPlan, run_key: str
) -> int:
    """Start every shard, wait, rescue; returns how many rescue runs were started."""
    logger = run_logger()
    parent = flow_run_id() or "local"
    rescued = 0

    async def launch(shard: Shard) -> None:
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
