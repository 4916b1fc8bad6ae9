"""What a run leaves in the Prefect UI: events, image and table artifacts, progress.

Events use ``eggapi.task.<id>`` as the resource so automations and deployment triggers can chain
on ``eggapi.task.completed`` for one task or all of them. Everything here is best effort: a failure
to publish telemetry never fails (or re-bills) the work it describes.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any, cast
from uuid import UUID

from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.events import emit_event
from pydantic import BaseModel

from prefect_eggapi.models import Task
from prefect_eggapi.pricing import format_cost

log = logging.getLogger(__name__)

EVENT_PREFIX = "eggapi.task"
# Prefect's artifact helpers return coroutines when they think they run in an async task, even
# from our worker threads; this package always calls them from synchronous code.
_SYNC: dict[str, Any] = {"_sync": True}


def task_resource(task_id: str, **labels: str) -> dict[str, str]:
    resource = {
        "prefect.resource.id": f"{EVENT_PREFIX}.{task_id}",
        "prefect.resource.name": task_id,
    }
    resource.update({f"eggapi.{k}": v for k, v in labels.items() if v})
    return resource


def emit_task_event(kind: str, task_id: str, *, task: Task | None = None, **payload: Any) -> None:
    """``eggapi.task.<kind>`` with the EggAPI task as resource; never raises."""
    labels = {"model": task.model or "", "type": task.type or ""} if task else {}
    body = {k: v for k, v in payload.items() if v is not None}
    if task is not None:
        body.setdefault("status", task.status.value)
        if task.cost is not None:
            body.setdefault("cost", str(task.cost_amount))
        if task.error:
            body.setdefault("error", task.error)
    try:
        emit_event(
            f"{EVENT_PREFIX}.{kind}", resource=task_resource(task_id, **labels), payload=body
        )
    except Exception:  # telemetry must not fail the work
        log.debug("could not emit %s event for %s", kind, task_id, exc_info=True)


def artifact_key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    raw = "-".join(p for p in parts if p)
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", raw.lower())).strip("-")[:120]


def publish_images(urls: Sequence[tuple[str, str]], *, key: str | None = None) -> list[UUID]:
    """One image artifact per ``(url, description)``; presigned or EggAPI URLs."""
    ids = []
    for url, description in urls:
        try:
            ids.append(
                cast(
                    UUID,
                    create_image_artifact(image_url=url, key=key, description=description, **_SYNC),
                )
            )
        except Exception:
            log.debug("could not publish image artifact", exc_info=True)
    return ids


class ReportRow(BaseModel):
    """One generation in the run table."""

    label: str = ""
    prompt: str = ""
    task_id: str | None = None
    status: str = ""
    queue_seconds: float | None = None
    processing_seconds: float | None = None
    polls: int | None = None
    cost: Decimal = Decimal("0")
    stored: str = ""
    error: str = ""


def publish_report(
    rows: Iterable[ReportRow], *, key: str | None = None, title: str = "EggAPI generations"
) -> Decimal:
    """Table artifact of the run plus a markdown total; returns the total cost."""
    rows = list(rows)
    total = sum((r.cost for r in rows), Decimal("0"))
    table = [
        {
            "label": r.label,
            "prompt": r.prompt[:120],
            "task id": r.task_id or "",
            "status": r.status,
            "queue s": "" if r.queue_seconds is None else round(r.queue_seconds, 2),
            "processing s": "" if r.processing_seconds is None else round(r.processing_seconds, 2),
            "polls": "" if r.polls is None else r.polls,
            "cost": format_cost(r.cost),
            "stored": r.stored,
            "error": r.error[:200],
        }
        for r in rows
    ]
    try:
        create_table_artifact(
            table=table, key=key, description=f"{title}: {format_cost(total)}", **_SYNC
        )
        done = sum(r.status == "completed" for r in rows)
        create_markdown_artifact(
            markdown=(
                f"## {title}\n\n{len(rows)} generations, {done} completed, "
                f"total cost **{format_cost(total)}**\n"
            ),
            key=f"{key}-summary" if key else None,
            **_SYNC,
        )
    except Exception:
        log.debug("could not publish report", exc_info=True)
    return total


class Progress:
    """A progress artifact that only talks to the API when the rounded value changes."""

    def __init__(self, description: str, key: str | None = None) -> None:
        self._description = description
        self._last: float | None = None
        self._id: UUID | None = None
        self._updated_at = 0.0
        self.min_interval = 1.0
        try:
            self._id = cast(
                UUID,
                create_progress_artifact(progress=0.0, key=key, description=description, **_SYNC),
            )
            self._last = 0.0
        except Exception:
            log.debug("could not create progress artifact", exc_info=True)

    def update(self, percent: float, description: str | None = None) -> None:
        """At most once a second (always at 100 %): each update is an API call."""
        value = round(max(0.0, min(100.0, percent)), 0)
        if self._id is None or value == self._last:
            return
        now = time.monotonic()
        if value < 100 and now - self._updated_at < self.min_interval:
            return
        self._updated_at = now
        try:
            update_progress_artifact(
                self._id, progress=value, description=description or self._description, **_SYNC
            )
            self._last = value
        except Exception:
            log.debug("could not update progress artifact", exc_info=True)
