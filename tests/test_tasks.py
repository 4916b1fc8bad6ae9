"""Prefect tasks against the emulator over HTTP and SeaweedFS, under one Prefect test harness.

Each test counts billable tasks in the emulator's audit: that number is the money.
"""

from __future__ import annotations

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

from prefect_eggapi.client.errors import (
    BudgetExceededError,
    ContentModerationError,
    InvalidRequestError,
    TaskAbandonedError,
)
from prefect_eggapi.client.types import GenerateRequest
from prefect_eggapi.credentials import EggAPICredentials
from prefect_eggapi.safety.ledger import EntryState, SQLiteLedger
from prefect_eggapi.tasks import (
    agenerate_image,
    asubmit_generation,
    await_for_task,
    download_outputs,
    generate_image,
    submit_edit,
    submit_generation,
    wait_for_task,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]

REQ = GenerateRequest(model="nanobanana-pro", prompt="a red lighthouse at dawn")


def billable(emulator) -> list[dict]:
    return emulator.created_tasks()


def ledger(ledger_dir: Path) -> SQLiteLedger:
    return SQLiteLedger(ledger_dir / "ledger.sqlite3")


@pytest.mark.parametrize("kind", ["error_after_create", "drop_after_create"])
def test_lost_submit_response_pays_once(eggapi_env, output_store, ledger_dir, kind):
    eggapi_env.add_fault(kind, endpoint="generate", status=500)

    @flow
    def pipeline():
        return generate_image(REQ, output_store, label="lost-response")

    result = pipeline()
    created = billable(eggapi_env)
    assert len(created) == 1, created
    assert created[0]["faults"] == [kind]
    assert result.task_id == created[0]["task_id"]
    assert result.status == "completed"
    assert [s.key for s in result.stored] == [f"eggapi/{result.task_id}/0.png"]
    entry = ledger(ledger_dir).find_task(result.task_id)
    assert entry is not None and any("adopted" in h for h in entry.history)


def test_submit_rejected_before_create_is_retried_without_duplicates(eggapi_env, ledger_dir):
    # A 429 on submit provably created nothing: the client retries it itself.
    eggapi_env.add_fault("error_before_create", endpoint="generate", status=429, times=2)

    @flow
    def pipeline():
        return submit_generation(REQ, label="429")

    task = pipeline()
    assert [t["task_id"] for t in billable(eggapi_env)] == [task.id]


def test_flow_retry_and_rerun_with_same_key_do_not_pay_again(eggapi_env, output_store):
    attempts = []

    @flow(retries=1, retry_delay_seconds=0)
    def pipeline(key: str):
        created = submit_generation(REQ, key=key)
        attempts.append(created.id)
        if len(attempts) == 1:
            raise RuntimeError("crash after submit, before waiting")
        done = wait_for_task(created)
        return download_outputs(done, output_store)

    stored = pipeline("nightly/2026-11-25/item-0")
    assert len(attempts) == 2 and attempts[0] == attempts[1]
    assert len(billable(eggapi_env)) == 1

    again = pipeline.with_options(retries=0)("nightly/2026-11-25/item-0")
    assert len(billable(eggapi_env)) == 1
    assert [s.key for s in again] == [s.key for s in stored]
    assert [s.created for s in again] == [False]  # nothing written twice either


def test_changed_request_under_same_key_is_new_work(eggapi_env):
    @flow
    def pipeline(prompt: str):
        return submit_generation(GenerateRequest(model="nanobanana", prompt=prompt), key="k1")

    a = pipeline("first prompt")
    b = pipeline("second prompt")
    assert a.id != b.id
    assert len(billable(eggapi_env)) == 2


def test_moderation_failure_is_terminal_and_not_retried(eggapi_env, output_store, ledger_dir):
    bad = GenerateRequest(model="nanobanana", prompt="something forbidden")

    @flow
    def pipeline():
        return generate_image(bad, output_store, label="moderated")

    with pytest.raises(ContentModerationError) as info:
        pipeline()
    assert len(billable(eggapi_env)) == 1
    task_id = info.value.task_id
    entry = ledger(ledger_dir).find_task(task_id)
    assert entry is not None and entry.state is EntryState.FAILED and entry.retryable is False

    # A rerun of the same work does not pay again for a known moderation refusal.
    with pytest.raises(ContentModerationError) as again:
        submit_generation.fn(bad, key=entry.logical_key)
    assert str(again.value).count("failed:") == 1, str(again.value)
    assert "Content moderation" in str(again.value)
    assert len(billable(eggapi_env)) == 1


