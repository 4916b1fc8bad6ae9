"""The batch flow: every line accounted for, resumable after a kill, budgeted, recoverable."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from pathlib import Path

import pytest
from prefect import flow

from prefect_eggapi.client.errors import TaskAbandonedError
from prefect_eggapi.client.types import GenerateRequest
from prefect_eggapi.flows import batch_generate, recover_outputs
from prefect_eggapi.flows.batch import BatchError
from prefect_eggapi.safety.ledger import EntryState, SQLiteLedger
from prefect_eggapi.tasks import submit_generation, wait_for_task

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture
def batch_env(eggapi_env, local_s3, s3_bucket, monkeypatch):
    for name, value in local_s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EGGAPI_S3_BUCKET", s3_bucket)
    monkeypatch.setenv("EGGAPI_S3_PREFIX", "out")
    return eggapi_env


def manifest(tmp_path: Path, n: int, extra: list[str] = (), name="batch.jsonl") -> str:
    lines = [
        json.dumps({"id": f"item-{i:04d}", "prompt": f"a tiny robot number {i}"}) for i in range(n)
    ]
    lines += list(extra)
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def status_lines(local_s3, bucket: str, uri: str) -> list[dict]:
    key = uri.split(f"s3://{bucket}/", 1)[1]
    body = local_s3.client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines()]


def run(coro):
    return asyncio.run(coro)


# Every guarantee holds whether each item is a task run (1) or items share one (5: 5 + 5 + 2).
ITEMS_PER_TASK = pytest.mark.parametrize("items_per_task", [1, 5], ids=["per-item", "chunks"])


@ITEMS_PER_TASK
def test_every_line_accounted_for_and_rerun_resumes(
    batch_env, local_s3, s3_bucket, tmp_path, items_per_task
):
    broken = ["{oops", json.dumps({"id": "item-0001", "prompt": "dup"}), json.dumps({"x": 1})]
    path = manifest(tmp_path, 12, broken)
    chunks = {"concurrency": 4, "items_per_task": items_per_task}
    with pytest.raises(BatchError, match="3 broken line"):
        run(batch_generate(manifest=path, **chunks))
    created = batch_env.created_tasks()
    assert len(created) == 12
    assert sorted(t["prompt"] for t in created) == sorted(
        f"a tiny robot number {i}" for i in range(12)
    )
    summary = run(batch_generate(manifest=path, fail_on_item_error=False, **chunks))
    assert summary.items == 12 and summary.persisted == 12 and summary.resumed == 12
    assert summary.broken_lines == 3 and summary.failed == 0
    assert len(batch_env.created_tasks()) == 12  # the rerun paid for nothing
    rows = status_lines(local_s3, s3_bucket, summary.status_uri)
    assert [r["line"] for r in rows] == list(range(1, 16))  # every line, in order
    assert {r["status"] for r in rows[:12]} == {"persisted"}
    assert [r["status"] for r in rows[12:]] == ["broken"] * 3
    assert all(r["s3_uris"][0].startswith(f"s3://{s3_bucket}/out/gen_") for r in rows[:12])
    # The batch cost what was billed; the rerun itself paid nothing.
    assert summary.batch_cost == sum(Decimal(t["billed"]) for t in created)
    assert summary.total_cost == 0 and summary.reused == 0


@ITEMS_PER_TASK
def test_failures_are_reported_per_item(batch_env, local_s3, s3_bucket, tmp_path, items_per_task):
    batch_env.add_fault("upstream_failure", times=1)
    path = manifest(tmp_path, 4, [json.dumps({"id": "bad", "prompt": "forbidden words"})])
    with pytest.raises(BatchError, match="1 failed"):
        run(batch_generate(manifest=path, concurrency=1, items_per_task=items_per_task))
    uri = f"s3://{s3_bucket}/out/batches/"
    listing = local_s3.client().list_objects_v2(Bucket=s3_bucket, Prefix="out/batches/")
    status_key = next(o["Key"] for o in listing["Contents"] if o["Key"].endswith("status.jsonl"))
    rows = status_lines(local_s3, s3_bucket, uri.split("out/batches/")[0] + status_key)
    by_id = {r["id"]: r for r in rows}
    assert by_id["bad"]["status"] == "failed"
    assert by_id["bad"]["error"]["type"] == "ContentModerationError"
    assert all(by_id[f"item-{i:04d}"]["status"] == "persisted" for i in range(4))
    statuses = [t["status"] for t in batch_env.created_tasks()]
    # One upstream failure was retried as a fresh attempt; the moderated one was not retried.
    assert statuses.count("failed") == 2 and statuses.count("completed") == 4


def test_budget_stops_fanning_out(batch_env, local_s3, s3_bucket, tmp_path):
    path = manifest(tmp_path, 10)
    with pytest.raises(BatchError, match="skipped"):
        run(
            batch_generate(
                manifest=path, model="nanobanana-pro", resolution="4k", budget=0.1, concurrency=1
            )
        )
    billed = sum(Decimal(t["billed"]) for t in batch_env.created_tasks())
    assert len(batch_env.created_tasks()) == 3 and billed <= Decimal("0.1")


@ITEMS_PER_TASK
def test_kill_mid_batch_then_rerun_pays_once_and_loses_nothing(
    batch_env, local_s3, s3_bucket, tmp_path, emulator_api_key, ledger_dir, items_per_task
):
    batch_env.set_config(pending_seconds=0.2, processing_seconds=0.6)
    path = manifest(tmp_path, 40)
    script = tmp_path / "batch_victim.py"
    script.write_text(
        textwrap.dedent(f"""
        import asyncio
        from prefect_eggapi.flows import batch_generate
        asyncio.run(batch_generate(manifest={path!r}, concurrency=8,
                                   items_per_task={items_per_task}))
    """)
    )
    # The victim starts its own ephemeral Prefect server: its 20 s start-up default timed out on
    # a loaded machine (the victim then exited 1 before it could be killed).
    env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    log = tmp_path / "victim.log"
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        start_new_session=True,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    s3 = local_s3.client()
    try:
        deadline = time.monotonic() + 180
        persisted = 0
        while time.monotonic() < deadline and proc.poll() is None:
            listing = s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/batches/")
            persisted = sum(
                o["Key"].endswith(".persisted.json") for o in listing.get("Contents", [])
            )
            if persisted >= 10:
                break
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert persisted >= 10
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    before = len(batch_env.created_tasks())
    assert before < 40 or persisted < 40
    summary = run(batch_generate(manifest=path, concurrency=8, items_per_task=items_per_task))
    assert summary.persisted == 40 and summary.failed == 0 and summary.resumed >= 10
    created = batch_env.created_tasks()
    assert len(created) == 40  # zero duplicates
    assert len({t["task_id"] for t in created}) == 40
    rows = status_lines(local_s3, s3_bucket, summary.status_uri)
    assert len(rows) == 40 and {r["status"] for r in rows} == {"persisted"}
    # No wrong image: each line's task is the one the emulator made for that line's prompt.
    prompt_of = {t["task_id"]: t["prompt"] for t in created}
    assert all(prompt_of[r["task_id"]] == f"a tiny robot number {r['line'] - 1}" for r in rows)


def test_recovery_collects_an_abandoned_task(batch_env, local_s3, s3_bucket, ledger_dir):
    batch_env.set_config(manual=True)

    @flow
    def impatient():
        t = submit_generation(GenerateRequest(model="nanobanana", prompt="slow boat"), key="r-1")
        return wait_for_task(t, timeout=0.3)

    with pytest.raises(TaskAbandonedError) as info:
        impatient()
    task_id = info.value.task_id
    ledger = SQLiteLedger(ledger_dir / "ledger.sqlite3")
    assert ledger.find_task(task_id).state is EntryState.ABANDONED

    first = run(recover_outputs(scan_api_pages=0))
    assert first.still_running == [task_id] and first.persisted == []

    batch_env.complete(task_id)
    second = run(recover_outputs(scan_api_pages=0))
    assert second.persisted == [task_id]
    assert ledger.find_task(task_id).state is EntryState.PERSISTED
    key = f"out/{task_id}/0.png"
    head = local_s3.client().head_object(Bucket=s3_bucket, Key=key)
    assert head["Metadata"]["eggapi-task-id"] == task_id
    assert run(recover_outputs(scan_api_pages=0)).checked == 0  # nothing left to do


def test_recovery_finds_orphans_in_the_task_list(batch_env, local_s3, s3_bucket, emulator_api_key):
    from prefect_eggapi.client import EggAPIClient

    with EggAPIClient(emulator_api_key, batch_env.base_url) as client:
        orphan = client.generate(model="nanobanana", prompt="made outside any ledger")
        client.wait_for_task(orphan, timeout=30)
    # Not this ledger's: left alone unless asked for, then kept apart from the ledger's outputs.
    assert orphan.id not in run(recover_outputs(scan_api_pages=2)).persisted
    summary = run(recover_outputs(scan_api_pages=2, include_unknown=True))
    assert orphan.id in summary.persisted and summary.unattributed == [orphan.id]
    s3 = local_s3.client()
    assert s3.head_object(Bucket=s3_bucket, Key=f"out/unattributed/{orphan.id}/0.png")
    assert "Contents" not in s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"out/{orphan.id}/")
    again = run(recover_outputs(scan_api_pages=2, include_unknown=True))
    assert again.persisted == []  # now recorded


def test_recovery_survives_one_item_it_cannot_store(batch_env, ledger_dir, monkeypatch):
    from prefect_eggapi.flows import recovery

    ledger = SQLiteLedger(ledger_dir / "ledger.sqlite3")
    for name in ("a", "b"):
        ledger.put(
            recovery.LedgerEntry(
                key=name,
                logical_key=name,
                fingerprint="f",
                state=EntryState.ABANDONED,
                task_id=f"gen_{name}",
                model="nanobanana",
                task_type="image_generate",
                prompt_sha256="x",
            )
        )
    seen: list[str] = []

    def recover_one(task_id, *args):
        seen.append(task_id)
        if task_id == "gen_a":
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(recovery, "_recover_one", recover_one)
    summary = run(recover_outputs(scan_api_pages=0))
    assert seen == ["gen_a", "gen_b"]
    assert "No space left" in summary.errors["gen_a"] and "gen_b" not in summary.errors


@pytest.mark.timeout(900)
def test_thousand_item_batch_under_the_rate_limit(batch_env, tmp_path, monkeypatch):
    batch_env.set_config(rate_limit_per_second=50, pending_seconds=0.05, processing_seconds=0.3)
    monkeypatch.setenv("EGGAPI_REQUESTS_PER_SECOND", "45")
    path = manifest(tmp_path, 1000)
    started = time.monotonic()
    summary = run(batch_generate(manifest=path, concurrency=64))
    elapsed = time.monotonic() - started
    audit = batch_env.audit()
    created = batch_env.created_tasks()
    assert summary.persisted == 1000 and summary.failed == 0
    assert len(created) == 1000
    limited = audit["rate_limited"]
    requests = sum(sum(v.values()) for v in audit["requests"].values())
    print(f"1000 items in {elapsed:.1f}s, {requests} API requests, {limited} x 429")
    assert limited <= requests * 0.01  # no sustained 429 storm


def test_line_ranges_share_the_whole_manifests_keys(batch_env, local_s3, s3_bucket, tmp_path):
    """Two ranges of one manifest, then the unsharded run: same run key, same item keys, so the
    ranges pay for each item once, a range rerun pays nothing, and the unsharded run resumes
    every item. Each range writes its own status file; status.jsonl is the whole manifest's."""
    path = manifest(tmp_path, 10, ["{oops"])  # line 11 is broken
    first = run(batch_generate(manifest=path, lines="1:6", fail_on_item_error=False))
    second = run(batch_generate(manifest=path, lines="6:", fail_on_item_error=False))
    assert (first.items, first.persisted, first.broken_lines) == (5, 5, 0)
    assert (second.items, second.persisted, second.broken_lines) == (5, 5, 1)
    assert first.run_key == second.run_key and first.lines == "1:6"
    assert first.status_uri.endswith(f"/batches/{first.run_key}/shards/lines-1-6.status.jsonl")
    assert second.status_uri.endswith("/shards/lines-6-end.status.jsonl")
    rows = status_lines(local_s3, s3_bucket, second.status_uri)
    assert [r["line"] for r in rows] == [6, 7, 8, 9, 10, 11]
    created = batch_env.created_tasks()
    assert len(created) == 10
    assert first.total_cost + second.total_cost == sum(Decimal(t["billed"]) for t in created)

    again = run(batch_generate(manifest=path, lines="1:6", fail_on_item_error=False))
    assert again.resumed == 5 and again.total_cost == 0
    whole = run(batch_generate(manifest=path, fail_on_item_error=False))
    assert whole.run_key == first.run_key and whole.resumed == 10 and whole.total_cost == 0
    assert len(batch_env.created_tasks()) == 10  # neither rerun paid
    rows = status_lines(local_s3, s3_bucket, whole.status_uri)
    assert whole.status_uri.endswith(f"/batches/{first.run_key}/status.jsonl")
    assert [r["line"] for r in rows] == list(range(1, 12))
    assert [r["status"] for r in rows] == ["persisted"] * 10 + ["broken"]


