"""The long chaos run of issue 9, as one command; prints the figures and writes RELIABILITY.md.

    python bench/chaos.py --items 300            # ~5 minutes on 2 cores
    python bench/chaos.py --items 60 --no-write  # a quick look, RELIABILITY.md untouched

Everything runs on loopback: the EggAPI emulator (subprocess), SeaweedFS (``weed mini``, stopped
and restarted once mid-run on the same ports and data) and a temporary Prefect API
(``prefect_test_harness``). The scenario and the invariant checks are shared with the CI-sized
test ``tests/test_reliability_chaos.py`` (``tests/reliability_common.py``).

Exit status 0 when the invariants hold (nothing lost, nothing paid twice, no paid task left
uncollected, no failure but the terminal moderation ones, no sha256 mismatch, no secret found),
1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
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

    from prefect_eggapi.emulator import ApiKeyConfig, EmulatorConfig, EmulatorProcess
    from prefect_eggapi.local_s3 import LocalS3
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
pytest tests/test_reliability_*.py -q    # the CI part
```
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
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
    if args.render:
        figures = json.loads(args.render.read_text())
    else:
        figures = run(args.items, args.concurrency, args.webhook_items)
    print(json.dumps(figures, indent=2, default=str))
    if args.json and not args.render:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    if not args.no_write:
        (ROOT / "RELIABILITY.md").write_text(render(figures, args.ci_wall))
        print(f"wrote {ROOT / 'RELIABILITY.md'}")
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
