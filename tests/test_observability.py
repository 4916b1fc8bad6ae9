"""What a run leaves behind: events, artifacts, logs, and never the API key."""

from __future__ import annotations

import json
import logging
import time
from decimal import Decimal

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

from prefect_eggapi.artifacts import publish_report
from prefect_eggapi.errors import ContentModerationError
from prefect_eggapi.models import GenerateRequest
from prefect_eggapi.tasks import generate_image

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
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [row["task id"] for row in rows] == [r.task_id for r in results]
    assert {row["cost"] for row in rows} == {"$0.0320"}
    assert all(row["polls"] >= 1 and row["stored"].startswith("s3://") for row in rows)
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