@pytest.mark.parametrize("bad", ["5:3", "0:4", "3", "a:b", "4:4"])
def test_a_bad_line_range_is_refused_before_anything_is_paid(batch_env, tmp_path, bad):
    from prefect_eggapi.client.errors import InvalidRequestError

    path = manifest(tmp_path, 3)
    with pytest.raises(InvalidRequestError, match="lines"):
        run(batch_generate(manifest=path, lines=bad))
    assert batch_env.created_tasks() == []


def test_shard_ranges_cover_every_line_once():
    from prefect_eggapi.flows.batch import in_range
    from prefect_eggapi.flows.manifests import BatchItem
    from prefect_eggapi.flows.sharded import plan_ranges

    # Items on lines 2..30 except a few gaps (blank or broken lines), 4 shards.
    lines = [n for n in range(2, 31) if n not in (5, 6, 17)]
    items = [
        BatchItem(id=f"i{n}", line=n, request=GenerateRequest(model="nanobanana", prompt="x"))
        for n in lines
    ]
    ranges = plan_ranges(items, 4)
    assert len(ranges) == 4 and ranges[0][0] == 1 and ranges[-1][1] is None
    for n in range(1, 40):
        assert sum(in_range(n, r) for r in ranges) == 1, n
    sizes = [sum(in_range(i.line, r) for i in items) for r in ranges]
    assert max(sizes) - min(sizes) <= 1, sizes
    assert plan_ranges(items[:2], 8) == [(1, items[1].line), (items[1].line, None)]