def test_upstream_failure_is_retried_as_a_fresh_attempt(eggapi_env, output_store, ledger_dir):
    eggapi_env.add_fault("upstream_failure", times=1)

    @flow
    def pipeline():
        return generate_image.with_options(retry_delay_seconds=0)(REQ, output_store, label="up")

    result = pipeline()
    created = billable(eggapi_env)
    assert [t["status"] for t in created] == ["failed", "completed"]
    assert result.task_id == created[1]["task_id"]
    entry = ledger(ledger_dir).find_task(result.task_id)
    assert entry is not None and entry.attempt == 2 and entry.state is EntryState.PERSISTED


def test_empty_output_is_retried_as_a_fresh_attempt(eggapi_env, output_store, ledger_dir):
    """A completed task without outputs: the chain's retry starts one fresh attempt (attempt 2
    in the ledger), so exactly two tasks are billed and the second one's images are stored."""
    eggapi_env.add_fault("empty_output", times=1)

    @flow
    def pipeline():
        return generate_image.with_options(retry_delay_seconds=0)(REQ, output_store, label="e")

    result = pipeline()
    created = billable(eggapi_env)
    assert len(created) == 2, created
    assert result.task_id == created[1]["task_id"] and result.status == "completed"
    entry = ledger(ledger_dir).find_task(result.task_id)
    assert entry is not None and entry.attempt == 2 and entry.state is EntryState.PERSISTED


def test_deadline_raises_abandoned_and_marks_ledger(eggapi_env, ledger_dir):
    eggapi_env.set_config(manual=True)

    @flow
    def pipeline():
        created = submit_generation(REQ, label="slow")
        return wait_for_task(created, timeout=0.5)

    with pytest.raises(TaskAbandonedError) as info:
        pipeline()
    task_id = info.value.task_id
    assert task_id == billable(eggapi_env)[0]["task_id"]
    assert "may still" in str(info.value)
    entry = ledger(ledger_dir).find_task(task_id)
    assert entry is not None and entry.state is EntryState.ABANDONED


def test_budget_cap_stops_submits_before_overspending(eggapi_env):
    prompts = [f"poster {i}" for i in range(5)]

    @flow
    def pipeline():
        done, refused = [], 0
        for i, prompt in enumerate(prompts):
            req = GenerateRequest(model="nanobanana-pro", prompt=prompt, resolution="4k")
            try:
                done.append(submit_generation(req, label=f"i{i}", budget="0.10"))
            except BudgetExceededError:
                refused += 1
        return done, refused

    done, refused = pipeline()
    # $0.032 each: three fit under $0.10, the fourth would not.
    assert len(done) == 3 and refused == 2
    spent = sum(Decimal(t["billed"] or "0") for t in billable(eggapi_env))
    assert len(billable(eggapi_env)) == 3
    assert spent <= Decimal("0.10")


def test_bad_input_fails_before_any_http_call(eggapi_env):
    with pytest.raises(InvalidRequestError, match="prompt"):
        submit_generation.fn({"model": "nanobanana", "prompt": ""})
    with pytest.raises(InvalidRequestError, match="image_urls"):
        submit_edit.fn(REQ)
    with pytest.raises(InvalidRequestError, match="budget"):
        submit_generation.fn(REQ, budget=-1)
    assert billable(eggapi_env) == []
    assert eggapi_env.audit()["requests"] == {} or all(
        v == 0 for per_key in eggapi_env.audit()["requests"].values() for v in per_key.values()
    )


def test_async_variants_map_and_submit(eggapi_env, output_store):
    @flow
    async def pipeline():
        reqs = [GenerateRequest(model="nanobanana", prompt=f"tile {i}") for i in range(3)]
        created = [await asubmit_generation(r, label=f"t{i}") for i, r in enumerate(reqs)]
        futures = await_for_task.map(created)
        done = [f.result() for f in futures]
        gen = await agenerate_image(reqs[0], output_store, label="t0")
        return created, done, gen

    import asyncio

    created, done, gen = asyncio.run(pipeline())
    assert {t.status.value for t in done} == {"completed"}
    assert [t.id for t in done] == [t.id for t in created]
    assert gen.task_id == created[0].id  # same run scope + label + request: reconnected
    assert len(billable(eggapi_env)) == 3


