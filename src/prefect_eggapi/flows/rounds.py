"""One pipeline item: a generation and its edit rounds, each submitted, awaited and stored.

Round r edits round r-1's image (its EggAPI output URL, or a presigned URL of the stored object
with ``use_presigned_inputs``). Every paid step has the logical key
``{run_key}/item-{i}/round-{r}`` in the ledger, so a rerun reconnects instead of paying again;
at most ``concurrency`` steps are in flight across the run's items.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from functools import partial

from pydantic import BaseModel, Field

from prefect_eggapi.client.types import EggAPITask, GenerateRequest
from prefect_eggapi.flows.context import RunContext
from prefect_eggapi.flows.params import PipelineParams
from prefect_eggapi.safety.ledger import LIVE_STATES, EntryState, ledger_key
from prefect_eggapi.storage import StoredImage
from prefect_eggapi.tasks import (
    adownload_outputs,
    amaterialize_images,
    asubmit_edit,
    asubmit_generation,
    await_for_task,
    result_of,
)
from prefect_eggapi.tasks.artifacts import Progress, ReportRow
from prefect_eggapi.tasks.gallery import MAX_CELLS, thumbnail_of
from prefect_eggapi.tasks.runtime import in_thread

__all__ = ["ItemRecord", "PipelineRun"]

_PROMPT_META_CHARS = 300


class ItemRecord(BaseModel):
    """One image of the run, as written to the manifest."""

    item: int
    round: int
    prompt: str
    base_prompt: str
    task_id: str
    s3_uri: str
    key: str
    sha256: str
    size: int
    width: int | None = None
    height: int | None = None
    content_type: str = ""
    cost: Decimal
    reused: bool = Field(False, exclude=True)  # reconnected to a task paid in an earlier run
    created: bool = Field(False, exclude=True)  # a new S3 object was written in this run


class PipelineRun:
    """State shared by the items of one run: the report rows, thumbnails and progress."""

    def __init__(
        self, params: PipelineParams, prompts: list[str], ctx: RunContext, progress: Progress
    ) -> None:
        self.params = params
        self.prompts = prompts
        self.ctx = ctx
        self.progress = progress
        self.semaphore = asyncio.Semaphore(params.concurrency)
        self.rows: list[ReportRow] = []
        self.thumbnails: dict[str, str] = {}  # S3 key -> data: URI
        self.steps_total = len(prompts) * (params.rounds + 1)
        self.steps_done = 0

    def request(self, prompt: str, image_url: str | None) -> GenerateRequest:
        p = self.params
        return GenerateRequest(
            model=p.model,
            prompt=prompt,
            negative_prompt=p.negative_prompt,
            aspect_ratio=p.aspect_ratio,
            resolution=p.resolution,
            image_urls=(image_url,) if image_url else (),
        )

    def _known_task(self, logical_key: str, request: GenerateRequest) -> str | None:
        """The task id already recorded for this work (so the submit will not pay), or None."""
        ledger = self.ctx.ledger
        entry = ledger.get(ledger_key(logical_key, request.fingerprint()))
        if entry is not None and entry.state in LIVE_STATES and entry.task_id:
            return entry.task_id
        if request.is_edit and self.params.use_presigned_inputs:
            # Presigned inputs change at every signing: match on the logical key alone.
            live = [
                e
                for e in ledger.entries(set(LIVE_STATES))
                if e.logical_key == logical_key and e.task_id
            ]
            if live:
                return max(live, key=lambda e: e.updated_at).task_id
        return None

    def _persisted_before(self, task_id: str) -> bool:
        """The ledger already had this task's outputs stored (a rerun): not a materialization."""
        entry = self.ctx.ledger.find_task(task_id)
        return (
            entry is not None and entry.task_id == task_id and entry.state is EntryState.PERSISTED
        )

    async def _step(
        self, request: GenerateRequest, logical_key: str, label: str, metadata: dict[str, str]
    ) -> tuple[EggAPITask, list[StoredImage], bool, bool]:
        """Submit (or reconnect), wait, store: (task, stored, reused, persisted before)."""
        p, ctx = self.params, self.ctx
        known = await in_thread(partial(self._known_task, logical_key, request))
        task: EggAPITask | str
        if known is not None and request.is_edit and p.use_presigned_inputs:
            task = known  # reconnect by logical key: the presigned URL is new
        else:
            submit = asubmit_edit if request.is_edit else asubmit_generation
            task = await submit(
                request,
                credentials=ctx.credentials,
                key=logical_key,
                label=label,
                budget=p.budget,
                ledger=ctx.ledger,
            )
        done = await await_for_task(
            task,
            credentials=ctx.credentials,
            timeout=p.wait_timeout,
            label=label,
            progress=False,  # one progress bar for the run, not one per task
            ledger=ctx.ledger,
        )
        was_persisted = await in_thread(partial(self._persisted_before, done.id))
        stored: list[StoredImage] = await adownload_outputs(
            done,
            ctx.store,
            credentials=ctx.credentials,
            label=label,
            image_artifacts=False,  # the run's gallery shows them, for good
            ledger=ctx.ledger,
            metadata=metadata,
        )
        return done, stored, known is not None, was_persisted

    async def item(self, index: int, base_prompt: str) -> list[ItemRecord]:
        """Every round of item ``index``; the records of the images it stored."""
        p, run_key = self.params, self.ctx.run_key
        records: list[ItemRecord] = []
        source_url: str | None = None
        source_uri_s3: str | None = None
        for rnd in range(p.rounds + 1):
            prompt = base_prompt if rnd == 0 else p.edit_instructions[rnd - 1]
            label = f"item-{index}/round-{rnd}"
            request = self.request(prompt, source_url)
            metadata = {
                "prompt": prompt[:_PROMPT_META_CHARS],
                "pipeline-item": str(index),
                "pipeline-round": str(rnd),
                "pipeline-run-key": run_key,
            }
            async with self.semaphore:
                done, stored, reused, was_persisted = await self._step(
                    request, f"{run_key}/{label}", label, metadata
                )
            row = result_of(request, done, stored, label=label, ledger=self.ctx.ledger)
            report_row = row.report_row()
            report_row.paid = Decimal("0") if reused else report_row.cost
            self.rows.append(report_row)
            first = stored[0]
            if not was_persisted or any(s.created for s in stored):
                # Each stored image becomes an asset; an edit's upstream is the image it edited.
                await amaterialize_images(
                    stored,
                    done,
                    sources=[source_uri_s3] if source_uri_s3 else [],
                    prompt=prompt,
                    label=label,
                    metadata={"item": str(index), "round": str(rnd), "run_key": run_key},
                )
            await self._step_done(stored, index * (p.rounds + 1) + rnd)
            records += [
                ItemRecord(
                    item=index,
                    round=rnd,
                    prompt=prompt,
                    base_prompt=base_prompt,
                    task_id=done.id,
                    s3_uri=s.uri,
                    key=s.key,
                    sha256=s.sha256,
                    size=s.size,
                    width=s.width,
                    height=s.height,
                    content_type=s.content_type,
                    cost=done.cost_amount if s is first else Decimal("0"),
                    reused=reused,
                    created=s.created,
                )
                for s in stored
            ]
            if p.use_presigned_inputs:
                source_url = self.ctx.store.presign_get(first.key)
            else:
                source_url = done.output_urls[0]
            source_uri_s3 = first.uri
        return records

    async def _step_done(self, stored: list[StoredImage], cell: int) -> None:
        """Thumbnails from the stored bytes (for the gallery; none past the gallery's cap, which
        counts cells in item, round order) and the run's progress bar."""
        if self.params.image_artifacts and cell < MAX_CELLS:
            for s in stored:
                thumb = await in_thread(partial(thumbnail_of, self.ctx.store, s.key))
                if thumb is not None:
                    self.thumbnails[s.key] = thumb.data_uri()
        self.steps_done += 1
        percent = 100.0 * self.steps_done / max(1, self.steps_total)
        text = f"{self.steps_done} of {self.steps_total} generations stored"
        await in_thread(partial(self.progress.update, percent, text))
