"""The chaos scenarios of ``bench/chaos.py``, run by pytest in a child process.

The scenario and its invariant checks are test code shared with CI
(``tests/reliability_common.py``, ``tests/multiworker_common.py``), and pytest is what resolves
a test helper's imports (``-o pythonpath=tests``), so ``bench/chaos.py`` does not put ``tests/``
on its own ``sys.path``: it runs this module as ``python -m pytest bench/chaos_case.py`` with
its parameters in ``EGGAPI_CHAOS_SPEC`` (JSON) and reads the figures from the JSON file named
by ``EGGAPI_CHAOS_OUT``. The name does not match ``test_*.py``, so the suite never collects it
(pytest collects a file named on its command line whatever its name).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

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
    environ,
    read_status,
    run_chaos,
    write_manifest,
)

CHAOS_API_KEY = "egg_sk_chaos_bench_key_7c1e9a"
MW_S3_JITTER_MS = 20.0
HARNESS_STARTUP = 300  # seconds: prefect_test_harness's API server on a loaded 2-core machine
# The environment (PREFECT_HOME, analytics off, log level, no EGGAPI_* of the caller) is set by
# bench/chaos.py before this process starts: Prefect reads its settings when first imported.


def run(items: int, concurrency: int, webhook_items: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="eggapi-chaos-"))

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
        with environ(**env), prefect_test_harness(server_startup_timeout=HARNESS_STARTUP):
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


def run_workers(items: int, n_workers: int, concurrency: int) -> dict[str, Any]:
    """N worker processes on one manifest and one ledger, a SIGKILL, a rerun; see the doc."""
    tmp = Path(tempfile.mkdtemp(prefix="eggapi-chaos-mw-"))

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
        prefect_test_harness(server_startup_timeout=HARNESS_STARTUP),
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


def test_chaos_figures() -> None:
    """Run the scenario ``EGGAPI_CHAOS_SPEC`` asks for; write its figures to EGGAPI_CHAOS_OUT."""
    spec = json.loads(os.environ["EGGAPI_CHAOS_SPEC"])
    if spec["workers"] > 1:
        figures = run_workers(spec["items"], spec["workers"], spec["concurrency"])
    else:
        figures = run(spec["items"], spec["concurrency"], spec["webhook_items"])
    figures["bad_input_cases"], figures["webhook_attacks"] = _catalogue_sizes()
    Path(os.environ["EGGAPI_CHAOS_OUT"]).write_text(json.dumps(figures, indent=2, default=str))
