"""A sharded batch on a real Prefect-on-PostgreSQL deployment, with a worker killed mid-shard.

Everything is a real process, as on many machines: a PostgreSQL 15 cluster of its own
(:mod:`pg_cluster`), ``prefect server start`` on it, two ``prefect worker start`` processes on
one process pool, the local stack (emulator + SeaweedFS), and the two deployments of
``deployments/prefect.yaml`` that shard a batch (``eggapi-sharded-batch/sharded-batch`` and the
``eggapi-batch/batch-shard`` it starts). The parent run is started with
``prefect deployment run``; a worker takes it, and it fans the manifest out as 4 shard runs
that either worker takes.

Faults: three POSTs answered 502 before anything is created, three answers lost after the task
was created (two 502, one connection cut). The kill is triggered by an observation, never a
sleep: once a shard run that lives under the worker *not* running the parent has stored some
of its lines (status objects in S3) and has tasks in the emulator's audit for lines it has not
stored yet, that worker and every process under it get SIGKILL (the machine died). Its shard
runs stay Running on the server; the parent sees no heartbeat for ``stale_after`` seconds,
marks them Crashed and runs them again on the surviving worker.

The verdict comes from outside the library (:func:`multiworker_common.judge`): the emulator's
audit (billable tasks with their prompts, and the bytes each task serves) and the objects in S3
(per-item status objects, the one status.jsonl, the stored images, the parent's
sharded-summary.json). Then an unsharded run of the same manifest must pay nothing.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from multiworker_common import (
    Batch,
    _get,
    _list,
    fault_rules,
    judge,
    make_items,
    spread,
    wait_tasks_terminal,
)
from pg_cluster import PgCluster, missing_reason, pg_cluster
from prefect_eggapi.testing.stack import LocalStack
from prefect_procs import (
    BIN,
    POOL,
    REPO,
    api_read,
    cli,
    descendants,
    kill_tree,
    prefect_server,
    start_worker,
    stop,
)
from procs import gone
from reliability_common import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason())),
]

PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
PARENT = "eggapi-sharded-batch/sharded-batch"
SHARD = "eggapi-batch/batch-shard"
N_ITEMS = 40
SHARDS = 4
STALE_AFTER = 40  # heartbeats every 30 s (the shard deployment's env): 10 s of slack
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@pytest.fixture(scope="module")
def postgres() -> Iterator[PgCluster]:
    with pg_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def pg_server(
    postgres: PgCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    server_env = {"PREFECT_API_DATABASE_CONNECTION_URL": postgres.asyncpg_url}
    with prefect_server(tmp_path_factory.mktemp("prefect-home"), server_env, 150) as env:
        yield env


def _sharding_copy(path: Path) -> None:
    """deployments/prefect.yaml with only the two sharding deployments (the others carry
    schedules a worker could pick up during the test)."""
    config = yaml.safe_load(PREFECT_FILE.read_text())
    names = {"sharded-batch", "batch-shard"}
    config["deployments"] = [d for d in config["deployments"] if d["name"] in names]
    assert len(config["deployments"]) == 2, "prefect.yaml lost a sharding deployment"
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _run(api: str, flow_run_id: str) -> dict[str, Any]:
    run = api_read("GET", f"{api}/flow_runs/{flow_run_id}")
    assert isinstance(run, dict), run
    return run


def _shard_runs(api: str, parent_id: str) -> list[dict[str, Any]]:
    """The parent's shard runs (they are its subflows: their parent task run is in its run)."""
    body = {"flow_runs": {"tags": {"all_": ["eggapi-shard"]}}, "sort": "START_TIME_ASC"}
    runs = api_read("POST", f"{api}/flow_runs/filter", body)
    assert isinstance(runs, list), runs
    return runs


def _host_pid(run: dict[str, Any]) -> int | None:
    infra = run.get("infrastructure_pid") or ""
    tail = infra.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _lines_of(run: dict[str, Any]) -> tuple[int, int | None]:
    start, _, stop = str(run["parameters"]["lines"]).partition(":")
    return int(start), int(stop) if stop else None


