"""What a run leaves in the Prefect UI: events, image and table artifacts, progress.

Events use ``eggapi.task.<id>`` as the resource so automations and deployment triggers can chain
on ``eggapi.task.completed`` for one task or all of them. Everything here is best effort: a failure
to publish telemetry never fails (or re-bills) the work it describes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any, cast
from uuid import UUID

from prefect.artifacts import (
    aupdate_progress_artifact,
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import PrefectClient
from prefect.context import FlowRunContext
from prefect.events import emit_event
from pydantic import BaseModel

from prefect_eggapi.client.pricing import format_cost
from prefect_eggapi.client.types import EggAPITask, JSONValue
from prefect_eggapi.tasks.gallery import GalleryCell, render_pages

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


def emit_task_event(
    kind: str, task_id: str, *, task: EggAPITask | None = None, **payload: JSONValue
) -> None:
    """``eggapi.task.<kind>`` with the EggAPI task as resource; never raises."""
    labels = {"model": task.model or "", "type": task.type or ""} if task else {}
    body: dict[str, JSONValue] = {k: v for k, v in payload.items() if v is not None}
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


_MAX_KEY = 120


def artifact_key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    raw = "-".join(p for p in parts if p)
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", raw.lower())).strip("-")[:_MAX_KEY]


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
    #: What the task cost (whoever paid for it).
    cost: Decimal = Decimal("0")
    #: What *this run* paid for it; None means ``cost`` (a reconnected task paid $0 now).
    paid: Decimal | None = None
    stored: str = ""
    error: str = ""

    @property
    def paid_now(self) -> Decimal:
        return self.cost if self.paid is None else self.paid


_TABLE_PROMPT_CHARS = 18
_TABLE_ERROR_CHARS = 80


def _seconds(row: ReportRow) -> str:
    """Queue + processing seconds in one column: the table must fit a laptop screen."""
    if row.queue_seconds is None and row.processing_seconds is None:
        return ""
    q = "?" if row.queue_seconds is None else f"{row.queue_seconds:.1f}"
    p = "?" if row.processing_seconds is None else f"{row.processing_seconds:.1f}"
    return f"{q}+{p}"


def _object_tail(row: ReportRow) -> str:
    """``gen_abc/0.png`` of ``s3://bucket/prefix/gen_abc/0.png``: task id and object in one
    narrow column (the full URI is in the gallery and the manifest); the task id alone when
    nothing was stored."""
    tails = ["/".join(uri.rstrip("/").split("/")[-2:]) for uri in row.stored.split(", ") if uri]
    return ", ".join(tails) or (row.task_id or "")


def _short(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def _reused(rows: Sequence[ReportRow]) -> int:
    """Rows this run did not pay (in full) for: reconnected to a task an earlier run paid."""
    return sum(r.paid is not None and r.paid < r.cost for r in rows)


def report_table(rows: Sequence[ReportRow]) -> list[dict[str, JSONValue]]:
    """The run table: 7 narrow columns (an error column only when a row has one) and a total
    row, so it fits a 1366 px screen without scrolling; ``paid`` is what this run paid."""
    with_errors = any(r.error for r in rows)
    table: list[dict[str, JSONValue]] = []
    for r in rows:
        line: dict[str, JSONValue] = {
            "item": r.label,
            "prompt": _short(r.prompt, _TABLE_PROMPT_CHARS),
            "status": r.status,
            "secs": _seconds(r),
            "polls": "" if r.polls is None else r.polls,
            "paid": format_cost(r.paid_now),
            "task / object": _object_tail(r),
        }
        if with_errors:
            line["error"] = _short(r.error, _TABLE_ERROR_CHARS)
        table.append(line)
    total: dict[str, JSONValue] = dict.fromkeys(table[0] if table else (), "")
    total.update(
        item="total",
        prompt=f"{len(rows)} tasks, {_reused(rows)} reused",
        polls=sum(r.polls or 0 for r in rows),
        paid=format_cost(sum((r.paid_now for r in rows), Decimal("0"))),
    )
    table.append(total)
    return table


def publish_report(
    rows: Iterable[ReportRow], *, key: str | None = None, title: str = "EggAPI generations"
) -> Decimal:
    """Table artifact of the run plus a markdown total; returns the total cost of the tasks.

    The artifacts show what this run paid (a rerun that reconnected shows $0.0000) beside what
    the tasks cost when they were made.
    """
    rows = list(rows)
    total = sum((r.cost for r in rows), Decimal("0"))
    paid = sum((r.paid_now for r in rows), Decimal("0"))
    worth = "" if paid == total else f" (the tasks cost {format_cost(total)} when made)"
    try:
        create_table_artifact(
            table=report_table(rows),
            key=key,
            description=f"{title}: paid {format_cost(paid)} this run{worth}",
            **_SYNC,
        )
        done = sum(r.status == "completed" for r in rows)
        reused = _reused(rows)
        create_markdown_artifact(
            markdown=(
                f"## {title}\n\n{len(rows)} generations, {done} completed, {reused} reused from "
                f"earlier runs: this run paid **{format_cost(paid)}**{worth}\n"
            ),
            key=f"{key}-summary" if key else None,
            **_SYNC,
        )
    except Exception:
        log.debug("could not publish report", exc_info=True)
    return total


def run_artifact_key(scope: str, run_key: str, kind: str) -> str:
    """``{scope}-{run_key}-{kind}`` as a valid artifact key that keeps ``kind`` whole.

    ``scope`` says which flow or deployment wrote it, so ad-hoc runs (the demo) and deployment
    runs with the same parameters keep separate histories; a key too long for the cap is
    shortened with a hash of the whole, never by cutting off the kind (pages must not collide).
    """
    head = artifact_key(scope, run_key)
    tail = artifact_key(kind)
    room = _MAX_KEY - len(tail) - 1
    if len(head) > room:
        digest = hashlib.sha256(f"{scope}/{run_key}".encode()).hexdigest()[:10]
        head = head[: room - len(digest) - 1].rstrip("-") + "-" + digest
    return f"{head}-{tail}"


def publish_gallery(
    cells: Sequence[GalleryCell],
    *,
    key: str,
    title: str,
    rounds: int,
    failed: Sequence[str] = (),
) -> list[UUID]:
    """The run's gallery as markdown artifacts: ``key`` for page 1, ``key-p2``... for the rest.

    Thumbnails are embedded (``data:`` URIs), so the pages render with the S3 server stopped and
    after presigned links expire. Best effort, like all telemetry here.
    """
    probe = render_pages(cells, title=title, rounds=rounds, failed=failed)
    keys = [key] + [f"{key}-p{n}" for n in range(2, len(probe) + 1)]
    pages = render_pages(cells, title=title, rounds=rounds, failed=failed, page_keys=keys)
    ids: list[UUID] = []
    # The last pages first: page 1, the one to open, is the newest card of the run.
    for page_key, markdown in reversed(list(zip(keys, pages, strict=True))):
        try:
            ids.append(
                cast(
                    UUID,
                    create_markdown_artifact(
                        markdown=markdown,
                        key=page_key,
                        description=f"{title} (gallery {page_key.rsplit('-', 1)[-1]})"
                        if page_key != key
                        else f"{title} (gallery)",
                        **_SYNC,
                    ),
                )
            )
        except Exception:
            log.debug("could not publish gallery page %s", page_key, exc_info=True)
    ids.reverse()
    return ids


def _run_client() -> PrefectClient | None:
    """The async client of the flow run this coroutine runs in, or None (then Prefect's
    ``get_client()`` decides): one connection per run instead of one client per update."""
    ctx = FlowRunContext.get()
    client = ctx.client if ctx is not None else None
    if not isinstance(client, PrefectClient):
        return None
    # An async client is bound to the loop it was opened on (as prefect's get_client checks).
    return client if getattr(client, "_loop", None) in (asyncio.get_running_loop(), None) else None


class Progress:
    """A progress artifact that only talks to the API when the rounded value changes, at most
    once a second (always at 100 %)."""

    def __init__(self, description: str, key: str | None = None) -> None:
        self._description = description
        self._last: float | None = None
        self._id: UUID | None = None
        self._updated_at = 0.0
        self.min_interval = 1.0
        # Serializes async updates so a late 99 % can never land after the 100 %.
        self._sending = asyncio.Lock()
        try:
            self._id = cast(
                UUID,
                create_progress_artifact(progress=0.0, key=key, description=description, **_SYNC),
            )
            self._last = 0.0
        except Exception:
            log.debug("could not create progress artifact", exc_info=True)

    def _due(self, percent: float) -> float | None:
        """The rounded value to send now, or None (unchanged, or too soon after the last)."""
        value = round(max(0.0, min(100.0, percent)), 0)
        if self._id is None or value == self._last:
            return None
        now = time.monotonic()
        if value < 100 and now - self._updated_at < self.min_interval:
            return None
        self._updated_at = now
        return value

    def update(self, percent: float, description: str | None = None) -> None:
        """From synchronous code: each update that is due is an API call of its own."""
        value = self._due(percent)
        if value is None or self._id is None:
            return
        try:
            update_progress_artifact(
                self._id, progress=value, description=description or self._description, **_SYNC
            )
            self._last = value
        except Exception:
            log.debug("could not update progress artifact", exc_info=True)

    async def aupdate(self, percent: float, description: str | None = None) -> None:
        """From the flow's event loop: the throttle is decided in the loop (no thread hop per
        item) and a due update goes through the flow run's own client (issue 16: a new
        ``SyncPrefectClient``, TLS context and connection per update cost ~4 ms an item)."""
        value = self._due(percent)
        if value is None or self._id is None:
            return
        async with self._sending:
            if self._last is not None and value <= self._last:
                return  # a later value was sent while this one waited
            try:
                await aupdate_progress_artifact(
                    self._id,
                    progress=value,
                    description=description or self._description,
                    client=_run_client(),
                )
                self._last = value
            except Exception:
                log.debug("could not update progress artifact", exc_info=True)
