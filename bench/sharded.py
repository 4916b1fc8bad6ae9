"""Bench 7 (sharded): one manifest over 2 process workers on a PostgreSQL-backed Prefect server.

    python bench/sharded.py --n 200            # a quick look
    python bench/sharded.py --n 10000          # the benchmark row (run_all.py's full run)

Everything is a real process, as on several machines: a PostgreSQL cluster of its own
(:mod:`prefect_eggapi.testing.postgres`), ``prefect server start`` on it, the two sharding
deployments of ``deployments/prefect.yaml`` (``eggapi-sharded-batch/sharded-batch`` and the
``eggapi-batch/batch-shard`` it starts with ``run_deployment``), ``workers`` ``prefect worker
start`` processes on one process pool (and a third that runs only the parent, which just
coordinates), and the local stack (emulator + SeaweedFS) with the
overhead bench's timing. Against it, in the same run and stack, the hand-written script
(``baseline_script.py``) does the same N with the same total concurrency: the parent splits the
manifest into ``shards`` (default: one per worker) runs of ``concurrency / shards`` items in
flight each. Each shard worker takes at most ``ceil(shards / workers)`` runs, so the shards
are spread evenly. Both workers share one SQLite ledger directory (they are on one
machine; machines of their own would share ``EGGAPI_LEDGER_URI``).

Figures: the wall time from ``prefect deployment run`` to the parent's terminal state (what a
user waits for) and the parent run's own start -> end, against the script's; CPU per image of
the three workers (their flow-run processes included), the API server and PostgreSQL. The guarantees
are judged from outside the library, like ``tests/test_sharded_pg.py``: from the emulator's
audit, **duplicates** (a prompt with more than one billable task) and from S3 **wrong images**
(a persisted item whose stored bytes are not what the emulator serves for its own prompt's
task), plus lines of ``status.jsonl`` and items persisted.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PY,
    QUIET_ENV,
    REPO,
    PrefectServer,
    kill_group,
    local_stack,
    run_child,
    write_manifest,
)
from overhead import CLIENT_RATE, PENDING, PROCESSING

from prefect_eggapi.testing.emulator.config import key_id
from prefect_eggapi.testing.postgres import missing_reason, pg_cluster

PREFECT = str(Path(PY).with_name("prefect"))
POOL = "eggapi-process"
PARENT = "eggapi-sharded-batch/sharded-batch"
SHARDING = {"sharded-batch", "batch-shard"}  # the two deployments this bench deploys
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
# The parent only coordinates; on the shard workers' queue it would take a slot of one of them
# and let the other take every shard. A worker of its own runs it; the shard workers each take
# ceil(shards / workers) runs at most, so the shards are spread evenly.
PARENT_QUEUE = "eggapi-parent"


def _cli(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    """``prefect ARGS`` from the repository root (where ``deploy`` records the flows' path)."""
    done = subprocess.run(
        [PREFECT, *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    out = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{out[-3000:]}")
    return out


def _sharding_file(path: Path) -> Path:
    """deployments/prefect.yaml with only the sharding deployments (the others carry schedules
    a worker would pick up during the run), the parent on a work queue of its own."""
    config = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    config["deployments"] = [d for d in config["deployments"] if d["name"] in SHARDING]
    if len(config["deployments"]) != len(SHARDING):
        raise RuntimeError("deployments/prefect.yaml lost a sharding deployment")
    for deployment in config["deployments"]:
        if deployment["name"] == "sharded-batch":
            deployment["work_pool"]["work_queue_name"] = PARENT_QUEUE
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and its live descendants, with the children each has reaped
    (a worker's finished flow-run processes are in its cutime/cstime)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            parent[int(entry.name)] = int(fields[1])
            cpu[int(entry.name)] = sum(int(x) for x in fields[11:15]) / tick
    total = 0.0
    for pid, seconds in cpu.items():
        p = pid
        while p and p != root:
            p = parent.get(p, 0)
        total += seconds if p == root else 0.0
    return total


@contextlib.contextmanager
def _workers(env: dict[str, str], queues: list[tuple[str, int]], logs: Path) -> Iterator[list[int]]:
    """One ``prefect worker start`` process per (work queue, run limit), each in its own
    session; yields their PIDs once each says it started; stops their process groups on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for k, (queue, limit) in enumerate(queues):
            argv = [PREFECT, "worker", "start", "--pool", POOL, "--work-queue", queue]
            with (logs / f"worker-{k}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        [*argv, "--limit", str(limit)],
                        env={**env, "PREFECT_HOME": str(logs / f"worker-{k}-home")},
                        cwd=REPO,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + 180
        for k, proc in enumerate(procs):
            log_path = logs / f"worker-{k}.log"
            while "started!" not in log_path.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker {k} did not start:\n{log_path.read_text()[-2000:]}")
                time.sleep(0.5)
        yield [p.pid for p in procs]
    finally:
        for proc in procs:
            kill_group(proc.pid, timeout=15)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


def _run_parent(api: str, env: dict[str, str], params: dict[str, Any]) -> dict[str, Any]:
    """Start the parent deployment run; wait for its terminal state; its run and timings."""
    started = time.time()
    out = _cli(env, "deployment", "run", PARENT, "--params", json.dumps(params))
    match = re.search(r"UUID: ([0-9a-f-]{36})", out)
    if not match:
        raise RuntimeError(f"no flow run id in:\n{out}")
    run_id = match.group(1)
    with httpx.Client(base_url=api, timeout=60, trust_env=False) as http:
        while True:
            with contextlib.suppress(httpx.TransportError):
                run: dict[str, Any] = http.get(f"/flow_runs/{run_id}").raise_for_status().json()
                if run["state"]["type"] in TERMINAL:
                    break
            time.sleep(1.0)
        body = {"flow_runs": {"tags": {"all_": ["eggapi-shard"]}}}
        shards = http.post("/flow_runs/filter", json=body).raise_for_status().json()
    return {
        "run": run,
        "shard_runs": shards,
        "wall_submit_to_end": time.time() - started,
    }


def _runs_taken(log: Path, run_ids: list[str]) -> int:
    """How many of ``run_ids`` this worker ran: it logs "submitting flow run 'ID'" for every
    run it tries to claim and "Aborted submission of flow run 'ID'" when another won."""
    text = log.read_text(errors="replace")
    return sum(
        f"submitting flow run '{i}'" in text and f"Aborted submission of flow run '{i}'" not in text
        for i in run_ids
    )


def _seconds(run: dict[str, Any]) -> float:
    """The run's own start -> end, from the API."""
    from datetime import datetime

    start, end = run.get("start_time"), run.get("end_time")
    if not start or not end:
        return float("nan")
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def judge(stack: Any, prompts: dict[str, str], base: str) -> dict[str, Any]:
    """Duplicates from the emulator's audit, wrong images from S3 bytes vs the emulator's
    bytes for each item's own task; nothing read from the library's ledger."""
    tasks = [
        t
        for t in stack.emulator.audit()["tasks"]
        if t["key_id"] == key_id(stack.api_key) and t["prompt"] in set(prompts.values())
    ]
    per_prompt = Counter(t["prompt"] for t in tasks)
    task_of = {t["prompt"]: t for t in tasks}
    store = stack.output_store()
    s3, bucket = store.client, stack.bucket
    try:
        raw = s3.get_object(Bucket=bucket, Key=f"{base}/status.jsonl")["Body"].read()
    except s3.exceptions.NoSuchKey:
        raw = b""
    rows = [json.loads(x) for x in raw.decode().splitlines() if x.strip()]
    ids = Counter(r.get("id") for r in rows)

    def check(item_id: str) -> str:
        """'ok', 'wrong', 'missing' (persisted without bytes) or 'not persisted'."""
        try:
            doc = json.loads(
                s3.get_object(Bucket=bucket, Key=f"{base}/items/{item_id}.persisted.json")[
                    "Body"
                ].read()
            )
        except s3.exceptions.NoSuchKey:
            return "not persisted"
        uris = doc.get("s3_uris") or []
        task = task_of.get(prompts[item_id])
        if not uris or task is None:
            return "missing"
        for index, uri in enumerate(uris):
            key = uri.split(f"s3://{bucket}/", 1)[-1]
            stored = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            served = http.get(f"/images/{task['task_id']}/{index}.png")
            if served.status_code != 200:
                return "missing"
            if hashlib.sha256(stored).digest() != hashlib.sha256(served.content).digest():
                return "wrong"
        return "ok"

    with (
        httpx.Client(base_url=stack.emulator.base_url, timeout=60, trust_env=False) as http,
        concurrent.futures.ThreadPoolExecutor(16) as pool,
    ):
        verdicts = Counter(pool.map(check, prompts))
    return {
        "billable_tasks": len(tasks),
        "duplicates": sum(c - 1 for c in per_prompt.values() if c > 1),
        "wrong_images": verdicts["wrong"],
        "persisted": verdicts["ok"] + verdicts["wrong"],
        "not_persisted": verdicts["not persisted"],
        "persisted_without_bytes": verdicts["missing"],
        "status_lines": len(rows),
        "lines_not_exactly_once": sum(ids[i] != 1 for i in prompts),
    }


def measure(
    n: int,
    *,
    workers: int = 2,
    shards: int | None = None,
    concurrency: int = 50,
    items_per_task: int = 100,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    """One sharded run and one script run of N items in one stack; see the module doc."""
    reason = missing_reason()
    if reason is not None:
        return {"n": n, "skipped": reason}
    shards = shards or workers
    per_shard = max(1, math.ceil(concurrency / shards))
    tmp = Path(tempfile.mkdtemp(prefix="eggapi-bench-sharded-"))
    logs = log_dir or tmp
    tag = f"sharded-n{n}-{time.time_ns()}"
    manifest = write_manifest(tmp / "manifest.jsonl", n, tag)
    prompts = {f"item-{i:05d}": f"{tag} bench image {i}" for i in range(n)}
    result: dict[str, Any] = {
        "n": n,
        "workers": workers,
        "shards": shards,
        "concurrency_per_shard": per_shard,
        "items_per_task": items_per_task,
    }
    server = None
    with (
        pg_cluster() as pg,
        local_stack(
            pending_seconds=PENDING, processing_seconds=PROCESSING, rate_limit_per_second=None
        ) as stack,
    ):
        try:
            server = PrefectServer(database_url=pg.asyncpg_url).start(timeout=300)
            base_env = {**stack.env(), "EGGAPI_REQUESTS_PER_SECOND": CLIENT_RATE}
            # The script first, in the same stack (its prompts carry another tag).
            btag = f"baseline-n{n}-{time.time_ns()}"
            spec = {"n": n, "concurrency": concurrency, "tag": btag, "name": btag, "prefix": btag}
            result["baseline"] = run_child(
                "baseline_script", spec, {**base_env, **QUIET_ENV}, log_dir=log_dir
            )
            env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "EGGAPI_"))}
            env.update(
                QUIET_ENV,
                **base_env,
                PREFECT_API_URL=server.api_url,
                PREFECT_HOME=str(tmp / "cli-home"),
                PREFECT_WORKER_QUERY_SECONDS="1",
                EGGAPI_LEDGER_DIR=str(tmp / "ledger"),
            )
            _cli(env, "work-pool", "create", POOL, "--type", "process")
            prefect_file = _sharding_file(tmp / "prefect.yaml")
            _cli(env, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file))
            queues = [("default", math.ceil(shards / workers))] * workers + [(PARENT_QUEUE, 1)]
            with _workers(env, queues, logs) as pids:
                assert server.proc is not None
                cpu0 = {
                    "workers": sum(_tree_cpu(p) for p in pids),
                    "server": _tree_cpu(server.proc.pid),
                    "postgres": _tree_cpu(pg.pid),
                }
                params = {
                    "manifest": manifest,
                    "shards": shards,
                    "concurrency": per_shard,
                    "items_per_task": items_per_task,
                    "prefix": tag,
                    "run_key": tag,
                    "budget": None,
                    "poll_interval": 1.0,
                }
                done = _run_parent(server.api_url, env, params)
                cpu = {
                    "workers": sum(_tree_cpu(p) for p in pids) - cpu0["workers"],
                    "server": _tree_cpu(server.proc.pid) - cpu0["server"],
                    "postgres": _tree_cpu(pg.pid) - cpu0["postgres"],
                }
            hosts = [
                _runs_taken(logs / f"worker-{k}.log", [r["id"] for r in done["shard_runs"]])
                for k in range(workers)
            ]
            run = done["run"]
            result.update(
                state=run["state"]["type"],
                wall=done["wall_submit_to_end"],
                parent_seconds=_seconds(run),
                shard_seconds=[_seconds(r) for r in done["shard_runs"]],
                shard_runs=len(done["shard_runs"]),
                shards_per_worker=hosts,
                cpu_ms_per_image={k: 1000 * v / max(n, 1) for k, v in cpu.items()},
                **judge(stack, prompts, f"{tag}/batches/{tag}"),
            )
        finally:
            if server is not None:
                server.stop()
    base = result["baseline"]
    result["baseline"] = {
        "wall": base["wall"],
        "cpu_ms_per_image": 1000 * base["cpu"] / max(base["images"], 1),
        "images": base["images"],
    }
    result["ratio"] = result["wall"] / base["wall"]
    return result


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--items-per-task", type=int, default=100)
    parser.add_argument("--keep-logs", type=Path, default=None)
    args = parser.parse_args()
    if args.keep_logs:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
    result = measure(
        args.n,
        workers=args.workers,
        shards=args.shards,
        concurrency=args.concurrency,
        items_per_task=args.items_per_task,
        log_dir=args.keep_logs,
    )
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
