"""The long chaos run of issue 9, as one command; prints the figures and writes RELIABILITY.md.

    python bench/chaos.py --items 300            # ~5 minutes on 2 cores
    python bench/chaos.py --items 60 --no-write  # a quick look, RELIABILITY.md untouched
    python bench/chaos.py --workers 3 --items 300  # three worker processes, one ledger, a kill

Everything runs on loopback: the EggAPI emulator (subprocess), SeaweedFS (``weed mini``, stopped
and restarted once mid-run on the same ports and data) and a temporary Prefect API
(``prefect_test_harness``). The scenario and the invariant checks are shared with the CI-sized
test ``tests/test_reliability_chaos.py`` (``tests/reliability_common.py``); they run in a child
``python -m pytest bench/chaos_case.py`` (pytest resolves the test helpers' imports), which
writes the figures as JSON; this process imports no test module and renders them.

Exit status 0 when the invariants hold (nothing lost, nothing paid twice, no paid task left
uncollected, no failure but the terminal moderation ones, no sha256 mismatch, no secret found),
1 otherwise.

``--workers N`` (N > 1): N real worker processes (``tests/mw_worker.py`` via
``tests/multiworker_common.py``, from the same child) run ONE manifest with one run key, sharing
the S3 ledger, under the same fault mix (``chaos_faults``) with 0..20 ms of latency on every S3
request chunk; one worker is SIGKILLed once a third of the items have a task (from the emulator's
audit) and restarted; when all have finished, one more rerun. The verdict comes only from the
emulator's audit and the bucket (``multiworker_common.judge``); it rewrites only its own section of
RELIABILITY.md. Exit 1 on any violation (a duplicate, a wrong image, a line unaccounted for, a
billed task neither collected nor explained, costs not adding up to the bill, a paying rerun).

Above 400 lines because most of it is the two RELIABILITY.md templates; the scenarios are in
``chaos_case.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CASE = Path(__file__).resolve().with_name("chaos_case.py")
# Not passed on to the scenario: it must use the local emulator and bucket it starts.
CALLER_ONLY = ("EGGAPI_API_KEY", "EGGAPI_BASE_URL", "EGGAPI_S3_PREFIX", "EGGAPI_LEDGER_URI")


def run_case(items: int, workers: int, concurrency: int, webhook_items: int) -> dict[str, Any]:
    """Run the scenario in ``python -m pytest bench/chaos_case.py``; its figures.

    Parameters go in EGGAPI_CHAOS_SPEC, the figures come back in the JSON file named by
    EGGAPI_CHAOS_OUT; the child's output (the ``[chaos]`` progress lines) goes to this
    process's. Raises RuntimeError when the child wrote no figures."""
    tmp = Path(tempfile.mkdtemp(prefix="eggapi-chaos-run-"))
    out = tmp / "figures.json"
    spec = {
        "items": items,
        "workers": workers,
        "concurrency": concurrency,
        "webhook_items": webhook_items,
    }
    env = {k: v for k, v in os.environ.items() if k not in CALLER_ONLY}
    env.update(
        PREFECT_HOME=env.get("PREFECT_HOME") or str(tmp / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL=env.get("PREFECT_LOGGING_LEVEL", "WARNING"),
        EGGAPI_CHAOS_SPEC=json.dumps(spec),
        EGGAPI_CHAOS_OUT=str(out),
    )
    argv = [sys.executable, "-m", "pytest", str(CASE), "-q", "-s", "-p", "no:cacheprovider"]
    # the helpers' directory, and no per-test time limit (pyproject's 300 s is for CI tests)
    argv += ["--rootdir", str(ROOT), "-o", f"pythonpath={ROOT / 'tests'}", "-o", "timeout=0"]
    done = subprocess.run(argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    if not out.exists():
        raise RuntimeError(f"the chaos scenario wrote no figures (pytest exit {done.returncode})")
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures


MW_CONCURRENCY = 6  # per worker process (2 cores: 3 flow processes + server + emulator + S3)
MW_SECTION = "workers sharing one ledger"  # RELIABILITY.md heading: "## <N> workers sharing..."


def render(fig: dict[str, Any], ci_wall: str | None) -> str:
    bad_inputs, attacks = fig.get("bad_input_cases", 0), fig.get("webhook_attacks", 0)
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
            figures = run_case(args.items, args.workers, args.concurrency or MW_CONCURRENCY, 0)
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
        figures = run_case(args.items, 1, args.concurrency, args.webhook_items)
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
