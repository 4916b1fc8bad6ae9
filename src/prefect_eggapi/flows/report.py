"""What a run leaves to look at: the pipeline's gallery and cost table, a batch's problem table.

Built from what the run recorded (manifest records, report rows, item statuses) and published
as Prefect artifacts through :mod:`prefect_eggapi.tasks.artifacts`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal
from functools import partial

from prefect_eggapi.flows.manifests import BrokenLine
from prefect_eggapi.flows.rounds import ItemRecord, PipelineRun
from prefect_eggapi.flows.status import ItemResult
from prefect_eggapi.tasks.artifacts import ReportRow, publish_gallery, publish_report
from prefect_eggapi.tasks.gallery import GalleryCell
from prefect_eggapi.tasks.runtime import in_thread

__all__ = ["publish_cost_table", "publish_pipeline_gallery", "publish_problems"]


def _row_order(row: ReportRow) -> tuple[int, ...]:
    """item-2/round-1 before item-10/round-0: numbers, not text."""
    return tuple(int(n) for n in re.findall(r"\d+", str(row.label))) or (0,)


def publish_cost_table(run: PipelineRun, *, key: str) -> Decimal:
    """The run's cost table (item, round order, a total row); returns the total."""
    return publish_report(
        sorted(run.rows, key=_row_order), key=key, title=f"EggAPI pipeline {run.ctx.run_key}"
    )


def _gallery_cells(run: PipelineRun, records: Sequence[ItemRecord]) -> list[GalleryCell]:
    return [
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
            link=run.ctx.store.presign_get(r.key),
        )
        for r in records
    ]


def publish_pipeline_gallery(
    run: PipelineRun, records: Sequence[ItemRecord], failed: list[str], *, key: str
) -> None:
    """Items × rounds, each edit beside its source, thumbnails embedded (renders for good)."""
    publish_gallery(
        _gallery_cells(run, records),
        key=key,
        title=f"EggAPI pipeline {run.ctx.run_key}",
        rounds=run.params.rounds + 1,
        failed=failed,
    )


async def publish_problems(
    results: list[ItemResult], broken: list[BrokenLine], *, key: str, what: str
) -> None:
    """The table of every line that did not end persisted (failed, skipped, broken)."""
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