def test_sigkill_between_submit_and_completion_then_rerun_reconnects(
    eggapi_env, emulator_api_key, ledger_dir, tmp_path
):
    eggapi_env.set_config(manual=True)
    script = tmp_path / "victim.py"
    script.write_text(
        textwrap.dedent(
            """
            from prefect import flow
            from prefect_eggapi.client.types import GenerateRequest
            from prefect_eggapi.tasks import submit_generation, wait_for_task

            @flow
            def victim():
                t = submit_generation(
                    GenerateRequest(model="nanobanana", prompt="survive a crash"), key="crash-1"
                )
                print("SUBMITTED", t.id, flush=True)
                wait_for_task(t, timeout=600)

            victim()
            """
        )
    )
    from prefect.settings import PREFECT_API_URL

    # The child talks to the session's server, as a worker would: starting a temporary server of
    # its own took over 120 s on a loaded machine ("child never submitted").
    env = dict(
        os.environ,
        EGGAPI_API_KEY=emulator_api_key,
        EGGAPI_BASE_URL=eggapi_env.base_url,
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        task_id = None
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("SUBMITTED"):
                task_id = line.split()[1]
                break
            if not line and proc.poll() is not None:
                break
        assert task_id, "child never submitted"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)

    entry = ledger(ledger_dir).find_task(task_id)
    assert entry is not None and entry.state is EntryState.SUBMITTED
    eggapi_env.complete(task_id)

    @flow
    def rerun():
        t = submit_generation(
            GenerateRequest(model="nanobanana", prompt="survive a crash"), key="crash-1"
        )
        return wait_for_task(t)

    done = rerun()
    assert done.id == task_id and done.status.value == "completed"
    assert [t["task_id"] for t in billable(eggapi_env)] == [task_id]


def test_credentials_block_roundtrip_keeps_key_secret(emulator, emulator_api_key):
    block = EggAPICredentials(api_key=emulator_api_key, base_url=emulator.base_url)
    block.save("eggapi-test", overwrite=True)
    loaded = EggAPICredentials.load("eggapi-test")
    assert loaded.resolved_api_key().get_secret_value() == emulator_api_key
    assert emulator_api_key not in repr(loaded)
    with loaded.get_client() as client:
        assert emulator_api_key not in repr(client)
        assert client.list_tasks().items == []


def test_credentials_without_key_name_the_field(monkeypatch):
    monkeypatch.delenv("EGGAPI_API_KEY", raising=False)
    with pytest.raises(InvalidRequestError, match="api_key"):
        EggAPICredentials().get_client()


def test_submits_waiting_for_their_lane_leave_the_transfer_threads_free(eggapi_env, monkeypatch):
    """Async submits wait for their lane blocked in a thread; more of them than the transfer
    pool has threads must not stop a finished task's transfer (a batch whose next submits queue
    behind one slow POST still stores what completed)."""
    import asyncio
    import threading
    from contextlib import contextmanager

    from prefect_eggapi.safety.lanes import submit_lane
    from prefect_eggapi.tasks.runtime import IO_THREADS, in_thread

    with EggAPICredentials().get_client() as client:
        account = client.account
    lane = submit_lane(account, REQ.model, REQ.task_type)
    waiting = IO_THREADS + 4
    arrived: list[str] = []
    hold = lane.hold

    @contextmanager
    def counted_hold(width: int):
        arrived.append(threading.current_thread().name)
        with hold(width):
            yield

    monkeypatch.setattr(lane, "hold", counted_hold)

    async def main() -> tuple[str, list[str]]:
        with hold(1):  # an earlier POST of the model is in flight
            submits = [
                asyncio.ensure_future(asubmit_generation(REQ, key=f"lane-wait-{i}"))
                for i in range(waiting)
            ]
            deadline = time.monotonic() + 120
            while len(arrived) < waiting and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # until every submit waits in the lane, in a thread
            assert len(arrived) == waiting
            transfer = await asyncio.wait_for(in_thread(lambda: "stored"), timeout=30)
            assert not any(s.done() for s in submits)  # they were waiting all along
        return transfer, [t.id for t in await asyncio.gather(*submits)]

    transfer, ids = asyncio.run(main())
    assert transfer == "stored"
    assert len(set(ids)) == waiting
    assert len(billable(eggapi_env)) == waiting
