"""The long chaos run of issue 9, as one command; prints the figures and writes RELIABILITY.md.

    python bench/chaos.py --items 300            # ~5 minutes on 2 cores
    python bench/chaos.py --items 60 --no-write  # a quick look, RELIABILITY.md untouched
    python bench/chaos.py --workers 3 --items 300  # three worker processes, one ledger, a kill

Everything runs on loopback: the EggAPI emulator (subprocess), SeaweedFS (``weed mini``, stopped
and restarted once mid-run on the same ports and data) and a temporary Prefect API
(``prefect_test_harness``). The scenario and the invariant checks are shared with the CI-sized
test ``tests/test_reliability_chaos.py`` (``tests/reliability_common.py``).

Exit status 0 when the invariants hold (nothing lost, nothing paid twice, no paid task left
uncollected, no failure but the terminal moderation ones, no sha256 mismatch, no secret found),
1 otherwise.

``--workers N`` (N > 1): N real worker processes (``tests/mw_worker.py`` via
``tests/multiworker_common.py``) run ONE manifest with one run key, sharing the S3 ledger, under
the same fault mix (``chaos_faults``) with 0..20 ms of latency on every S3 request chunk; one
worker is SIGKILLed once a third of the items have a task (from the emulator's audit) and
restarted; when all have finished, one more rerun. The verdict comes only from the emulator's
audit and the bucket (``multiworker_common.judge``); it rewrites only its own section of
RELIABILITY.md. Exit 1 on any violation (a duplicate, a wrong image, a line unaccounted for, a
billed task neither collected nor explained, costs not adding up to the bill, a paying rerun).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CHAOS_API_KEY = "egg_sk_chaos_bench_key_7c1e9a"


def _setup_env(tmp: Path) -> None:
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect-home"))
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_LOGGING_LEVEL"] = os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING")
    for name in ("EGGAPI_API_KEY", "EGGAPI_BASE_URL", "EGGAPI_S3_PREFIX", "EGGAPI_LEDGER_URI"):
        os.environ.pop(name, None)


def run(items: int, concurrency: int, webhook_items: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="eggapi-chaos-"))
    _setup_env(tmp)

    from prefect.testing.utilities import prefect_test_harness

    from prefect_eggapi.testing.emulator import ApiKeyConfig, EmulatorConfig, EmulatorProcess
    from prefect_eggapi.testing.local_s3 import LocalS3
    from reliability_common import environ, run_chaos

    config = EmulatorConfig(
        api_keys={CHAOS_API_KEY: ApiKeyConfig(balance=Decimal("1000"), name="chaos")},
        pending_seconds=0.05,
        processing_seconds=0.3,
        rate_limit_per_second=200,
    )
    started = time.monotonic()
    with EmulatorProcess(config) as emulator, LocalS3(tmp / "s3-data") as s3:
        bucket = s3.create_bucket("eggapi-chaos")
        env = {
            **s3.env(),
            "EGGAPI_S3_BUCKET": bucket,
            "EGGAPI_API_KEY": CHAOS_API_KEY,
            "EGGAPI_BASE_URL": emulator.base_url,
            "EGGAPI_LEDGER_DIR": str(tmp / "ledger"),
        }
        with environ(**env), prefect_test_harness(server_startup_timeout=90):
            result = run_chaos(
                n=items,
                emulator=emulator,
                api_key=CHAOS_API_KEY,
                s3_server=s3,
                bucket=bucket,
                workdir=tmp,
                ledger_dir=tmp / "ledger",
                prefect_home=Path(os.environ["PREFECT_HOME"]),
                concurrency=concurrency,
                webhook_items=webhook_items,
                log=lambda m: print(f"[chaos] {m}", flush=True),
            )
    figures = result.figures()
    figures["total_seconds"] = round(time.monotonic() - started, 1)
    figures["concurrency"] = concurrency
    figures["machine"] = f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"
    figures["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return figures


MW_CONCURRENCY = 6  # per worker process (2 cores: 3 flow processes + server + emulator + S3)
MW_S3_JITTER_MS = 20.0
MW_SECTION = "workers sharing one ledger"  # RELIABILITY.md heading: "## <N> workers sharing..."


def run_workers(items: int, n_workers: int, concurrency: int) -> dict[str, Any]:
    """N worker processes on one manifest and one ledger, a SIGKILL, a rerun; see the doc."""
    tmp = Path(tempfile.mkdtemp(prefix="eggapi-chaos-mw-"))
    _setup_env(tmp)

    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness
    from pydantic import SecretStr

    from multiworker_common import Batch, JitterProxy, Stack, judge, wait_until, workers
    from prefect_eggapi.credentials import EggAPICredentials
    from prefect_eggapi.testing.emulator import ApiKeyConfig, EmulatorConfig, EmulatorProcess
    from prefect_eggapi.testing.local_s3 import LocalS3
    from reliability_common import (
        CLIENT_TIMEOUT,
        MODERATION_WORD,
        _terminal_remote_failure,
        chaos_faults,
        read_status,
        write_manifest,
    )

    log = lambda m: print(f"[chaos-mw] {m}", flush=True)  # noqa: E731
    config = EmulatorConfig(
        api_keys={CHAOS_API_KEY: ApiKeyConfig(balance=Decimal("1000"), name="chaos")},
        pending_seconds=0.05,
        processing_seconds=0.3,
        rate_limit_per_second=200,
        moderation_word=MODERATION_WORD,
    )
    # the manifest of the single-process chaos run: moderated prompts, 5 broken lines
    moderated = max(2, items // 25)
    rows: list[dict[str, Any] | str] = []
    prompts: dict[str, str] = {}
    for i in range(items):
        word = (
            f" {MODERATION_WORD} scene"
            if i % (items // moderated) == items // moderated - 1
            else ""
        )
        prompts[f"m-{i:04d}"] = f"mw chaos item {i} a paper crane{word}"
        rows.append({"id": f"m-{i:04d}", "prompt": prompts[f"m-{i:04d}"]})
    broken = [
        "{not json",
        json.dumps({"id": "bad-model", "prompt": "x", "model": "dall-e"}),
        json.dumps({"id": "m-0000", "prompt": "duplicate id"}),
        json.dumps({"id": "no-prompt"}),
        json.dumps({"id": "bad-url", "prompt": "x", "image_urls": ["ftp://nope/x.png"]}),
    ]
    for j, line in enumerate(broken):
        rows.insert(1 + j * (items // len(broken)), line)
    manifest = write_manifest(tmp / "chaos-mw.jsonl", rows)
    prefix, run_key, block = "chaos-mw", f"chaos-mw-{items}-{int(time.time())}", "chaos-mw-creds"
    kill_at = max(1, items // 3)

    started = time.monotonic()
    with (
        EmulatorProcess(config) as emulator,
        LocalS3(tmp / "s3-data") as s3_server,
        prefect_test_harness(server_startup_timeout=90),
    ):
        bucket = s3_server.create_bucket("eggapi-chaos-mw")
        EggAPICredentials(
            api_key=SecretStr(CHAOS_API_KEY),
            base_url=emulator.base_url,
            timeout_seconds=CLIENT_TIMEOUT,  # timeout_after_create holds the answer longer
        ).save(block, overwrite=True)
        proxy = JitterProxy(s3_server.endpoint_url, MW_S3_JITTER_MS)  # workers only
        stack = Stack(
            emulator_url=emulator.base_url,
            api_key=CHAOS_API_KEY,
            s3_env={**s3_server.env(), **proxy.env()},
            bucket=bucket,
            prefix=prefix,
            prefect_api_url=PREFECT_API_URL.value(),
        )
        s3 = s3_server.client()
        ledger = f"s3://{bucket}/chaos-mw-ledger"
        emulator.add_faults(chaos_faults(items))
        try:
            with workers(tmp / "procs", stack) as pool:

                def start(name: str) -> Any:
                    return pool.batch(
                        name,
                        manifest,
                        run_key=run_key,
                        ledger_uri=ledger,
                        prefix=prefix,
                        concurrency=concurrency,
                        credentials_block=block,
                        PREFECT_LOGGING_TO_API_BATCH_INTERVAL="2",
                    )

                batch_started = time.monotonic()
                ws = [start(f"w{k}") for k in range(n_workers)]
                victim = ws[1]
                log(f"{n_workers} workers started; SIGKILL of {victim.name} at {kill_at} tasks")

                def enough() -> bool:
                    assert victim.alive(), f"{victim.name} ended before the kill:\n{victim.tail()}"
                    return len(emulator.created_tasks(CHAOS_API_KEY)) >= kill_at

                wait_until(enough, 600, f"{kill_at} created tasks", 0.2)
                victim.kill()
                at_kill = len(emulator.created_tasks(CHAOS_API_KEY))
                killed_after = time.monotonic() - batch_started
                log(f"killed {victim.name} with {at_kill} tasks created; restarting it")
                ws.append(start(f"{victim.name}-restarted"))
                survivors = [w for w in ws if w is not victim]
                pool.wait_all(survivors, 900)
                batch_seconds = time.monotonic() - batch_started
                log(f"all workers done in {batch_seconds:.1f}s")
                fired = dict(Counter(f["kind"] for f in emulator.audit()["faults_fired"]))
                first_rows = read_status(s3, bucket, f"{prefix}/batches/{run_key}/status.jsonl")
                common = dict(
                    emulator=emulator,
                    api_key=CHAOS_API_KEY,
                    s3=s3,
                    bucket=bucket,
                    items=prompts,
                    batches=[Batch(prefix, run_key, list(prompts))],
                    expect_all_persisted=False,
                    remote_failure=_terminal_remote_failure,
                )
                first = judge(  # clears the faults (downloads must see the real bytes)
                    **common,
                    reports=[w.reported_cost() for w in survivors],
                    report_label="finished_runs",
                    run_ids=[w.flow_run_id() for w in survivors],
                    killed_run_ids=[victim.flow_run_id()],
                )
                before = len(emulator.created_tasks(CHAOS_API_KEY))
                rerun = start("rerun")
                pool.wait_all([rerun], 600)
                rerun_new = len(emulator.created_tasks(CHAOS_API_KEY)) - before
                final = judge(**common, reports=None)
                if rerun_new:
                    final.violations.insert(0, f"RERUN PAID: {rerun_new} new billable task(s)")
                if rerun.reported_cost() not in (Decimal(0), None) or not rerun.result().get(
                    "summary"
                ):
                    final.violations.append(f"rerun: {rerun.describe()}")
                rows_after = read_status(s3, bucket, f"{prefix}/batches/{run_key}/status.jsonl")
                runs = [w.describe() for w in pool.all]
                run_ids = {w.name: w.flow_run_id() for w in pool.all}
                logs = {w.name: str(w.dir) for w in pool.all}
        finally:
            proxy.close()

    counts = Counter(r.get("id") for r in rows_after if r.get("id"))
    unaccounted = sum(counts[i] != 1 for i in prompts)
    broken_reported = sum(r["status"] == "broken" and bool(r.get("error")) for r in rows_after)
    unaccounted += len(broken) - broken_reported
    if unaccounted:
        final.violations.append(f"{unaccounted} manifest line(s) not exactly once in status.jsonl")
    fn, ff = first.numbers, final.numbers
    violations = [f"first pass: {x}" for x in first.violations] + [
        f"after rerun: {x}" for x in final.violations
    ]
    return {
        "workers": n_workers,
        "items": items,
        "broken_lines": len(broken),
        "concurrency_per_worker": concurrency,
        "s3_jitter_ms": MW_S3_JITTER_MS,
        "kill_at_tasks": kill_at,
        "tasks_when_killed": at_kill,
        "killed_after_seconds": round(killed_after, 1),
        "batch_seconds": round(batch_seconds, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "faults_fired": fired,
        "first_pass": {
            "persisted": sum(r["status"] == "persisted" for r in first_rows),
            "failed": dict(
                Counter(
                    (r.get("error") or {}).get("type", "?")
                    for r in first_rows
                    if r["status"] == "failed"
                )
            ),
        },
        "persisted": items - ff["items_not_persisted"],
        "failed_by_type": ff.get("final_errors", {}),
        "billable_tasks": ff["billable_tasks"],
        "fresh_attempts_after_remote_failure": ff["fresh_attempts_after_remote_failure"],
        "duplicates": ff["prompts_paid_more_than_once"],
        "wrong_images": ff["items_with_another_jobs_image"],
        "status_lines": len(rows_after),
        "lines_unaccounted": unaccounted,
        "billed_not_collected": ff["billed_not_collected"],
        "billed_not_collected_unexplained": ff["billed_not_collected_unexplained"],
        "uncollected_explained": final.notes,
        "billed_usd": fn["billed_usd"],
        "billed_usd_after_rerun": ff["billed_usd"],
        "reported_by_finished_usd": fn.get("reported_by_finished_runs_usd"),
        "killed_run_share_usd": fn.get("killed_runs_share_usd"),
        "killed_run_paid_items": fn.get("killed_runs_paid_items"),
        "status_objects_by_run": fn.get("items_by_run"),
        "flow_run_ids": run_ids,
        "rerun_new_tasks": rerun_new,
        "runs": runs,
        "worker_dirs": logs,
        "violations": violations,
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _catalogue_sizes() -> tuple[int, int]:
    """Number of bad-input cases and of webhook attacks in the CI suite (imported, not copied)."""
    try:
        import test_reliability_inputs as inputs
        import test_reliability_webhooks as webhooks

        return len(inputs.CASES), len(webhooks.attacks("gen_xxxxxxxxxxxx")) + 1  # + replay
    except Exception:  # pragma: no cover - the tests directory is part of the repo
        return 0, 0


def render(fig: dict[str, Any], ci_wall: str | None) -> str:
    bad_inputs, attacks = _catalogue_sizes()
    faults = "\n".join(f"| `{k}` | {v} |" for k, v in sorted(fig["faults_fired"].items()))
    errors = ", ".join(f"{k} ×{v}" for k, v in sorted(fig["http_errors_served"].items()))
    reasons = ", ".join(f"{k} ×{v}" for k, v in sorted(fig["failed_reasons"].items())) or "none"
    wh = fig["webhook_leg"]
    crashes = "; ".join(c.split(":", 2)[1].strip() for c in fig["flow_crashes"]) or "none"
    lost = fig["lost"]
    dup = fig["duplicates"]
    fresh = fig["fresh_attempts_after_remote_failure"]
    checked = fig["objects_sha256_checked"]
    recovered = fig.get("items_recovered_by_rerun", "n/a")
    first = ", ".join(
        f"{k} ×{v}" for k, v in sorted(fig.get("first_pass_failed_reasons", {}).items())
    )
    problems = "\n".join(f"- `{p[:160]}`" for p in fig["problems"]) or "none"
    return f"""# Reliability and security: the figures

