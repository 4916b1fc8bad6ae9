"""What a run leaves behind: events, artifacts, logs, and never the API key."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.context import get_run_context
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

from prefect_eggapi.client.errors import ContentModerationError
from prefect_eggapi.client.types import GenerateRequest
from prefect_eggapi.flows import image_pipeline
from prefect_eggapi.storage import OutputStore
from prefect_eggapi.tasks import generate_image
from prefect_eggapi.tasks.artifacts import publish_report

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def _events_for(task_id: str, deadline: float = 30.0) -> dict[str, dict]:
    """Events land asynchronously; poll the API until all three have arrived (bounded)."""
    resource_id = f"eggapi.task.{task_id}"
    found: dict[str, dict] = {}
    end = time.monotonic() + deadline
    with get_client(sync_client=True) as client:
        while time.monotonic() < end:
            page = client.read_events(
                EventFilter(
                    event=EventNameFilter(prefix=["eggapi.task."]),
                    resource=EventResourceFilter(id=[resource_id]),
                ),
                limit=50,
            )
            found = {e.event: e.model_dump(mode="json") for e in page.events}
            if {"eggapi.task.submitted", "eggapi.task.completed", "eggapi.task.persisted"} <= set(
                found
            ):
                break
            time.sleep(0.5)
    return found


def test_run_leaves_events_artifacts_and_a_cost_table_that_matches_billing(
    eggapi_env, emulator_api_key, output_store, caplog
):
    caplog.set_level(logging.DEBUG)
    prompts = ["a blue heron", "a green kite"]

    @flow
    def pipeline():
        results = [
            generate_image(
                GenerateRequest(model="nanobanana-pro", prompt=p, resolution="2k", num_outputs=2),
                output_store,
                label=f"item-{i}",
            )
            for i, p in enumerate(prompts)
        ]
        total = publish_report([r.report_row() for r in results], key="eggapi-test-report")
        return results, total, get_run_context().flow_run.id

    results, total, flow_run_id = pipeline()

    # Cost table total == what the emulator billed, to the cent and below.
    billed = sum(Decimal(t["billed"]) for t in eggapi_env.created_tasks())
    assert total == billed == Decimal("0.064")

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        # Run logs reach the API in batches, shortly after the run: wait for them (bounded).
        deadline = time.monotonic() + 30
        while True:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
            if any("completed:" in entry.message for entry in logs):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
    by_type: dict[str, list] = {}
    for a in artifacts:
        by_type.setdefault(a.type, []).append(a)
    # One image artifact per stored output, pointing at a presigned URL of that object.
    assert len(by_type["image"]) == 4
    stored_keys = {s.key for r in results for s in r.stored}
    assert {
        a.data.split("?")[0].split(output_store.bucket + "/", 1)[1] for a in by_type["image"]
    } == stored_keys
    table = next(a for a in by_type["table"] if a.key == "eggapi-test-report")
    *rows, total_row = json.loads(table.data) if isinstance(table.data, str) else table.data
    # "task / object" is gen_…/0.png, gen_…/1.png: the task id and its objects in one column.
    assert [row["task / object"].split("/")[0] for row in rows] == [r.task_id for r in results]
    assert {row["paid"] for row in rows} == {"$0.0320"}
    assert all(row["polls"] >= 1 and row["task / object"].endswith(".png") for row in rows)
    assert total_row["item"] == "total" and total_row["paid"] == "$0.0640"
    assert any("$0.0640" in (a.data or "") for a in by_type["markdown"])

    for r in results:
        events = _events_for(r.task_id)
        assert {"eggapi.task.submitted", "eggapi.task.completed", "eggapi.task.persisted"} <= set(
            events
        ), events
        completed = events["eggapi.task.completed"]
        assert completed["resource"]["prefect.resource.id"] == f"eggapi.task.{r.task_id}"
        assert completed["resource"]["eggapi.model"] == "nanobanana-pro"
        assert completed["payload"]["outputs"] == 2
        assert Decimal(completed["payload"]["cost"]) == Decimal("0.032")

    # Secret hygiene: the key is nowhere a user could read it.
    texts = [repr(results), repr(total)]
    texts += [str(a.data) + str(a.description) for a in artifacts]
    texts += [entry.message for entry in logs]
    texts += [rec.getMessage() for rec in caplog.records]
    assert logs, "expected run logs"
    leaked = [t for t in texts if emulator_api_key in t]
    assert not leaked, leaked[:3]


def test_failed_task_emits_failed_event_and_error_has_no_key(
    eggapi_env, emulator_api_key, output_store
):
    @flow
    def pipeline():
        return generate_image(
            GenerateRequest(model="nanobanana", prompt="forbidden fruit"), output_store
        )

    with pytest.raises(ContentModerationError) as info:
        pipeline()
    assert emulator_api_key not in str(info.value) and emulator_api_key not in repr(info.value)
    events = {}
    end = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while "eggapi.task.failed" not in events and time.monotonic() < end:
            page = client.read_events(
                EventFilter(resource=EventResourceFilter(id=[f"eggapi.task.{info.value.task_id}"])),
                limit=20,
            )
            events = {e.event: e for e in page.events}
            time.sleep(0.5)
    failed = events["eggapi.task.failed"]
    assert failed.payload["classification"] == "terminal"
    assert "Content moderation" in failed.payload["error"]


# ------------------------------------------------------------------ the pipeline: once per event


def _events(prefix: str, resource_ids: list[str]) -> list[Any]:
    """Every event named ``prefix…`` about these resources (paged through)."""
    with get_client(sync_client=True) as client:
        page = client.read_events(
            EventFilter(
                event=EventNameFilter(prefix=[prefix]),
                resource=EventResourceFilter(id=resource_ids),
            ),
            limit=50,
        )
        events = list(page.events)
        while page.next_page:
            page = client.read_events_page(page.next_page)
            events.extend(page.events)
    return events


def _flush_events() -> None:
    """Make sure every event this process emitted so far is readable from the API: send a
    sentinel after them and poll (bounded) until the server has stored it."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    sentinel = f"eggapi.test.sentinel.{uuid4().hex}"
    emit_event("eggapi.test.sentinel", resource={"prefect.resource.id": sentinel})
    EventsWorker.drain_all()
    deadline = time.monotonic() + 30
    while not _events("eggapi.test.sentinel", [sentinel]):
        assert time.monotonic() < deadline, "the sentinel event never reached the API"
        time.sleep(0.2)


