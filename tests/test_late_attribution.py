"""A lost answer that could not be attributed when it happened is attributed later by recovery.

Two submitter processes (``tests/wh_submitter.py``, no webhooks) share an S3 ledger with two
POSTs allowed in flight per lane. A's POST creates its task and is answered 502; B's POST creates
its task while A's is unresolved and its 202 arrives late (held 12 s). When A reconciles, two
unknown same-model tasks sit in its window and B is still in flight, so A cannot tell which is
its own: after its sibling wait it fails loudly (``ReconciliationError``) and pays nothing more.
Once B has recorded its task, only A's task is unknown in A's window: the recovery flow
attributes it (never posting), stores its outputs, turns A's failed batch item (A is keyed as a
batch keys its items, and its failure was written with the batch's own status functions) into a
persisted one in its status object and in ``status.jsonl``, and a rerun of A reconnects to it.

Judged from the emulator's audit (billable tasks and their prompts, the bytes it serves) and the
objects in S3.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from prefect_procs import REPO, clean_env
from reliability_common import environ, served_sha256, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]

SUBMITTER = REPO / "tests" / "wh_submitter.py"


RUN_KEY = "batch-late-0001"


def _submitter(
    env: dict[str, str], tmp: Path, name: str, ledger: str, prompt: str
) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp / f"{name}.json"
    item = prompt.split()[1]  # "red" / "blue": the item id, keyed as the batch keys items
    args = [
        sys.executable,
        str(SUBMITTER),
        *("--ledger", ledger, "--prompt", prompt),
        *("--key", f"{RUN_KEY}/{item}", "--label", item),
        *("--lane-width", "2", "--sibling-wait", "3", "--out", str(out)),
    ]
    log = (tmp / f"{name}.log").open("wb")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, out


def _result(proc: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    proc.wait(120)
    assert out.exists(), out.with_suffix(".log").read_text(errors="replace")[-4000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_recovery_attributes_a_lost_answer_once_its_neighbours_are_known(
    emulator: Any, emulator_api_key: str, local_s3: Any, s3_bucket: str, tmp_path: Path
) -> None:
    from prefect_eggapi.flows import recover_outputs

    emulator.set_config(pending_seconds=0.05, processing_seconds=0.2)
    ledger = f"s3://{s3_bucket}/late-{tmp_path.name}/ledger"
    env = {
        **clean_env(),
        **local_s3.env(),
        "EGGAPI_API_KEY": emulator_api_key,
        "EGGAPI_BASE_URL": emulator.base_url,
        "PYTHONPATH": str(REPO / "src"),
    }
    a_prompt, b_prompt = "a red kite over dunes", "a blue kite over dunes"
    # A's answer is held A_HOLD s, then lost; B must create its task inside that hold (B is a
    # fresh process: imports, an S3 ledger claim, the POST). With a 1 s hold a loaded machine
    # started B too late and A rightly adopted its lone candidate, so the hold is long and the
    # test checks, rather than assumes, that B's task came first. B's answer is held past A's
    # reconcile and sibling wait (A_HOLD + 3 s).
    a_hold, b_hold = 10, 25
    emulator.add_fault("error_after_create", status=502, delay=a_hold, times=1)
    emulator.add_fault("timeout_after_create", delay=b_hold, times=1)
    a, a_out = _submitter(env, tmp_path, "a", ledger, a_prompt)

    def created(proc: subprocess.Popen[bytes], name: str, prompt: str) -> bool:
        assert proc.poll() is None, (tmp_path / f"{name}.log").read_text(errors="replace")
        return any(t["prompt"] == prompt for t in emulator.created_tasks())

    wait_until(lambda: created(a, "a", a_prompt), 60, "A's task (its answer held, then lost)")
    b, b_out = _submitter(env, tmp_path, "b", ledger, b_prompt)
    wait_until(lambda: created(b, "b", b_prompt), a_hold, "B's task inside A's held answer")
    assert a.poll() is None, "A ended before B's task existed: the scenario did not happen"
    first_a, first_b = _result(a, a_out), _result(b, b_out)
    assert first_a.get("error") == "ReconciliationError", first_a
    assert "task_id" in first_b, first_b

    by_prompt = {t["prompt"]: t["task_id"] for t in emulator.created_tasks()}
    assert sorted(by_prompt) == sorted([a_prompt, b_prompt])  # one billable task each
    assert first_b["task_id"] == by_prompt[b_prompt]
    ours = by_prompt[a_prompt]

    prefix = f"late-{tmp_path.name}/out"
    # A's item failed in its batch run: written with the batch's own functions.
    from prefect_eggapi.flows.batch import (
        ItemResult,
        _status_lines,
        batch_base,
        record_item_status,
    )
    from prefect_eggapi.storage import OutputStore

    store = OutputStore(local_s3.client(), s3_bucket, prefix)
    base = batch_base(store, RUN_KEY)
    failed = ItemResult(
        id="red", line=1, status="failed", error={"type": "ReconciliationError"}, run_id="r1"
    )
    persisted_b = ItemResult(
        id="blue", line=2, status="persisted", task_id=first_b["task_id"], run_id="r1"
    )
    for result in (failed, persisted_b):
        record_item_status(store, base, result)
    s3 = local_s3.client()
    s3.put_object(
        Bucket=s3_bucket, Key=f"{base}/status.jsonl", Body=_status_lines([failed, persisted_b], [])
    )
    with environ(
        **local_s3.env(),
        EGGAPI_API_KEY=emulator_api_key,
        EGGAPI_BASE_URL=emulator.base_url,
        EGGAPI_LEDGER_URI=ledger,
        EGGAPI_S3_BUCKET=s3_bucket,
        EGGAPI_S3_PREFIX=prefix,
    ):
        summary = asyncio.run(recover_outputs(scan_api_pages=0))
    assert summary.attributed == [ours], summary
    assert ours in summary.persisted
    stored = local_s3.client().get_object(Bucket=s3_bucket, Key=f"{prefix}/{ours}/0.png")
    assert hashlib.sha256(stored["Body"].read()).hexdigest() == served_sha256(
        emulator.base_url, ours, 0
    )

    # The item's one final status is persisted, with A's task and what recovery stored.
    assert summary.items_settled == ["red"], summary

    def read(key: str) -> bytes:
        body: bytes = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        return body

    listing = s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"{base}/items/")["Contents"]
    keys = {o["Key"] for o in listing}
    assert keys == {f"{base}/items/red.persisted.json", f"{base}/items/blue.persisted.json"}
    red = json.loads(read(f"{base}/items/red.persisted.json"))
    assert red["task_id"] == ours and red["s3_uris"] == [f"s3://{s3_bucket}/{prefix}/{ours}/0.png"]
    assert red["line"] == 1 and red["run_id"].startswith("recovery:")
    rows = [json.loads(x) for x in read(f"{base}/status.jsonl").splitlines()]
    assert [(r["id"], r["status"], r["task_id"]) for r in rows] == [
        ("red", "persisted", ours),
        ("blue", "persisted", first_b["task_id"]),
    ]

    # A's item now has its task: a rerun reconnects to it and pays nothing.
    again, again_out = _submitter(env, tmp_path, "a-again", ledger, a_prompt)
    rerun = _result(again, again_out)
    assert rerun.get("task_id") == ours and rerun["reconnected"] is True, rerun
    assert len(emulator.created_tasks()) == 2