Issue 9: prove with figures that nothing is lost, nothing is paid twice and nobody gets in.
The figures below come from **one run** of `python bench/chaos.py --items {fig["items"]}`
({fig["date"]}, {fig["machine"]}, {fig["total_seconds"]} s in all). Regenerate this file with
the same command; CI runs the smaller version of the same scenario (see the end).

## Chaos run: {fig["items"]} prompts through `batch_generate`

The manifest had {fig["items"]} prompts plus 5 broken lines; the flow ran with concurrency
{fig["concurrency"]} against the emulator and a real S3 server (SeaweedFS). SeaweedFS was
stopped and restarted on the same ports and data once a third of the items were persisted
(unavailable for {fig["s3_restart_seconds"]} s; every object written before was still there
afterwards: {fig["s3_objects_before_restart_kept"]}).

| Invariant | Figure |
|---|---|
| manifest lines accounted for in `status.jsonl` | {fig["manifest_lines"]} of {fig["items"] + 5} |
| items persisted | {fig["persisted"]} |
| items failed, with their reason | {fig["failed_terminal"]} ({reasons}) |
| broken manifest lines reported (not dropped) | {fig["broken_lines_reported"]} of 5 |
| **lost** (no status, or an unreadable / wrong object) | **{lost}** |
| billable tasks created | {fig["billable_tasks"]} |
| legitimate fresh attempts after a terminal remote failure | {fresh} |
| **duplicates** (a prompt paid again without a remote failure) | **{dup}** |
| items given another item's task (wrong adoption) | {fig["items_given_another_items_task"]} |
| billed tasks no item collected | {fig["billed_tasks_not_collected"]} |
| S3 objects whose sha256 was checked against the emulator's bytes | {checked} |
| sha256 mismatches (object vs metadata vs served bytes) | {fig["sha256_mismatches"]} |
| new tasks when the finished batch is run again | {fig["rerun_new_tasks"]} |
| items failed in the first pass but persisted by that rerun | {recovered} |
| failure reasons of the first pass (before that rerun) | {first} |
| billed | ${fig["billed_usd"]} |
| Prefect task retries | {fig["prefect_task_retries"]} |
| flow runs (incl. reruns after a crash, the idempotent rerun, webhook leg) | {fig["flow_runs"]} |
| flow runs that crashed and had to be rerun | {len(fig["flow_crashes"])} ({crashes}) |

