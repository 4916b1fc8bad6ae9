"""A lost answer that could not be attributed when it happened is attributed later by recovery.

Two submitter processes (``tests/wh_submitter.py``, no webhooks) share an S3 ledger with two
POSTs allowed in flight per lane. A's POST creates its task and is answered 502; B's POST creates
its task while A's is unresolved and its 202 arrives late (held 12 s). When A reconciles, two
unknown same-model tasks sit in its window and B is still in flight, so A cannot tell which is
its own: after its sibling wait it fails loudly (``ReconciliationError``) and pays nothing more.
Once B has recorded its task, only A's task is unknown in A's window: the recovery flow
attributes it (never posting), stores its outputs, and a rerun of A reconnects to it.

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


def _submitter(
    env: dict[str, str], tmp: Path, name: str, ledger: str, prompt: str
) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp / f"{name}.json"
    args = [
        sys.executable,
        str(SUBMITTER),
        *("--ledger", ledger, "--prompt", prompt, "--key", f"item/{prompt}"),
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
    emulator.add_fault("error_after_create", status=502, delay=1, times=1)
    emulator.add_fault("timeout_after_create", delay=12, times=1)
    a, a_out = _submitter(env, tmp_path, "a", ledger, a_prompt)

    def a_created() -> bool:
        assert a.poll() is None, (tmp_path / "a.log").read_text(errors="replace")
        return any(t["prompt"] == a_prompt for t in emulator.created_tasks())

    wait_until(a_created, 60, "A's task to be created (its answer held, then lost)")
    b, b_out = _submitter(env, tmp_path, "b", ledger, b_prompt)
    first_a, first_b = _result(a, a_out), _result(b, b_out)
    assert first_a.get("error") == "ReconciliationError", first_a
    assert "task_id" in first_b, first_b

    by_prompt = {t["prompt"]: t["task_id"] for t in emulator.created_tasks()}
    assert sorted(by_prompt) == sorted([a_prompt, b_prompt])  # one billable task each
    assert first_b["task_id"] == by_prompt[b_prompt]
    ours = by_prompt[a_prompt]

    prefix = f"late-{tmp_path.name}/out"
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

    # A's item now has its task: a rerun reconnects to it and pays nothing.
    again, again_out = _submitter(env, tmp_path, "a-again", ledger, a_prompt)
    rerun = _result(again, again_out)
    assert rerun.get("task_id") == ours and rerun["reconnected"] is True, rerun
    assert len(emulator.created_tasks()) == 2