def _pipeline(**params: Any) -> tuple[Any, UUID]:
    state = asyncio.run(image_pipeline(return_state=True, **params))
    assert state.is_completed(), state
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    result = state.result()
    if inspect.isawaitable(result):  # some Prefect versions hand back a coroutine
        result = asyncio.run(result)  # type: ignore[arg-type]
    return result, flow_run_id


def _run_artifacts(flow_run_id: UUID) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key or f"unkeyed-{a.id}": a for a in found}


@pytest.fixture
def pipeline_env(eggapi_env, local_s3, s3_bucket, monkeypatch):
    for name, value in local_s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EGGAPI_S3_BUCKET", s3_bucket)
    monkeypatch.setenv("EGGAPI_S3_PREFIX", "obs")
    return eggapi_env


def test_a_rerun_that_reconnects_emits_no_task_events_and_materializes_nothing(
    pipeline_env, local_s3, emulator_api_key
):
    params: dict[str, Any] = dict(count=2, seed=21, edit_instructions=["add a red kite"])
    first, first_run = _pipeline(**params)
    again, rerun = _pipeline(**params)
    assert first.submitted_tasks == 4 and again.submitted_tasks == 0 and again.reused_tasks == 4
    assert len(pipeline_env.created_tasks()) == 4
    _flush_events()

    task_ids = [t["task_id"] for t in pipeline_env.created_tasks()]
    events = _events("eggapi.task.", [f"eggapi.task.{t}" for t in task_ids])
    counts = Counter((e.event, e.resource.id) for e in events)
    for task_id in task_ids:
        for kind in ("submitted", "completed", "persisted"):
            # Exactly once: emitted by the first run, not again by the rerun that reconnected.
            assert counts[(f"eggapi.task.{kind}", f"eggapi.task.{task_id}")] == 1, counts

    # Every stored image is one materialized asset, its edit's source image as upstream.
    manifest_items = {(i, r): uri for i, r, uri in _images(first)}
    materialized = _events("prefect.asset.materialization.", list(manifest_items.values()))
    assert sorted(e.resource.id for e in materialized) == sorted(manifest_items.values())
    by_uri = {e.resource.id: e for e in materialized}
    for (item, rnd), uri in manifest_items.items():
        event = by_uri[uri]
        assert event.event == "prefect.asset.materialization.succeeded"
        upstream = [r.id for r in event.related if r.role == "asset"]
        assert upstream == ([manifest_items[(item, rnd - 1)]] if rnd else []), event.related
        payload = event.payload
        assert payload["task_id"] == uri.rsplit("/", 2)[-2]
        assert payload["model"] == "nanobanana-pro" and Decimal(payload["cost"]) == Decimal("0.016")
        assert payload["prompt"] and payload["round"] == str(rnd)

    # What each run's artifacts say it paid: the rerun paid nothing.
    table_rows = []
    for run in (first_run, rerun):
        arts = _run_artifacts(run)
        [table] = [a for k, a in arts.items() if k.endswith("-cost")]
        rows = json.loads(table.data) if isinstance(table.data, str) else table.data
        table_rows.append(rows)
        assert table.key == f"eggapi-image-pipeline-{first.run_key}-cost"
        [gallery] = [a for k, a in arts.items() if k.endswith("-gallery")]
        assert gallery.data.count("data:image/webp;base64,") == 4
        assert local_s3.secret_key not in gallery.data and emulator_api_key not in gallery.data
        assert sum(a.type == "progress" for a in arts.values()) == 1
        assert not any(a.type == "image" for a in arts.values())
    first_total, rerun_total = table_rows[0][-1], table_rows[1][-1]
    assert first_total["item"] == rerun_total["item"] == "total"
    assert first_total["paid"] == "$0.0640" and rerun_total["paid"] == "$0.0000"
    assert {row["paid"] for row in table_rows[1][:-1]} == {"$0.0000"}
    assert len(table_rows[0][0]) <= 8  # narrow enough for a laptop screen

    with get_client(sync_client=True) as client:
        names = {client.read_flow_run(r).name for r in (first_run, rerun)}
    assert names == {"pipeline · 2 prompts × 2 rounds · nanobanana-pro 1k"}


