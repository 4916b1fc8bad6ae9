"""Machinery of ``test_multiworker_money.py``: real worker processes and an independent oracle.

- :class:`Workers`: starts batch workers as separate OS processes (``tests/mw_worker.py`` or the
  ``flows/batch_generate.py`` entry file), each in its own session, working directory and
  ``PREFECT_HOME``; kills them by process group (SIGKILL) and always reaps them, on failure too.
- :func:`spread` / :func:`fault_rules`: emulator fault rules that fire at chosen opportunities
  (``skip`` counted per opportunity, in insertion order; see ``emulator/faults.py``).
- :func:`judge`: the verdict, taken ONLY from outside the library: the emulator's audit of
  created (billable) tasks with their prompts and billed amounts, the bytes the emulator serves
  for each task, and the objects in S3 (status objects, ``status.jsonl``, stored images). The
  library's ledger is never read; its summaries are only compared with what was billed.

Every wait polls an observable condition with a deadline; no sleep is a correctness window.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from procs import gone
from reliability_common import wait_until

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
WORKER_SCRIPT = TESTS / "mw_worker.py"
BATCH_ENTRY = REPO / "flows" / "batch_generate.py"
FINAL = ("persisted", "failed", "skipped")
SRC = os.environ.get("MW_SRC", "")
"""MW_SRC=/path/to/src: the workers import prefect_eggapi from there (e.g. an exported HEAD)."""
EPHEMERAL = os.environ.get("MW_PREFECT_EPHEMERAL", "") not in ("", "0")
"""MW_PREFECT_EPHEMERAL=1: every worker starts its own temporary Prefect server (slower, ~10 s
per process) instead of sharing the session's test Prefect API (as workers share a server)."""


# --------------------------------------------------------------------------- waiting


# --------------------------------------------------------------------------- environment