@pytest.mark.timeout(420)
def test_sharded_batch_on_postgres_survives_a_killed_worker(
    pg_server: dict[str, str], tmp_path: Path
) -> None:
    env = pg_server
    api = env["PREFECT_API_URL"]
    timings: dict[str, float] = {}
    started = time.monotonic()

    # The manifest: 40 prompts and one broken line (it must be reported, not dropped).
    items = make_items("sh", N_ITEMS)
    manifest = tmp_path / "manifest.jsonl"
    lines = [json.dumps({"id": k, "prompt": p}) for k, p in items.items()]
    lines.insert(20, "{not json")  # line 21
    manifest.write_text("\n".join(lines) + "\n")
    line_of = {json.loads(x)["id"]: n for n, x in enumerate(lines, 1) if x.startswith('{"id"')}

    prefect_file = tmp_path / "prefect.yaml"
    _sharding_copy(prefect_file)
    cli(env, "work-pool", "create", POOL, "--type", "process")
    out = cli(env, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file))
    assert PARENT in out and SHARD in out, out
    timings["deploy"] = time.monotonic() - started

    stack = LocalStack(
        pending_seconds=0.1,
        processing_seconds=1.5,
        rate_limit_per_second=1000,
        bucket="eggapi-sharded",
        emulator_log_path=tmp_path / "emulator.log",
    )
    workers: list[Any] = []
    with stack:
        emulator = stack.emulator
        assert emulator is not None
        pre = fault_rules(
            {t: {"kind": "error_before_create", "status": 502} for t in spread(3, 40, 4)}
        )
        post_at = spread(3, 40, 7)
        post = fault_rules(
            {
                post_at[0]: {"kind": "error_after_create", "status": 502},
                post_at[1]: {"kind": "drop_after_create"},
                post_at[2]: {"kind": "error_after_create", "status": 502},
            }
        )
        emulator.add_faults(pre + post)
        worker_env = {
            **env,
            **stack.env(),
            "PATH": f"{BIN}:{env.get('PATH', '')}",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
        try:
            for k in range(2):
                # At most 3 runs each: the parent + 4 shards cannot all land on one worker.
                workers.append(
                    start_worker(worker_env, tmp_path / f"worker-{k}.log", REPO, "--limit", "3")
                )
            for k in range(2):
                log = tmp_path / f"worker-{k}.log"
                wait_until(
                    lambda log=log: "started!" in log.read_text(errors="replace"),
                    90,
                    f"worker {k} to start",
                )
            timings["workers up"] = time.monotonic() - started

            params = {
                "manifest": str(manifest),
                "shards": SHARDS,
                "concurrency": 3,
                "stale_after": STALE_AFTER,
                "poll_interval": 1.0,
                "wait_timeout": 120,
                "fail_on_item_error": False,
            }
            out = cli(env, "deployment", "run", PARENT, "--params", json.dumps(params))
            match = re.search(r"UUID: ([0-9a-f-]{36})", out)
            assert match, out
            parent_id = match.group(1)

            def worker_of(run: dict[str, Any]) -> int | None:
                pid = _host_pid(run)
                for k, w in enumerate(workers):
                    if pid is not None and (pid == w.pid or pid in descendants(w.pid)):
                        return k
                return None

            # The kill: a shard run hosted by the worker that does not run the parent, with
            # tasks already created for its lines and lines still unpersisted.
            def victim() -> tuple[int, list[dict[str, Any]]] | None:
                parent = _run(api, parent_id)
                assert parent["state"]["type"] not in TERMINAL, parent["state"]
                host = worker_of(parent)
                if host is None:
                    return None
                other = 1 - host
                created = {t["prompt"] for t in emulator.created_tasks()}
                persisted = {
                    k.rsplit("/", 1)[1].split(".")[0]
                    for k in _list(stack.output_store().client, stack.bucket, "eggapi/batches/")
                    if k.endswith(".persisted.json")
                }
                mine = []
                for run in _shard_runs(api, parent_id):
                    if run["state"]["type"] != "RUNNING" or worker_of(run) != other:
                        continue
                    bounds = _lines_of(run)
                    ids = [
                        i
                        for i, n in line_of.items()
                        if n >= bounds[0] and (bounds[1] is None or n < bounds[1])
                    ]
                    done = [i for i in ids if i in persisted]
                    paid_open = [i for i in ids if items[i] in created and i not in persisted]
                    # Mid-shard: some lines stored (the killed run's share is not zero), some
                    # paid for and not stored yet (the rescue must reconnect, not pay again).
                    if done and paid_open and len(ids) - len(done) >= 3:
                        mine.append(run)
                return (other, mine) if mine else None

            k_victim, _ = wait_until(victim, 180, "a shard of the other worker mid-way", 0.3)
            victim_runs = [
                r["id"]
                for r in _shard_runs(api, parent_id)
                if r["state"]["type"] in ("RUNNING", "PENDING") and worker_of(r) == k_victim
            ]
            created_at_kill = len(emulator.created_tasks())
            killed_pids = kill_tree(workers[k_victim])
            wait_until(lambda: all(gone(p) for p in killed_pids), 15, f"{killed_pids} to die")
            timings["kill"] = time.monotonic() - started

            def parent_done() -> dict[str, Any] | None:
                run = _run(api, parent_id)
                return run if run["state"]["type"] in TERMINAL else None

            parent = wait_until(parent_done, 300, "the parent run to finish", 1.0)
            timings["parent done"] = time.monotonic() - started
            logs = "\n".join(
                (tmp_path / f"worker-{k}.log").read_text(errors="replace")[-4000:] for k in range(2)
            )
            assert parent["state"]["type"] == "COMPLETED", logs
        finally:
            for w in workers:
                if w.poll() is None:
                    kill_tree(w)
                stop(w)

        # ------------------------------------------------------------- the verdict
        s3 = stack.output_store().client
        summaries = [k for k in _list(s3, stack.bucket, "eggapi/batches/") if "sharded-summ" in k]
        assert len(summaries) == 1, summaries
        summary = json.loads(_get(s3, stack.bucket, summaries[0]) or b"{}")
        run_key = summary["run_key"]
        attempts = {a["flow_run_id"]: a for s in summary["shards"] for a in s["attempts"]}
        killed = [r for r in victim_runs if r in attempts]
        v = judge(
            emulator=emulator,
            api_key=stack.api_key,
            s3=s3,
            bucket=stack.bucket,
            items=items,
            batches=[Batch("eggapi", run_key, list(items))],
            reports=None,  # the cost check is below: it must explain what no run reports
            expect_all_persisted=False,
        )
        # Every line exactly once in status.jsonl: persisted, failed with a named error, or
        # the broken line as broken.
        raw = _get(s3, stack.bucket, f"eggapi/batches/{run_key}/status.jsonl") or b""
        rows = [json.loads(x) for x in raw.decode().splitlines()]
        assert [r["line"] for r in rows] == list(range(1, N_ITEMS + 2)), rows
        for row in rows:
            if row["line"] == 21:
                assert row["status"] == "broken" and "JSON" in row["error"]["message"], row
            elif row["status"] != "persisted":
                assert row["status"] == "failed" and row["error"].get("type"), row
        # Cost: what the parent reports (read from the status objects, killed runs included)
        # is what was billed, except tasks a failure names as its evidence (a lost answer the
        # library would not attribute, e.g. ReconciliationError's candidates): billed for that
        # item's prompt, not stored, and said so in its line of status.jsonl.
        failures = " ".join(json.dumps(r["error"]) for r in rows if r["status"] == "failed")
        stored = {r["task_id"] for r in rows if r["status"] == "persisted"}
        ours = [t for t in emulator.created_tasks() if t["prompt"] in items.values()]
        named = [t for t in ours if t["task_id"] not in stored and t["task_id"] in failures]
        named_cost = sum((Decimal(t["billed"]) for t in named), Decimal(0))
        billed = sum((Decimal(t["billed"]) for t in ours), Decimal(0))
        reported = Decimal(str(summary["total_cost"]))
        if reported + named_cost != billed:
            v.violations.append(
                f"COST: the parent reported ${reported}, failures name ${named_cost} of "
                f"unstored tasks, but the emulator billed ${billed}"
            )
        # The killed worker's shard runs were declared dead and run again; each shard completed.
        assert killed and all(attempts[r]["state"] == "CRASHED" for r in killed), (
            victim_runs,
            summary["shards"],
        )
        assert summary["rescued"] >= len(killed) and summary["incomplete_shards"] == 0
        # Every shard run is a subflow of the parent (run_deployment inside the parent's run).
        for run_id in attempts:
            shard_run = _run(api, run_id)
            assert shard_run["parent_task_run_id"], shard_run
            assert f"eggapi-batch:{run_key}" in shard_run["tags"], shard_run["tags"]
        assert len(summary["shards"]) == SHARDS
        # The killed runs' share: what the status objects naming them account for.
        share = Decimal(0)
        for key in _list(s3, stack.bucket, f"eggapi/batches/{run_key}/items/"):
            doc = json.loads(_get(s3, stack.bucket, key) or b"{}")
            if doc.get("run_id") in killed:
                share += Decimal(str(doc["cost"]))
            assert doc.get("run_id") in attempts, (key, doc.get("run_id"))
        if Decimal(str(summary["killed_runs_cost"])) != share:
            v.violations.append(
                f"KILLED SHARE: parent says ${summary['killed_runs_cost']}, the status objects "
                f"naming the killed runs account for ${share}"
            )
        v.numbers.update(
            faults_fired=[f["kind"] for f in emulator.audit()["faults_fired"]],
            created_at_kill=created_at_kill,
            killed_runs=len(killed),
            killed_runs_cost=summary["killed_runs_cost"],
            parent_total_cost=summary["total_cost"],
            billed_named_by_failures_usd=str(named_cost),
            rescued=summary["rescued"],
            persisted=summary["persisted"],
            failed=summary["failed"],
        )

        # An unsharded run of the same manifest (same default run key) pays nothing for what
        # is persisted (a line that failed may legitimately be tried again).
        billed_before = len(wait_tasks_terminal(emulator))
        persisted_prompts = {items[r["id"]] for r in rows if r["status"] == "persisted"}
        rerun_env = {k: v for k, v in worker_env.items() if k != "PREFECT_WORKER_QUERY_SECONDS"}
        out_path = tmp_path / "rerun.json"
        done = subprocess_run(
            [
                sys.executable,
                str(REPO / "tests" / "mw_worker.py"),
                "--manifest",
                str(manifest),
                "--out",
                str(out_path),
            ],
            rerun_env,
        )
        rerun = json.loads(out_path.read_text())
        assert done == 0, rerun
        new = emulator.created_tasks()[billed_before:]
        v.numbers["unsharded_rerun_new_tasks"] = len(new)
        assert rerun["summary"]["run_key"] == run_key, rerun["summary"]
        repaid = [t["task_id"] for t in new if t["prompt"] in persisted_prompts]
        if repaid:
            v.violations.insert(0, f"RERUN PAID for persisted items: {repaid}")
        timings["total"] = time.monotonic() - started
        v.numbers["timings_s"] = {k: round(t, 1) for k, t in timings.items()}
        report = v.text("sharded batch on PostgreSQL")
        print("\n" + report)
        assert not v.violations, report


def subprocess_run(argv: list[str], env: dict[str, str], timeout: float = 180) -> int:
    """Run a helper process to completion in this repository; its exit status."""
    import subprocess

    done = subprocess.run(
        argv, env=env, cwd=REPO, timeout=timeout, stdin=subprocess.DEVNULL, capture_output=True
    )
    return done.returncode
