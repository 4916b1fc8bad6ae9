"""Schedules really run, and a second run of the same scheduled slot pays nothing.

A real `prefect server start` (SQLite, temporary PREFECT_HOME, scheduler loops lowered to 1 s),
the local stack (emulator + SeaweedFS), and a copy of ``deployments/prefect.yaml`` with only the
``nightly-posters`` deployment, made cheap (1 prompt, 1 edit round) and given an hourly interval
schedule anchored a few seconds from now: the scheduler creates the runs (none is created here),
exactly one slot falls due, and `prefect worker start --run-once` executes it end to end. Then
the same flow run is set back to Scheduled (an operator rerunning that slot) and executed again:
the emulator's audit of billable tasks must not grow, and the bucket (outputs, manifest and the
ledger, which by default lives beside them) must not change. The verdict comes from the emulator
and S3 only, never from reading the library's ledger.

Fails in 30 s if the server's scheduler cannot insert runs (SQLAlchemy 2.1 with Prefect 3.8.x:
"Can't evaluate bulk DML statement" in ``_insert_scheduled_flow_runs``).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from prefect_eggapi.testing.stack import LocalStack
from prefect_procs import POOL, REPO, api_read, cli, prefect_server, start_worker, stop, wait_until

pytestmark = pytest.mark.integration

PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
DEPLOYMENT = "nightly-posters"
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
PREFETCH_SECONDS = 10  # the worker's default PREFECT_WORKER_PREFETCH_SECONDS, set explicitly
SLOT_LEAD_SECONDS = 15  # the slot is this far ahead of writing the file: deploy takes ~4 s


@pytest.fixture(scope="module")
def scheduling_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    server_env = {
        # New/updated deployments are scheduled by the "recent deployments" loop (default 5 s);
        # the main loop (default 60 s) tops up the others. Both at 1 s: runs appear at once.
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
    }
    with prefect_server(tmp_path_factory.mktemp("prefect-home"), server_env) as env:
        yield env


def _scheduled_copy(path: Path, slot: dt.datetime) -> None:
    """deployments/prefect.yaml with only nightly-posters: cheap, and due at ``slot``."""
    config = yaml.safe_load(PREFECT_FILE.read_text())
    (nightly,) = [d for d in config["deployments"] if d["name"] == DEPLOYMENT]
    # Hourly, anchored at the slot: the scheduler creates slot, slot+1h, slot+2h (min_runs=3),
    # and only the first falls inside the worker's prefetch window.
    nightly["schedules"] = [
        {
            "interval": 3600,
            "anchor_date": slot.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "timezone": "UTC",
            "active": True,
        }
    ]
    nightly["parameters"].update(
        count=1,
        edit_instructions=["add a rainbow"],
        resolution="1k",
        image_artifacts=False,
        wait_timeout=60,
    )
    config["deployments"] = [nightly]
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _runs(api: str, deployment_id: str) -> list[dict[str, Any]]:
    body = {
        "flow_runs": {"deployment_id": {"any_": [deployment_id]}},
        "sort": "EXPECTED_START_TIME_ASC",
    }
    runs = api_read("POST", f"{api}/flow_runs/filter", body)
    assert isinstance(runs, list), runs
    return runs


def _run(api: str, flow_run_id: str) -> dict[str, Any]:
    run = api_read("GET", f"{api}/flow_runs/{flow_run_id}")
    assert isinstance(run, dict), run
    return run


def _objects(stack: LocalStack) -> dict[str, tuple[str, str]]:
    """Every object in the bucket: key -> (ETag, LastModified)."""
    client = stack.output_store().client
    found: dict[str, tuple[str, str]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket):
        for o in page.get("Contents", []):
            found[o["Key"]] = (o["ETag"], o["LastModified"].isoformat())
    return found


def _execute_once(
    env: dict[str, str], api: str, flow_run_id: str, log: Path, cwd: Path, after: float
) -> dict[str, Any]:
    """`prefect worker start --run-once`; the run's state once it is terminal after ``after``."""
    worker = start_worker(env, log, cwd, "--run-once")
    try:

        def finished() -> dict[str, Any] | None:
            run = _run(api, flow_run_id)
            state = run["state"]
            stamp = dt.datetime.fromisoformat(state["timestamp"].replace("Z", "+00:00"))
            if state["type"] in TERMINAL and stamp.timestamp() > after:
                return run
            if worker.poll() is not None and state["type"] == "SCHEDULED":
                raise AssertionError(
                    "the worker exited without taking the run:\n"
                    + log.read_text(errors="replace")[-4000:]
                )
            return None

        run: dict[str, Any] = wait_until(finished, 120, "the flow run to finish", 0.5)
        worker.wait(timeout=60)  # --run-once exits once its run is over
    finally:
        stop(worker)
    return run