Faults injected, by kind (from the emulator's audit, `faults_fired`):

| Fault kind | Fired |
|---|---|
{faults}

HTTP error answers served by the emulator: {errors}.

Webhook leg ({wh["tasks"]} tasks with a `webhook_url` to the verified receiver, under lost,
duplicated, delayed, out-of-order and badly signed deliveries): {wh["persisted_objects"]} of
{wh["tasks"]} persisted (lost webhooks are covered by polling); {wh["deliveries"]} deliveries,
outcomes {json.dumps(wh["delivery_outcomes"])}; receiver {json.dumps(wh["receiver_stats"])};
each task processed at most once: {wh["processed_at_most_once_per_task"]}.

Secret sweep: {fig["secret_sources_searched"]} sources searched ({fig["prefect_log_lines"]}
Prefect log lines via the API, {fig["prefect_artifacts"]} artifacts, flow and task runs with
their states, every S3 key, object metadata and JSON body, the ledger, Prefect's local result
storage, exception texts, the summary) for the API key and both webhook secrets:
**{len(fig["secret_hits"])} hits**.

Problems the checker listed (first 20):

{problems}

## Bugs this suite found, all fixed (tests guard them)

1. **Concurrent ambiguous submits could not be attributed** (`submission.Submitter`). When
   several submits of one model lost their 202 at about the same time (a burst of 502s, dropped
   or late answers), the task list showed several unclaimed candidates and no prompt, so each of
   those items failed with `ReconciliationError` while its task was billed and never collected
   (44 items and 28 uncollected tasks in a 300-item run before the fix). Now each *lane*
   (account, model, type) lets one POST at a time be in flight with an unknown outcome, from the
   claim until the ledger records the answer, so a reconciliation window holds at most one task
   of this process (`submits_in_flight` on the credentials block widens the lane, trading this
   for submit throughput). In this run: {fig["failed_reasons"].get("ReconciliationError", 0)}
   such failures, {fig["billed_tasks_not_collected"]} billed tasks no item collected. Tests:
   `test_concurrent_ambiguous_submits_each_get_their_own_task`,
   `test_wider_lanes_fail_overlapping_lost_answers_loudly_never_wrongly`,
   `test_chaos_every_item_gets_its_own_task_and_no_paid_task_is_orphaned`.
2. **An item gave up on a retryable S3 error after ~6 s** (`tasks._persist`): an S3 restart
   takes 3-13 s here. `_persist` now rides out transient S3 errors with a backoff of about a
   minute. Test: `test_an_s3_outage_during_the_output_upload_does_not_fail_the_item`.
3. **Reconciliation adopted a concurrent sibling's task**: an ambiguous submit adopted the only
   candidate in its window, which belonged to another item whose 202 had not reached the ledger
   yet (2 items given another item's task and 1 task shared by two items in a 300-item run before
   the fix). Test: `test_an_ambiguous_submit_never_adopts_a_sibling_task_in_flight`.
4. **A short S3 outage crashed the batch flow run** (`flows/batch.py`, `_Batch.record`): the
   per-item status object was written without retry and the botocore error escaped
   `asyncio.gather`. Test:
   `test_a_short_s3_outage_while_recording_an_item_does_not_crash_the_batch`.

## What CI runs (`pytest tests/test_reliability_*.py`)

- `test_reliability_chaos.py`: the same scenario with 48 items, every fault kind, the S3
  restart, the webhook leg and the secret sweep (every item gets its own task; no paid task is
  left uncollected); plus deterministic tests of the bugs above.
- `test_reliability_crash.py`: SIGKILL of the flow process after submit (202 held back), mid-poll,
  mid-download, mid-upload and while writing `status.jsonl`, each point reached deterministically
  and detected from outside (emulator audit, ledger state, a holding proxy in front of S3), then a
  rerun: every item persisted once, billable tasks = items, sha256 equal to the served bytes.
- `test_reliability_inputs.py`: {bad_inputs} invalid flow parameters and requests, each refused
  with an error naming the field and **zero** HTTP calls in the emulator's audit; broken JSONL and
  CSV manifest lines reported line by line and skipped while the valid lines run.
- `test_reliability_webhooks.py`: {attacks} attacks (bad signature, wrong secret, tampered body,
  stale / future timestamps, replay, oversized declared and chunked bodies, unsigned, wrong
  content types, malformed JSON and headers) against a live receiver while a real flow waits for
  the task: all 4xx, none re-read, none signalled, the flow keeps waiting; the genuine webhook
  then wakes it at once.

CI wall time of the reliability suite on this machine: {ci_wall or "see the report"}.

## How to rerun

```
python bench/chaos.py --items 300        # this file's figures (rewrites RELIABILITY.md)
python bench/chaos.py --workers 3 --items 300  # the three-worker section (only that one)
pytest tests/test_reliability_*.py -q    # the CI part
```
"""


_NUMBERS = {2: "Two", 3: "Three", 4: "Four", 5: "Five", 6: "Six"}


def render_workers(fig: dict[str, Any]) -> str:
    """The RELIABILITY.md section of one ``--workers N`` run."""
    n = fig["workers"]
    title = (
        f"{_NUMBERS.get(n, str(n))} workers sharing one ledger ({fig['items']} items, one SIGKILL)"
    )
    faults = ", ".join(f"`{k}` ×{v}" for k, v in sorted(fig["faults_fired"].items()))
    failed = ", ".join(f"{k} ×{v}" for k, v in sorted(fig["failed_by_type"].items())) or "none"
    first_failed = (
        ", ".join(f"{k} ×{v}" for k, v in sorted(fig["first_pass"]["failed"].items())) or "none"
    )
    explained = "\n".join(f"- {x}" for x in fig["uncollected_explained"]) or "- none"
    runs = "\n".join(f"- {r}" for r in fig["runs"])
    bad = "\n".join(f"- `{v[:200]}`" for v in fig["violations"][:20]) or "none"
    lines = fig["items"] + fig["broken_lines"]
    names = {v: k for k, v in (fig.get("flow_run_ids") or {}).items() if v}
    by_run = ", ".join(
        f"{names.get(r, r)}{' (killed)' if names.get(r) == 'w1' else ''} {c}"
        for r, c in (fig["status_objects_by_run"] or {}).items()
    )
    reported = Decimal(fig["reported_by_finished_usd"] or "0")
    share = Decimal(fig["killed_run_share_usd"] or "0")
    cost_ok = not any(("COST" in v or "ATTRIBUTION" in v) for v in fig["violations"])
    rows = [
        ("items persisted (after the rerun)", f"{fig['persisted']} of {fig['items']}", "-"),
        ("items failed, by error type", failed, "-"),
        (
            "first pass (before the rerun): persisted; failed",
            f"{fig['first_pass']['persisted']}; {first_failed}",
            "-",
        ),
        (
            "manifest lines **not** accounted for exactly once in `status.jsonl`",
            f"**{fig['lines_unaccounted']}** ({fig['status_lines']} rows for {lines} lines)",
            "0",
        ),
        (
            f"billable tasks created, for {fig['items']} items",
            fig["billable_tasks"],
            "items + fresh attempts",
        ),
        (
            "fresh attempts after an upstream failure / empty output ($0)",
            fig["fresh_attempts_after_remote_failure"],
            "-",
        ),
        (
            "**duplicates** (a prompt with >1 billable task not explained so)",
            f"**{fig['duplicates']}**",
            "0",
        ),
        (
            "**wrong images** (stored sha256 not an output of the item's own task)",
            f"**{fig['wrong_images']}**",
            "0",
        ),
        (
            "billed tasks no item collected (unexplained)",
            f"{fig['billed_not_collected']} ({fig['billed_not_collected_unexplained']})",
            "0 unexplained",
        ),
        ("billed", f"${fig['billed_usd']}", "-"),
        ("reported by the finished runs (`total_cost`)", f"${reported}", "-"),
        (
            "+ the killed run's share (its status objects)",
            f"${share} ({fig['killed_run_paid_items']} paid items)",
            "-",
        ),
        ("= reports + killed share", f"${reported + share}", "= billed"),
        ("new tasks when the finished batch is run again", fig["rerun_new_tasks"], "0"),
    ]
    table = "| Invariant | Figure | Must be |\n|---|---|---|\n" + "\n".join(
        f"| {k} | {v} | {m} |" for k, v, m in rows
    )
    cost = (
        "Each finished run's `total_cost` equalled the cost of the status objects naming its "
        "flow run id (`run_id`), and the reports plus the killed run's share (the cost of the "
        "status objects it wrote; a killed run reports nothing) equal the bill."
        if cost_ok
        else "**The costs did not add up** (see the violations below)."
    )
    return f"""## {title}

`python bench/chaos.py --workers {n} --items {fig["items"]}`
({fig["date"]}, {fig["machine"]}, {fig["total_seconds"]} s in all; the {n} workers took
{fig["batch_seconds"]} s from the first start to the last end).

{n} separate worker processes (`tests/mw_worker.py`, each with its own working directory and
`PREFECT_HOME`, one shared Prefect API) ran ONE manifest ({fig["items"]} prompts plus
{fig["broken_lines"]} broken lines) with one run key, concurrency {fig["concurrency_per_worker"]}
each, sharing one S3 ledger (`EGGAPI_LEDGER_URI`), under the fault mix of the single-process run
above (`chaos_faults`) and 0..{fig["s3_jitter_ms"]:g} ms of latency on every S3 request chunk.
Worker `w1` was SIGKILLed (its whole process group) once the emulator's audit showed
{fig["kill_at_tasks"]} tasks ({fig["tasks_when_killed"]} when the kill landed,
{fig["killed_after_seconds"]} s in) and restarted fresh; when every worker had finished, the batch
was run once more. Every figure is judged only from the emulator's audit (tasks created, their
prompts, amounts billed, the bytes served) and the objects in S3; the ledger is never read.