def test_chunks_name_their_task_runs_and_log_one_line_per_item(batch_env, tmp_path):
    """items_per_task > 1: one task run per chunk, named by its lines; each item logs one line
    (its steps log warnings only) and still announces its own events."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    path = manifest(tmp_path, 7)
    state = run(batch_generate(manifest=path, concurrency=3, items_per_task=3, return_state=True))
    assert state.is_completed(), state
    flow_run_id = state.state_details.flow_run_id
    created = batch_env.created_tasks()
    assert len(created) == 7
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        assert sorted(r.name for r in runs) == [
            "items · lines 1-3 · 3",
            "items · lines 4-6 · 3",
            "items · lines 7-7 · 1",
        ]
        # Run logs reach the API in batches, shortly after the run: wait for them (bounded).
        deadline = time.monotonic() + 30
        while True:
            logs = [
                entry.message
                for entry in client.read_logs(
                    log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
                )
            ]
            item_lines = [m for m in logs if "): EggAPI task gen_" in m]
            if len(item_lines) >= 7 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        wanted = {f"eggapi.task.{t['task_id']}" for t in created}
        deadline = time.monotonic() + 30
        while True:  # events land asynchronously too
            events = client.read_events(
                EventFilter(
                    event=EventNameFilter(name=["eggapi.task.persisted"]),
                    resource=EventResourceFilter(id=sorted(wanted)),
                ),
                limit=50,
            ).events
            if {e.resource.id for e in events} >= wanted or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    for i in range(7):
        mine = [m for m in item_lines if m.startswith(f"line {i + 1} (item-{i:04d}): ")]
        assert len(mine) == 1 and "persisted" in mine[0] and "s3://" in mine[0], item_lines
    # The steps' own INFO lines (submitted, status changes, stored) stayed out of the run log.
    assert not [m for m in logs if " submitted (" in m or m.startswith("Stored ")], logs
    assert {e.resource.id for e in events} >= wanted  # one eggapi.task.persisted per item


def test_chunk_runs_start_in_turn_as_slots_free_up(batch_env, tmp_path, monkeypatch):
    """A chunk's task run starts once the items before it hold slots, not with the batch: a
    chunk shown as running has items running or is the one next in line, and a big batch does
    not hold every item at once."""
    from prefect_eggapi.flows import batch as batch_module

    started: list[tuple[int, int, int]] = []  # (first line, items finished, slots taken)
    original = batch_module._Batch.run_chunk

    async def recording(self, items, progress, total):
        started.append((items[0].line, self.finished, self.slots_taken))
        return await original(self, items, progress, total)

    monkeypatch.setattr(batch_module._Batch, "run_chunk", recording)
    path = manifest(tmp_path, 8)
    summary = run(batch_generate(manifest=path, concurrency=2, items_per_task=2))
    assert summary.persisted == 8
    assert [line for line, _, _ in started] == [1, 3, 5, 7]
    # Chunk i starts exactly when every item of the chunks before it holds a slot: at most one
    # started chunk waits for slots. (How many chunks are open then depends on which items are
    # slow: items still running may span two earlier chunks.)
    assert [taken for _, _, taken in started] == [0, 2, 4, 6]
    # With 2 slots, chunk 3 only after chunk 1's items finished and gave theirs to chunk 2's.
    assert started[0][1] == 0 and started[1][1] == 0
    assert all(finished >= 2 * (i - 1) for i, (_, finished, _) in enumerate(started) if i >= 2)
    assert len(batch_env.created_tasks()) == 8