def test_a_scheduled_run_completes_and_a_rerun_of_its_slot_pays_nothing(
    scheduling_server: dict[str, str], tmp_path: Path
) -> None:
    env = scheduling_server
    api = env["PREFECT_API_URL"]
    started = time.monotonic()
    timings: dict[str, float] = {}

    slot = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=SLOT_LEAD_SECONDS)
    prefect_file = tmp_path / "prefect.yaml"
    _scheduled_copy(prefect_file, slot)
    cli(env, "work-pool", "create", POOL, "--type", "process")
    out = cli(env, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file))
    assert f"eggapi-image-pipeline/{DEPLOYMENT}" in out, out
    deployed = time.monotonic()
    late = dt.datetime.now(dt.UTC) - slot
    assert late < dt.timedelta(seconds=-1), f"deploy ended {late} after the slot it was to schedule"
    deployment = api_read("GET", f"{api}/deployments/name/eggapi-image-pipeline/{DEPLOYMENT}")
    assert isinstance(deployment, dict), deployment
    deployment_id = deployment["id"]
    assert deployment["schedules"][0]["schedule"]["interval"] == 3600

    # The scheduler, not this test, creates the runs.
    try:
        runs = wait_until(lambda: _runs(api, deployment_id), 30, "the scheduler to create runs")
    except AssertionError as exc:
        server_log = (Path(env["PREFECT_HOME"]) / "server.log").read_text(errors="replace")
        errors = [line for line in server_log.splitlines() if "Error" in line]
        # SQLAlchemy 2.1 with Prefect 3.8.x: "Can't evaluate bulk DML statement" here.
        raise AssertionError(f"{exc}; server errors: {errors[-5:]}") from None
    timings["deploy → scheduled runs"] = time.monotonic() - deployed
    assert all(r["auto_scheduled"] and r["state"]["type"] == "SCHEDULED" for r in runs), runs
    first = runs[0]
    expected = dt.datetime.fromisoformat(first["expected_start_time"].replace("Z", "+00:00"))
    assert expected == slot, (expected, slot)
    assert all(
        dt.datetime.fromisoformat(r["expected_start_time"].replace("Z", "+00:00")) - slot
        >= dt.timedelta(hours=1)
        for r in runs[1:]
    ), "only one slot may be due"
    flow_run_id = first["id"]

    with LocalStack(pending_seconds=0.1, processing_seconds=0.3, bucket="eggapi-sched") as stack:
        assert stack.emulator is not None
        worker_env = {
            **env,
            **stack.env(),
            "PREFECT_WORKER_PREFETCH_SECONDS": str(PREFETCH_SECONDS),
        }
        # A --run-once worker polls once: start it when the slot is inside its prefetch window.
        wait_until(
            lambda: dt.datetime.now(dt.UTC) >= slot - dt.timedelta(seconds=PREFETCH_SECONDS - 2),
            SLOT_LEAD_SECONDS + 30,
            "the slot to come within the worker's prefetch window",
        )

        t = time.monotonic()
        run = _execute_once(worker_env, api, flow_run_id, tmp_path / "worker-1.log", tmp_path, 0)
        timings["scheduled run"] = time.monotonic() - t
        log = (tmp_path / "worker-1.log").read_text(errors="replace")
        assert run["state"]["type"] == "COMPLETED", log[-5000:]
        assert run["auto_scheduled"] and run["deployment_id"] == deployment_id

        # Paid once: 1 generation + 1 edit, both stored, with the slot's manifest.
        created = stack.emulator.created_tasks()
        assert len(created) == 2, created
        objects = _objects(stack)
        keys = sorted(objects)
        images = [k for k in keys if k.endswith(".png")]
        assert len(images) == 2, keys
        assert {t["task_id"] for t in created} == {k.split("/")[-2] for k in images}
        run_key = f"deployment-{deployment_id}-{slot.strftime('%Y%m%dT%H%M%SZ')}"
        assert f"eggapi/manifests/{run_key}.json" in keys, keys
        # Nothing else but the slot's ledger (the default: beside the outputs in the bucket).
        assert all(k in images or "/manifests/" in k or "/ledger/" in k for k in keys), keys

        # Rerun the same slot: the same flow run back to Scheduled, executed by a new worker.
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.states import Scheduled

        reset_at = time.time()
        with SyncPrefectClient(api) as client:
            result: Any = client.set_flow_run_state(
                flow_run_id, Scheduled(name="AwaitingRetry"), force=True
            )
        assert result.status.value == "ACCEPT", result
        t = time.monotonic()
        again = _execute_once(
            worker_env, api, flow_run_id, tmp_path / "worker-2.log", tmp_path, reset_at
        )
        timings["rerun of the slot"] = time.monotonic() - t
        log = (tmp_path / "worker-2.log").read_text(errors="replace")
        assert again["state"]["type"] == "COMPLETED", log[-5000:]
        assert again["run_count"] >= 2, again  # the flow body really ran a second time
        assert again["expected_start_time"] == first["expected_start_time"]

        # Judged from the emulator and S3: nothing billed, nothing written.
        assert stack.emulator.created_tasks() == created
        after = _objects(stack)
        assert sorted(after) == keys, sorted(set(after) ^ set(keys))
        outputs = [k for k in keys if "/ledger/" not in k]
        assert {k: after[k] for k in outputs} == {k: objects[k] for k in outputs}  # none rewritten
        assert stack.env()["AWS_SECRET_ACCESS_KEY"] not in log

    timings["total"] = time.monotonic() - started
    print("\n" + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