{table}

{cost} Status objects by the run that wrote them: {by_run}.

Billed tasks no item collected, each explained:

{explained}

Faults fired: {faults}.

Runs:

{runs}

Violations: {bad}

"""


def _splice_workers_section(text: str, section: str | None) -> str:
    """``text`` with its ``## ... workers sharing one ledger ...`` section replaced by ``section``
    (kept as is when ``section`` is None), placed before the bugs section."""
    pattern = re.compile(rf"^## [^\n]*{MW_SECTION}.*?(?=^## |\Z)", re.S | re.M)
    found = pattern.search(text)
    if section is None:
        return text
    text = pattern.sub("", text) if found else text
    anchor = "## Bugs this suite found"
    at = text.find(anchor)
    block = section.rstrip() + "\n\n"
    return text[:at] + block + text[at:] if at >= 0 else text.rstrip() + "\n\n" + block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help=f"Default 16; per worker with --workers > 1: {MW_CONCURRENCY}.",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Worker processes sharing one ledger (1: the single-process run, unchanged).",
    )
    parser.add_argument("--webhook-items", type=int, default=20)
    parser.add_argument("--no-write", action="store_true", help="Do not rewrite RELIABILITY.md.")
    parser.add_argument("--ci-wall", default=None, help="Measured CI wall time, for the report.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="FIGURES_JSON",
        help="Do not run: rewrite RELIABILITY.md from figures saved earlier with --json.",
    )
    args = parser.parse_args(argv)
    if args.workers > 1:
        if args.render:
            figures = json.loads(args.render.read_text())
        else:
            figures = run_workers(args.items, args.workers, args.concurrency or MW_CONCURRENCY)
        print(json.dumps(figures, indent=2, default=str))
        if args.json and not args.render:
            args.json.write_text(json.dumps(figures, indent=2, default=str))
        if not args.no_write:
            path = ROOT / "RELIABILITY.md"
            path.write_text(_splice_workers_section(path.read_text(), render_workers(figures)))
            print(f"wrote its section of {path}")
        return 1 if figures["violations"] else 0
    if args.concurrency is None:
        args.concurrency = 16
    if args.render:
        figures = json.loads(args.render.read_text())
    else:
        figures = run(args.items, args.concurrency, args.webhook_items)
    print(json.dumps(figures, indent=2, default=str))
    if args.json and not args.render:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    if not args.no_write:
        path = ROOT / "RELIABILITY.md"
        old = path.read_text() if path.exists() else ""
        match = re.search(
            rf"^## [^\n]*{MW_SECTION}.*?(?=^## |\Z)", old, re.S | re.M
        )  # a --workers section survives the rewrite
        new = render(figures, args.ci_wall)
        path.write_text(_splice_workers_section(new, match.group(0) if match else None))
        print(f"wrote {path}")
    ok = (
        figures["lost"] == 0
        and figures["duplicates"] == 0
        and figures["items_given_another_items_task"] == 0
        and figures["tasks_shared_by_two_items"] == 0
        and figures["sha256_mismatches"] == 0
        and figures["billed_tasks_not_collected"] == 0
        and not figures["secret_hits"]
        and set(figures["failed_reasons"]) <= {"ContentModerationError"}
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