def _images(summary: Any) -> list[tuple[int, int, str]]:
    """(item, round, s3 URI) of every stored image, from the run's manifest."""
    from prefect_eggapi.storage import S3Settings

    store = OutputStore.from_settings(S3Settings.from_env())
    key = summary.manifest_uri.split("/", 3)[3]
    body = store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    return [(i["item"], i["round"], i["s3_uri"]) for i in json.loads(body)["items"]]


def test_artifact_keys_and_run_names_say_which_flow_or_deployment(monkeypatch):
    from prefect_eggapi.flows.pipeline import _artifact_scope, _flow_run_name
    from prefect_eggapi.tasks.artifacts import run_artifact_key

    adhoc = asyncio.run(_artifact_scope())
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", str(uuid4()))
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__NAME", "on-demand")
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__FLOW_NAME", "eggapi-image-pipeline")
    from prefect.runtime import flow_run

    slot = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
    monkeypatch.setitem(flow_run.FIELDS, "scheduled_start_time", lambda: slot)
    deployed = asyncio.run(_artifact_scope())
    assert adhoc == "eggapi-image-pipeline"
    assert deployed == "eggapi-image-pipeline-on-demand"
    keys = {run_artifact_key(s, "params-abc", "cost") for s in (adhoc, deployed)}
    assert keys == {
        "eggapi-image-pipeline-params-abc-cost",
        "eggapi-image-pipeline-on-demand-params-abc-cost",
    }
    # A long key is shortened with a hash, never by cutting off what it is.
    long_a = run_artifact_key("x" * 200, "a", "gallery")
    long_b = run_artifact_key("x" * 200, "b", "gallery")
    assert long_a.endswith("-gallery") and len(long_a) <= 120 and long_a != long_b
    assert _flow_run_name().startswith("on-demand · slot 2026-12-01 03:00Z · 3 prompts × 3")