@dataclass
class Stack:
    """What a worker on 'another machine' is told: where the API, the bucket and Prefect are."""

    emulator_url: str
    api_key: str
    s3_env: dict[str, str]
    bucket: str
    prefix: str
    prefect_api_url: str | None

    def env(self, home: Path, *, ledger_uri: str | None, **extra: str) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("EGGAPI_", "AWS_", "PREFECT_"))
        }
        env.update(self.s3_env)
        env.update(
            EGGAPI_API_KEY=self.api_key,
            EGGAPI_BASE_URL=self.emulator_url,
            EGGAPI_S3_BUCKET=self.bucket,
            EGGAPI_S3_PREFIX=self.prefix,
            PREFECT_HOME=str(home / "prefect-home"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
            PREFECT_LOGGING_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
        )
        if self.prefect_api_url and not EPHEMERAL:
            env["PREFECT_API_URL"] = self.prefect_api_url
        if ledger_uri:
            env["EGGAPI_LEDGER_URI"] = ledger_uri
        if SRC:
            env["PYTHONPATH"] = SRC
        env.update(extra)
        return env


class JitterProxy:
    """TCP proxy in front of S3 that delays every chunk a client sends by 0..``max_ms``.

    Real S3 answers in tens to hundreds of milliseconds; SeaweedFS on loopback in one or two.
    The jitter widens every window between two S3 writes of a worker (as production latency
    would) without knowing anything about the library's object layout. Requests are not
    altered (SigV4 still verifies: the signed Host header is the proxy's, and is kept).
    """

    def __init__(self, upstream_url: str, max_ms: float, seed: int = 7) -> None:
        hostport = upstream_url.split("://", 1)[1].rstrip("/")
        host, _, port = hostport.partition(":")
        self.upstream = (host, int(port))
        self.max_s = max_ms / 1000.0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(256)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _delay(self) -> float:
        with self._lock:
            return self._random.uniform(0, self.max_s)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, delay: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if delay and self.max_s:
                    time.sleep(self._delay())
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL_S3": self.url, "AWS_ENDPOINT_URL": self.url}

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


# --------------------------------------------------------------------------- processes


class Worker:
    """One batch process in its own session (SIGKILL of the group takes every thread/child)."""

    def __init__(self, name: str, root: Path, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=False)
        (self.dir / "prefect-home").mkdir()
        self.out = self.dir / "result.json"
        self.log = self.dir / "worker.log"
        self.stdout_path = self.dir / "stdout.txt"
        self.argv = [a.replace("{OUT}", str(self.out)) for a in argv]
        env = dict(env)
        env["PREFECT_HOME"] = str(self.dir / "prefect-home")
        self._log = self.log.open("wb")
        self._stdout = self.stdout_path.open("wb")
        self.killed = False
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=self._log,
            start_new_session=True,
        )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (mid-request), then reap."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.killed = True
        self.proc.wait(30)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.name} (pid {self.pid}) still running after {timeout:.0f}s:\n"
                f"{self.tail()}"
            ) from None

    def close(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                self.proc.wait(30)
        # stragglers of the group (e.g. an ephemeral Prefect server) go too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for fh in (self._log, self._stdout):
            with contextlib.suppress(Exception):
                fh.close()

    def tail(self, chars: int = 3000) -> str:
        text = ""
        for path in (self.stdout_path, self.log):
            with contextlib.suppress(OSError):
                text += f"--- {path.name}\n" + path.read_text(errors="replace")[-chars:]
        return text

    def result(self) -> dict[str, Any]:
        """mw_worker's result file, or the JSON summary the entry file printed on stdout."""
        if self.out.exists():
            data: dict[str, Any] = json.loads(self.out.read_text())
            return data
        text = self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""
        start = text.find("{")
        if start >= 0:
            with contextlib.suppress(ValueError):
                return {"summary": json.loads(text[start:])}
        return {"error": {"type": "NoResult", "message": f"rc={self.proc.returncode}"}}

    def flow_run_id(self) -> str | None:
        """The id of this process's flow run, written by mw_worker once the run is Running (so
        known for a SIGKILLed run too); None if it never got that far."""
        path = Path(str(self.out) + ".flow_run_id")
        with contextlib.suppress(OSError):
            return path.read_text().strip() or None
        return None

    def reported_cost(self) -> Decimal | None:
        summary = self.result().get("summary")
        return None if not summary else Decimal(str(summary["total_cost"]))

    def describe(self) -> str:
        res = self.result()
        if "summary" in res:
            s = res["summary"]
            return (
                f"{self.name}: persisted {s['persisted']} (resumed {s['resumed']}) failed "
                f"{s['failed']} skipped {s['skipped']} reported ${s['total_cost']}"
            )
        err = res.get("error") or {}
        state = "SIGKILLed" if self.killed else f"rc={self.proc.returncode}"
        return f"{self.name}: {state} {err.get('type')}: {str(err.get('message'))[:300]}"


class Workers:
    """Registry of every process a test starts; ``close()`` kills and reaps all of them."""

    def __init__(self, root: Path, stack: Stack) -> None:
        self.root = root
        self.stack = stack
        self.all: list[Worker] = []

    def batch(
        self,
        name: str,
        manifest: str,
        *,
        run_key: str,
        ledger_uri: str | None,
        concurrency: int = 8,
        prefix: str | None = None,
        credentials_block: str | None = None,
        **env_extra: str,
    ) -> Worker:
        argv = [
            sys.executable,
            str(WORKER_SCRIPT),
            "--manifest",
            manifest,
            "--run-key",
            run_key,
            "--concurrency",
            str(concurrency),
            "--out",
            "{OUT}",
        ]
        if prefix is not None:
            argv += ["--prefix", prefix]
        if credentials_block is not None:
            argv += ["--credentials-block", credentials_block]
        env = self.stack.env(self.root / name, ledger_uri=ledger_uri, **env_extra)
        worker = Worker(name, self.root, argv, env)
        self.all.append(worker)
        return worker

    def entry_file(self, name: str, manifest: str, env: dict[str, str]) -> Worker:
        """``python flows/batch_generate.py MANIFEST``: the documented entry, default config."""
        worker = Worker(name, self.root, [sys.executable, str(BATCH_ENTRY), manifest], env)
        self.all.append(worker)
        return worker

    def wait_all(self, workers: Iterable[Worker], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.wait(max(1.0, deadline - time.monotonic()))

    def close(self) -> None:
        for worker in self.all:
            worker.close()
        leaked = [w.pid for w in self.all if not gone(w.pid)]
        assert not leaked, f"worker processes still alive after close(): {leaked}"


@contextlib.contextmanager
def workers(root: Path, stack: Stack) -> Iterator[Workers]:
    pool = Workers(root, stack)
    try:
        yield pool
    finally:
        pool.close()


# --------------------------------------------------------------------------- manifests, faults


def write_manifest(path: Path, items: dict[str, str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": k, "prompt": p}) + "\n" for k, p in items.items()))
    return str(path)


def make_items(tag: str, n: int, start: int = 0) -> dict[str, str]:
    """Unique prompts; ids contain no dot (status objects are ``{id}.{status}.json``)."""
    return {f"{tag}-{i:03d}": f"{tag} item {i}: a glass heron at dawn" for i in range(start, n)}


def spread(count: int, over: int, offset: int = 1) -> list[int]:
    """``count`` 1-based opportunity indices spread evenly over ``over`` opportunities."""
    step = over / count
    return sorted({min(over, offset + int(i * step)) for i in range(count)})


def fault_rules(at: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rules of ONE evaluation point that fire exactly at the given 1-based opportunities.

    A rule counts an opportunity unless an earlier rule fired on it, so with the rules in order
    of their targets, the j-th (1-based) must skip ``target - j`` opportunities.
    """
    rules = []
    for j, target in enumerate(sorted(at), start=1):
        rule = {"times": 1, "skip": target - j, **at[target]}
        rules.append(rule)
    return rules


# --------------------------------------------------------------------------- oracle


def _list(s3: Any, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _get(s3: Any, bucket: str, key: str) -> bytes | None:
    from botocore.exceptions import ClientError

    try:
        body: bytes = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        return body
    except ClientError:
        return None


def wait_tasks_terminal(emulator: Any, timeout: float = 90.0) -> list[dict[str, Any]]:
    """Every created task finished (billed amounts are final); the emulator keeps running them
    after a worker dies."""

    def done() -> list[dict[str, Any]] | None:
        tasks = emulator.created_tasks()
        return tasks if all(t["status"] in ("completed", "failed") for t in tasks) else None

    result: list[dict[str, Any]] = wait_until(done, timeout, "every created task to finish", 0.2)
    return result


@dataclass
class Batch:
    """One batch location to judge: its prefix, run key and the items it must account for."""

    prefix: str
    run_key: str
    items: list[str]

    @property
    def base(self) -> str:
        return "/".join(p for p in (self.prefix, "batches", self.run_key) if p)


@dataclass
class Verdict:
    numbers: dict[str, Any] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def text(self, title: str) -> str:
        lines = [f"{title}: {len(self.violations)} violation(s)", json.dumps(self.numbers)]
        lines += [f"  VIOLATION {v}" for v in self.violations[:40]]
        if len(self.violations) > 40:
            lines.append(f"  ... and {len(self.violations) - 40} more")
        lines += [f"  note: {n}" for n in self.notes[:20]]
        return "\n".join(lines)


def judge(
    *,
    emulator: Any,
    api_key: str,
    s3: Any,
    bucket: str,
    items: dict[str, str],
    batches: list[Batch],
    reports: list[Decimal | None] | None,
    foreign_prompts: Iterable[str] = (),
    expect_all_persisted: bool = True,
    report_label: str = "runs",
    run_ids: list[str | None] | None = None,
    killed_run_ids: Iterable[str | None] = (),
    remote_failure: Callable[[dict[str, Any]], bool] = lambda t: t["status"] == "failed",
) -> Verdict:
    """The money and attribution verdict, from the emulator's audit and the bucket only.

    ``reports`` are the finished runs' ``total_cost``. With ``run_ids`` (the flow run id of each
    report's run, same order), the bill is split by who wrote each status object (its
    ``run_id``): every finished run must have reported exactly the cost of the status objects
    it wrote, every status object must name a finished run or one of ``killed_run_ids`` (runs
    SIGKILLed mid-batch, which report nothing), and the finished runs' reports plus the cost of
    the objects the killed runs wrote must equal what was billed. Without ``run_ids`` the
    reports alone must add up to the bill. ``remote_failure(task)``: a task after which a fresh
    task for the same prompt is legitimate (default: it failed upstream)."""
    v = Verdict()
    foreign = set(foreign_prompts)
    emulator.clear_faults()  # downloads below must see the real bytes
    created = [t for t in wait_tasks_terminal(emulator)]
    from prefect_eggapi.testing.emulator.config import key_id

    mine = [t for t in created if t["key_id"] == key_id(api_key)]
    prompt_to_item = {p: i for i, p in items.items()}
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t in sorted(mine, key=lambda t: (t["created_at_unix"], t["task_id"])):
        by_prompt[t["prompt"]].append(t)
    item_tasks = [t for t in mine if t["prompt"] in prompt_to_item]
    billed = sum((Decimal(t["billed"]) for t in item_tasks), Decimal("0"))
    v.numbers.update(
        items=len(items),
        billable_tasks=len(item_tasks),
        foreign_tasks=sum(t["prompt"] in foreign for t in mine),
        billed_usd=str(billed),
    )

    # 1. money: one billable task per prompt, plus one per terminal remote failure before it
    paid_twice = fresh_attempts = 0
    for prompt, tasks in by_prompt.items():
        if prompt in foreign:
            continue
        if prompt not in prompt_to_item:
            v.violations.append(f"task(s) {[t['task_id'] for t in tasks]} for unknown prompt")
            continue
        fresh = sum(1 for t in tasks[:-1] if remote_failure(t))
        fresh_attempts += min(fresh, len(tasks) - 1)
        if len(tasks) > 1 + fresh:
            paid_twice += 1
            v.violations.append(
                f"PAID TWICE: item {prompt_to_item[prompt]} has {len(tasks)} billable tasks "
                f"({', '.join(t['task_id'] + ':' + t['status'] for t in tasks)}), "
                f"{fresh} after an upstream failure"
            )
    v.numbers["prompts_paid_more_than_once"] = paid_twice
    v.numbers["fresh_attempts_after_remote_failure"] = fresh_attempts

    # 2. what each served output is: sha256 -> (task, its prompt)
    served: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=emulator.base_url, timeout=30, trust_env=False) as http:
        for t in mine:
            if t["status"] != "completed":
                continue
            for index in range(int(t["num_outputs"])):
                response = http.get(f"/images/{t['task_id']}/{index}.png")
                if response.status_code == 200:
                    served[hashlib.sha256(response.content).hexdigest()] = t

    # 3. every item of every batch: one final status, its own image, status.jsonl agrees
    collected: dict[str, str] = {}  # task id -> item that stored its bytes
    # who accounts for what: the run_id named by each final status object, and its cost
    written_by: dict[str | None, list[tuple[str, Decimal]]] = defaultdict(list)
    wrong = not_persisted = multi_status = 0
    failed_errors: dict[str, str] = {}
    for batch in batches:
        prefix = f"{batch.base}/items/"
        statuses: dict[str, set[str]] = defaultdict(set)
        for key in _list(s3, bucket, prefix):
            name = key[len(prefix) :]
            if name.endswith(".json"):
                item_id, _, status = name[: -len(".json")].rpartition(".")
                statuses[item_id].add(status)
        raw = _get(s3, bucket, f"{batch.base}/status.jsonl")
        rows = [json.loads(x) for x in raw.decode().splitlines() if x.strip()] if raw else []
        if raw is None:
            v.violations.append(f"{batch.base}/status.jsonl missing")
        row_ids = Counter(r.get("id") for r in rows)
        rows_by_id = {r.get("id"): r for r in rows}
        for item_id in batch.items:
            prompt = items[item_id]
            final = statuses.get(item_id, set()) & set(FINAL)
            if len(final) != 1:
                multi_status += len(final) > 1
                v.violations.append(
                    f"item {item_id}: status objects {sorted(statuses.get(item_id, set()))} "
                    "(want exactly one final status)"
                )
            if row_ids[item_id] != 1:
                v.violations.append(f"item {item_id}: {row_ids[item_id]} rows in status.jsonl")
            row = rows_by_id.get(item_id)
            if "persisted" in final and row is not None and row["status"] != "persisted":
                v.violations.append(
                    f"item {item_id}: persisted status object but status.jsonl says "
                    f"{row['status']} ({str((row.get('error') or {}).get('message'))[:150]})"
                )
            for status in final - {"persisted"}:
                body = _get(s3, bucket, f"{prefix}{item_id}.{status}.json")
                doc = json.loads(body) if body else {}
                failed_errors[item_id] = json.dumps(doc.get("error"))
                if body:
                    written_by[doc.get("run_id")].append((item_id, Decimal(str(doc["cost"]))))
            if "persisted" not in final:
                not_persisted += 1
                if expect_all_persisted:
                    why = failed_errors.get(item_id, "no status")[:300]
                    v.violations.append(f"item {item_id} not persisted: {why}")
                continue
            body = _get(s3, bucket, f"{prefix}{item_id}.persisted.json")
            doc = json.loads(body) if body else {}
            uris = doc.get("s3_uris") or []
            if body:
                written_by[doc.get("run_id")].append((item_id, Decimal(str(doc["cost"]))))
            if not uris:
                v.violations.append(f"item {item_id}: persisted without outputs")
            for uri in uris:
                data = _get(s3, bucket, uri.split(f"s3://{bucket}/", 1)[-1])
                if data is None:
                    v.violations.append(f"item {item_id}: {uri} does not exist")
                    continue
                task = served.get(hashlib.sha256(data).hexdigest())
                if task is None:
                    v.violations.append(f"item {item_id}: {uri} holds bytes no task served")
                    continue
                if task["prompt"] != prompt:
                    wrong += 1
                    owner = prompt_to_item.get(task["prompt"]) or (
                        "a FOREIGN job" if task["prompt"] in foreign else "an unknown prompt"
                    )
                    v.violations.append(
                        f"WRONG IMAGE: item {item_id} stored the output of task "
                        f"{task['task_id']}, created for {owner} ({task['prompt'][:50]!r})"
                    )
                    continue
                collected[task["task_id"]] = item_id
    v.numbers.update(
        items_with_another_jobs_image=wrong,
        items_not_persisted=not_persisted,
        items_with_several_final_statuses=multi_status,
    )
    reasons = Counter(
        (json.loads(e) or {}).get("type", "?") if e.startswith("{") else "?"
        for e in failed_errors.values()
    )
    if reasons:
        v.numbers["final_errors"] = dict(reasons)

    # 4. every billed task of an item collected for its own item, or explained by a failure
    uncollected = unexplained = 0
    for t in item_tasks:
        if Decimal(t["billed"]) <= 0 or t["task_id"] in collected:
            continue
        uncollected += 1
        item_id = prompt_to_item[t["prompt"]]
        if any(t["task_id"] in err for err in failed_errors.values()):
            v.notes.append(f"{t['task_id']} ({item_id}) billed, uncollected, named by a failure")
            if expect_all_persisted:
                v.violations.append(f"{t['task_id']} billed for {item_id} but not collected")
        else:
            unexplained += 1
            v.violations.append(
                f"UNCOLLECTED: task {t['task_id']} billed ${t['billed']} for {item_id}, "
                f"not stored for it and named by no failure"
            )
    v.numbers.update(billed_not_collected=uncollected, billed_not_collected_unexplained=unexplained)

    # 5. the runs' own reports add up to what was billed
    if reports is not None:
        known = [r for r in reports if r is not None]
        total = sum(known, Decimal("0"))
        v.numbers[f"reported_by_{report_label}_usd"] = str(total)
        if run_ids is not None:
            total += _attribute(v, written_by, reports, run_ids, killed_run_ids)
        if total != billed:
            how = (
                "counted twice by the reports"
                if total > billed
                else "billed but reported by no finished run"
            )
            killed = (
                f" + ${v.numbers['killed_runs_share_usd']} written by the killed run(s)"
                if run_ids is not None
                else ""
            )
            v.violations.append(
                f"COST: {report_label} reported ${total} in all ({', '.join(map(str, reports))}"
                f"{killed}) but the emulator billed ${billed}: ${abs(total - billed)} {how}"
            )
    return v


def _attribute(
    v: Verdict,
    written_by: dict[str | None, list[tuple[str, Decimal]]],
    reports: list[Decimal | None],
    run_ids: list[str | None],
    killed_run_ids: Iterable[str | None],
) -> Decimal:
    """Each finished run reported exactly what its status objects account for; the rest was
    written by a killed run. Returns the killed runs' share (added to the reports)."""
    assert len(run_ids) == len(reports), "one flow run id per report"
    finished = {r for r in run_ids if r}
    killed = {r for r in killed_run_ids if r}
    for run_id, reported in zip(run_ids, reports, strict=True):
        if not run_id or reported is None:
            v.violations.append("ATTRIBUTION: a finished run without a flow run id or report")
            continue
        own = written_by.get(run_id, [])
        accounted = sum((c for _, c in own), Decimal("0"))
        if reported != accounted:
            v.violations.append(
                f"ATTRIBUTION: run {run_id} reported ${reported} but the {len(own)} status "
                f"object(s) naming it account for ${accounted}"
            )
    share = Decimal("0")
    share_items = 0
    for run_id, written in written_by.items():
        if run_id in finished:
            continue
        cost = sum((c for _, c in written), Decimal("0"))
        if run_id not in killed:
            v.violations.append(
                f"ATTRIBUTION: {len(written)} status object(s) (${cost}, e.g. "
                f"{[i for i, _ in written[:5]]}) name run {run_id!r}, neither a finished run "
                "nor a killed one"
            )
        share += cost
        share_items += sum(c > 0 for _, c in written)
    v.numbers.update(
        killed_runs_share_usd=str(share),
        killed_runs_paid_items=share_items,
        items_by_run={str(r): len(w) for r, w in written_by.items()},
    )
    return share


def foreign_task(emulator_url: str, api_key: str, prompt: str) -> str:
    """A job someone else runs on the same key: a plain HTTP client, no ledger."""
    with httpx.Client(base_url=emulator_url, timeout=30, trust_env=False) as http:
        response = http.post(
            "/v1/generate",
            headers={"Authorization": f"Bearer {api_key}"},
            json={"model": "nanobanana", "prompt": prompt},
        )
        response.raise_for_status()
        task_id: str = response.json()["data"]["id"]
        return task_id
