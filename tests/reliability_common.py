"""Shared machinery of the reliability suite (issue 9) and of ``bench/chaos.py``.

- :class:`HoldingProxy`: a loopback TCP proxy in front of S3 that *holds* the first request whose
  bytes match an armed pattern (e.g. ``PUT /bucket/out/gen_``), so a test knows from the outside
  that the flow process is blocked inside exactly that request before it kills it.
- :func:`restart_s3`: stop SeaweedFS and start it again on the same ports and data directory.
- :func:`check_invariants`: every line accounted for, billable tasks = items + legitimate fresh
  attempts (0 duplicates), every S3 object's sha256 equal to the bytes the emulator serves.
- :func:`collect_texts` / :func:`find_secrets`: the secret sweep over Prefect logs, artifacts,
  flow/task run states, status manifests, S3 object metadata, ledger and result files.
- :func:`run_chaos`: the chaos run itself (CI-sized from the tests, 300 items from the bench).

No sleeps-and-hope: every wait polls an observable condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import struct
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

# --------------------------------------------------------------------------- small helpers


def wait_until(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail loudly at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def write_manifest(path: Path, rows: Iterable[dict[str, Any] | str]) -> str:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def list_keys(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def read_status(s3: Any, bucket: str, key: str) -> list[dict[str, Any]]:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def served_sha256(emulator_base_url: str, task_id: str, index: int) -> str:
    """sha256 of the bytes the emulator serves for an output (faults must be cleared first)."""
    with httpx.Client(timeout=30, trust_env=False) as http:
        response = http.get(f"{emulator_base_url}/images/{task_id}/{index}.png")
        response.raise_for_status()
        return hashlib.sha256(response.content).hexdigest()


# --------------------------------------------------------------------------- S3 proxy


class HoldingProxy:
    """TCP proxy ``127.0.0.1:port -> upstream``; holds the first request matching an armed pattern.

    When client bytes contain the pattern, nothing more of that connection is forwarded: the S3
    server never completes the request, so the client stays blocked inside it (until killed).
    ``hit`` is set at that moment. SigV4 still verifies because the proxy does not touch the
    ``Host`` header the client signed.
    """

    def __init__(self, upstream_url: str) -> None:
        hostport = upstream_url.split("://", 1)[1].rstrip("/")
        host, _, port = hostport.partition(":")
        self.upstream = (host, int(port))
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.pattern: bytes | None = None
        self.outage_seconds: float | None = None  # on a hit: cut instead of hold, then refuse
        self.refuse_until = 0.0
        self.refused = 0
        self.hit = threading.Event()
        self.held_request: bytes = b""
        self._lock = threading.Lock()
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, pattern: str | bytes, *, outage_seconds: float | None = None) -> None:
        """Hold the first matching request; with ``outage_seconds``, cut its connection instead
        and refuse every new connection for that long (a short S3 outage at that exact point)."""
        with self._lock:
            self.pattern = pattern.encode() if isinstance(pattern, str) else pattern
            self.outage_seconds = outage_seconds
            self.hit.clear()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if time.monotonic() < self.refuse_until:
                self.refused += 1
                with contextlib.suppress(OSError):
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, inspect: bool) -> None:
        tail = b""
        holding = False
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if holding:
                    continue  # swallow: the request never completes
                if inspect:
                    with self._lock:
                        pattern = self.pattern
                        window = tail + data
                        if pattern and not self.hit.is_set() and pattern in window:
                            holding = True
                            start = window.find(pattern)
                            self.held_request = window[start : start + 300]
                            self.pattern = None
                            if self.outage_seconds is not None:
                                self.refuse_until = time.monotonic() + self.outage_seconds
                                self.hit.set()
                                break  # cut: the finally block shuts both sockets
                            self.hit.set()
                            continue
                    tail = window[-512:]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


# --------------------------------------------------------------------------- S3 restart


def restart_s3(server: Any, timeout: float = 60.0) -> float:
    """Restart SeaweedFS on the same ports, data dir and credentials; seconds it was away."""
    started = time.monotonic()
    server.restart(timeout)
    return time.monotonic() - started


# --------------------------------------------------------------------------- invariants


@dataclass
class Invariants:
    lines: int = 0
    items: int = 0
    persisted: int = 0
    failed: int = 0
    failed_reasons: Counter[str] = field(default_factory=Counter)
    broken_reported: int = 0
    billable_tasks: int = 0
    fresh_attempts: int = 0
    duplicates: int = 0
    lost: int = 0
    objects_checked: int = 0
    sha_mismatches: int = 0
    billed: Decimal = Decimal("0")
    wrong_task: int = 0  # persisted rows whose task was created for another item's prompt
    shared_tasks: int = 0  # task ids claimed by more than one item
    orphaned_paid: int = 0  # billed tasks whose outputs no item row references
    problems: list[str] = field(default_factory=list)


def _terminal_remote_failure(task: dict[str, Any]) -> bool:
    """Failed remotely (billed $0), or 'completed' without outputs (EmptyOutputError)."""
    if task["status"] == "failed":
        return True
    return "empty_output" in (task.get("faults") or []) or (
        task["status"] == "completed" and Decimal(task["billed"]) == 0
    )


def check_invariants(
    *,
    emulator: Any,
    s3: Any,
    bucket: str,
    status_rows: list[dict[str, Any]],
    prompts_by_id: dict[str, str],
    broken_lines: int,
    api_key: str | None = None,
) -> Invariants:
    """Nothing lost, nothing paid twice, every stored byte is the byte that was served."""
    inv = Invariants(lines=len(status_rows))
    created = emulator.created_tasks(api_key)
    inv.billable_tasks = len(created)
    inv.billed = sum((Decimal(t["billed"]) for t in created), Decimal("0"))
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t in sorted(created, key=lambda t: t["created_at_unix"]):
        by_prompt[t["prompt"]].append(t)

    rows_by_id = {r["id"]: r for r in status_rows if r.get("id")}
    inv.broken_reported = sum(r["status"] == "broken" and bool(r["error"]) for r in status_rows)
    if inv.broken_reported != broken_lines:
        inv.problems.append(f"{broken_lines} broken lines, {inv.broken_reported} reported")
    inv.items = len(prompts_by_id)
    for item_id, prompt in prompts_by_id.items():
        row = rows_by_id.get(item_id)
        tasks = by_prompt.get(prompt, [])
        # every extra task must follow a terminal remote failure of the previous one
        for earlier in tasks[:-1]:
            if _terminal_remote_failure(earlier):
                inv.fresh_attempts += 1
            else:
                inv.duplicates += 1
                inv.problems.append(f"{item_id}: duplicate billable task after {earlier}")
        if row is None:
            inv.lost += 1
            inv.problems.append(f"{item_id}: no status row (lost)")
            continue
        if row["status"] == "failed":
            reason = (row.get("error") or {}).get("type") or ""
            if not reason or not (row.get("error") or {}).get("message"):
                inv.lost += 1
                inv.problems.append(f"{item_id}: failed without a reason")
            inv.failed += 1
            inv.failed_reasons[reason] += 1
            continue
        if row["status"] != "persisted" or not row.get("s3_uris"):
            inv.lost += 1
            inv.problems.append(f"{item_id}: status {row['status']} without outputs")
            continue
        inv.persisted += 1
        if row.get("task_id") not in {t["task_id"] for t in tasks}:
            inv.wrong_task += 1
            inv.problems.append(f"{item_id}: task {row.get('task_id')} not created for its prompt")
        for index, uri in enumerate(row["s3_uris"]):
            key = uri.split(f"s3://{bucket}/", 1)[1]
            try:
                obj = s3.get_object(Bucket=bucket, Key=key)
            except Exception as exc:
                inv.lost += 1
                inv.problems.append(f"{item_id}: {uri} unreadable: {exc}")
                continue
            body = obj["Body"].read()
            actual = hashlib.sha256(body).hexdigest()
            meta = obj.get("Metadata", {}).get("sha256")
            served = served_sha256(emulator.base_url, row["task_id"], index)
            inv.objects_checked += 1
            if not (actual == served == meta):
                inv.sha_mismatches += 1
                inv.problems.append(
                    f"{item_id}: {uri} sha256 {actual[:12]} meta {str(meta)[:12]} "
                    f"served {served[:12]}"
                )
    claimed = Counter(r.get("task_id") for r in status_rows if r["status"] == "persisted")
    inv.shared_tasks = sum(1 for _, c in claimed.items() if c > 1)
    for t in created:
        if Decimal(t["billed"]) > 0 and t["task_id"] not in claimed:
            inv.orphaned_paid += 1
            inv.problems.append(f"{t['task_id']} ({t['prompt'][:40]}) billed but not collected")
    return inv


# --------------------------------------------------------------------------- secret sweep


async def _prefect_texts(flow_run_ids: list[str]) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    out: dict[str, str] = {}
    ids = [__import__("uuid").UUID(str(i)) for i in flow_run_ids]
    async with get_client() as client:
        offset = 0
        logs: list[str] = []
        while True:
            page = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)),
                limit=200,
                offset=offset,
            )
            logs += [f"{log.level} {log.name}: {log.message}" for log in page]
            if len(page) < 200:
                break
            offset += 200
        out["prefect:logs"] = "\n".join(logs)
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
        )
        out["prefect:artifacts"] = "\n".join(
            json.dumps(a.model_dump(mode="json"), default=str) for a in artifacts
        )
        task_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))
        )
        out["prefect:task_runs"] = "\n".join(
            json.dumps(t.model_dump(mode="json"), default=str) for t in task_runs
        )
        flow_runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))
        )
        out["prefect:flow_runs"] = "\n".join(
            json.dumps(f.model_dump(mode="json"), default=str) for f in flow_runs
        )
        out["prefect:log_count"] = str(len(logs))
        out["prefect:artifact_count"] = str(len(artifacts))
    return out


def prefect_texts(flow_run_ids: list[str]) -> dict[str, str]:
    return asyncio.run(_prefect_texts(flow_run_ids))


def s3_texts(s3: Any, bucket: str) -> dict[str, str]:
    """Every key, every object's user metadata, and the body of every JSON object."""
    out: dict[str, str] = {}
    for key in list_keys(s3, bucket):
        head = s3.head_object(Bucket=bucket, Key=key)
        text = json.dumps(head.get("Metadata", {})) + " " + head.get("ContentType", "")
        if key.endswith((".json", ".jsonl")):
            text += "\n" + s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        out[f"s3://{bucket}/{key}"] = key + " " + text
    return out


def file_texts(*roots: Path) -> dict[str, str]:
    """Bytes of every file under the roots (ledger SQLite, Prefect result storage, logs)."""
    out: dict[str, str] = {}
    for root in roots:
        if not root.exists():
            continue
        paths = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in paths:
            with contextlib.suppress(OSError):
                out[str(path)] = path.read_bytes().decode("utf-8", "replace")
    return out


def find_secrets(texts: dict[str, str], secrets: Iterable[str]) -> list[str]:
    """Where any secret (or its first 12 characters) appears: ``source: secret[:6]…``."""
    hits = []
    for secret in secrets:
        if not secret:
            continue
        probes = {secret, secret[:12]} if len(secret) >= 16 else {secret}
        for source, text in texts.items():
            if any(p in text for p in probes):
                hits.append(f"{source}: {secret[:6]}…")
    return hits


# --------------------------------------------------------------------------- the chaos run


MODERATION_WORD = "forbidden"
WEBHOOK_SECRET = "whsec_chaos_3f9a1c7e5b2d4a6f8e0c"
WEBHOOK_SECRET_OLD = "whsec_chaos_previous_0b1d3f5a7c9e"
CLIENT_TIMEOUT = 3.0  # the credentials block's HTTP timeout: timeout_after_create waits longer


def chaos_faults(n: int) -> list[dict[str, Any]]:
    """Fault rules for a batch of ``n`` items, spread over the run with ``skip``."""
    k = max(1, n // 25)

    def at(fraction: float) -> int:
        return int(n * fraction)

    return [
        {"kind": "error_before_create", "status": 503, "times": k, "skip": at(0.05)},
        {"kind": "error_after_create", "status": 502, "times": k, "skip": at(0.10)},
        {"kind": "drop_after_create", "times": k, "skip": at(0.15)},
        {
            "kind": "timeout_after_create",
            "times": k,
            "skip": at(0.20),
            "delay": CLIENT_TIMEOUT + 1.5,
        },
        {"kind": "upstream_failure", "times": k, "skip": at(0.25)},
        {"kind": "empty_output", "times": k, "skip": at(0.30)},
        {"kind": "http_error", "endpoint": "get_task", "status": 500, "times": 2 * k, "skip": 5},
        {"kind": "http_error", "endpoint": "download", "status": 503, "times": k, "skip": 3},
        {"kind": "rate_limit_burst", "endpoint": "any", "times": 3 * k, "skip": at(1.0)},
        {"kind": "slow_download", "bytes_per_second": 40_000, "times": k, "skip": at(0.35)},
        {"kind": "truncated_download", "fraction": 0.4, "times": k, "skip": at(0.45)},
    ]


WEBHOOK_FAULTS: list[dict[str, Any]] = [
    {"kind": "webhook_lost", "times": 2},
    {"kind": "webhook_duplicate", "times": 2, "skip": 2, "delay": 0.05},
    {"kind": "webhook_bad_signature", "times": 1, "skip": 4},
    {"kind": "webhook_delayed", "times": 1, "skip": 5, "delay": 0.5},
    {"kind": "webhook_out_of_order", "times": 1, "skip": 6, "delay": 1.0},
]


@dataclass
class ChaosResult:
    items: int
    webhook_items: int
    invariants: Invariants
    faults_fired: dict[str, int]
    http_errors_served: dict[str, int]
    prefect_retries: int
    flow_runs: int
    flow_crashes: list[str]
    rerun_new_tasks: int
    recovered_by_rerun: int
    first_pass_failed_reasons: dict[str, int]
    s3_restart_seconds: float | None
    s3_objects_before_restart_kept: bool
    webhook: dict[str, Any]
    secret_hits: list[str]
    secret_sources: int
    log_lines: int
    artifacts: int
    wall_seconds: float
    batch_seconds: float
    status_rows: list[dict[str, Any]] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        inv = self.invariants
        return {
            "items": self.items,
            "manifest_lines": inv.lines,
            "broken_lines_reported": inv.broken_reported,
            "persisted": inv.persisted,
            "failed_terminal": inv.failed,
            "failed_reasons": dict(inv.failed_reasons),
            "lost": inv.lost,
            "billable_tasks": inv.billable_tasks,
            "fresh_attempts_after_remote_failure": inv.fresh_attempts,
            "duplicates": inv.duplicates,
            "objects_sha256_checked": inv.objects_checked,
            "sha256_mismatches": inv.sha_mismatches,
            "items_given_another_items_task": inv.wrong_task,
            "tasks_shared_by_two_items": inv.shared_tasks,
            "billed_tasks_not_collected": inv.orphaned_paid,
            "billed_usd": str(inv.billed),
            "faults_fired": self.faults_fired,
            "http_errors_served": self.http_errors_served,
            "prefect_task_retries": self.prefect_retries,
            "flow_runs": self.flow_runs,
            "flow_crashes": self.flow_crashes,
            "rerun_new_tasks": self.rerun_new_tasks,
            "items_recovered_by_rerun": self.recovered_by_rerun,
            "first_pass_failed_reasons": self.first_pass_failed_reasons,
            "s3_restart_seconds": self.s3_restart_seconds,
            "s3_objects_before_restart_kept": self.s3_objects_before_restart_kept,
            "webhook_leg": self.webhook,
            "secret_hits": self.secret_hits,
            "secret_sources_searched": self.secret_sources,
            "prefect_log_lines": self.log_lines,
            "prefect_artifacts": self.artifacts,
            "batch_seconds": round(self.batch_seconds, 1),
            "wall_seconds": round(self.wall_seconds, 1),
            "problems": self.invariants.problems[:20],
        }


class _S3Restarter(threading.Thread):
    """Restarts S3 once, as soon as ``threshold`` items have persisted status objects."""

    def __init__(self, server: Any, bucket: str, prefix: str, threshold: int) -> None:
        super().__init__(daemon=True)
        self.server, self.bucket, self.prefix, self.threshold = server, bucket, prefix, threshold
        self.stop_event = threading.Event()
        self.seconds: float | None = None
        self.keys_before: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            s3 = self.server.client()
            while not self.stop_event.is_set():
                keys = list_keys(s3, self.bucket, self.prefix)
                if sum(k.endswith(".persisted.json") for k in keys) >= self.threshold:
                    self.keys_before = keys
                    self.seconds = restart_s3(self.server)
                    return
                time.sleep(0.2)
        except BaseException as exc:
            self.error = exc


async def _batch_state(**kwargs: Any) -> Any:
    from prefect_eggapi.flows import batch_generate

    return await batch_generate(**kwargs, return_state=True)


def _flow_outcome(state: Any) -> tuple[str, Any, BaseException | None]:
    import inspect

    run_id = str(state.state_details.flow_run_id)
    try:
        value = state.result(raise_on_failure=True)
        if inspect.isawaitable(value):
            value = asyncio.run(value)
        return run_id, value, None
    except BaseException as exc:
        return run_id, None, exc


def _webhook_leg(
    emulator: Any, api_key: str, store: Any, tmp: Path, count: int
) -> tuple[dict[str, Any], list[str]]:
    """Tasks with a webhook_url to a live verified receiver, under webhook faults."""
    import uvicorn
    from prefect import flow
    from pydantic import SecretStr

    from prefect_eggapi.client.polling import PollPolicy
    from prefect_eggapi.client.types import GenerateRequest
    from prefect_eggapi.credentials import EggAPICredentials
    from prefect_eggapi.tasks import download_outputs, submit_generation, wait_for_task
    from prefect_eggapi.webhooks.receiver import EggAPIReconciler, WebhookReceiver
    from prefect_eggapi.webhooks.signals import SQLiteSignals

    creds = EggAPICredentials(
        api_key=SecretStr(api_key),
        base_url=emulator.base_url,
        webhook_secrets=[SecretStr(WEBHOOK_SECRET), SecretStr(WEBHOOK_SECRET_OLD)],
    )
    signals_path = tmp / "chaos-signals.sqlite"
    receiver = WebhookReceiver(
        creds.webhook_secrets,
        processor=EggAPIReconciler(creds),
        signals=SQLiteSignals(signals_path),
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(receiver.app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 15, "the webhook receiver")
    url = f"http://127.0.0.1:{port}{receiver.path}"
    emulator.clear_faults()
    emulator.add_faults(WEBHOOK_FAULTS)
    poll = PollPolicy(initial_interval=1.0, max_interval=2.0, min_interval=0.5, jitter=0.1)

    @flow(name="eggapi-chaos-webhooks")
    def webhook_flow() -> list[str]:
        signals = SQLiteSignals(signals_path)
        uris = []
        futures = []
        for i in range(count):
            req = GenerateRequest(
                model="nanobanana", prompt=f"chaos webhook item {i}", webhook_url=url
            )
            futures.append(submit_generation.submit(req, credentials=creds, key=f"chaos-wh/{i}"))
        for fut in futures:
            done = wait_for_task(
                fut.result(), credentials=creds, timeout=60, poll=poll, signals=signals
            )
            stored = download_outputs(done, store, credentials=creds, image_artifacts=False)
            uris += [s.uri for s in stored]
        return uris

    try:
        state = webhook_flow(return_state=True)
        run_id = str(state.state_details.flow_run_id)
        uris = state.result()
        tasks = [t for t in emulator.created_tasks(api_key) if t["webhook_url"]]
        ids = {t["task_id"] for t in tasks}

        def settled() -> bool:
            records = [r for r in emulator.webhook_deliveries() if r["task_id"] in ids]
            finished = {r["task_id"] for r in records if r.get("outcome") not in (None, "pending")}
            return finished >= ids

        wait_until(settled, 30, "every webhook delivery to be recorded")
        deliveries = [r for r in emulator.webhook_deliveries() if r["task_id"] in ids]
        stats = dict(receiver.stats)
        return (
            {
                "tasks": len(tasks),
                "persisted_objects": len(uris),
                "deliveries": len(deliveries),
                "delivery_outcomes": dict(Counter(str(r.get("outcome")) for r in deliveries)),
                "receiver_stats": stats,
                "processed_at_most_once_per_task": stats.get("processed", 0) <= len(ids),
            },
            [run_id],
        )
    finally:
        server.should_exit = True
        thread.join(10)
        emulator.clear_faults()


def run_chaos(
    *,
    n: int,
    emulator: Any,
    api_key: str,
    s3_server: Any,
    bucket: str,
    workdir: Path,
    ledger_dir: Path,
    prefect_home: Path | None = None,
    concurrency: int = 12,
    webhook_items: int = 8,
    log: Callable[[str], None] = lambda _: None,
) -> ChaosResult:
    """The chaos run: ``n`` prompts through ``batch_generate`` under every fault kind.

    The caller provides a running emulator (admin API), a restartable ``LocalS3`` (with its own
    data dir), a bucket, and the process environment (EGGAPI_* / AWS_* / ledger / Prefect API).
    """
    from pydantic import SecretStr

    from prefect_eggapi.credentials import EggAPICredentials
    from prefect_eggapi.flows.batch import BatchError
    from prefect_eggapi.storage import OutputStore

    started = time.monotonic()
    prefix = "chaos"
    run_key = f"chaos-{n}-{int(time.time())}"
    emulator.set_config(
        pending_seconds=0.05,
        processing_seconds=0.3,
        rate_limit_per_second=200,
        webhook_secret=WEBHOOK_SECRET,
        moderation_word=MODERATION_WORD,
    )
    block = f"chaos-credentials-{n}"
    EggAPICredentials(
        api_key=SecretStr(api_key),
        base_url=emulator.base_url,
        timeout_seconds=CLIENT_TIMEOUT,
        webhook_secrets=[SecretStr(WEBHOOK_SECRET)],
    ).save(block, overwrite=True)

    moderated = max(2, n // 25)
    rows: list[dict[str, Any] | str] = []
    prompts: dict[str, str] = {}
    for i in range(n):
        word = f" {MODERATION_WORD} scene" if i % (n // moderated) == n // moderated - 1 else ""
        prompt = f"chaos item {i} a paper crane{word}"
        prompts[f"c-{i:04d}"] = prompt
        rows.append({"id": f"c-{i:04d}", "prompt": prompt})
    broken = [
        "{not json",
        json.dumps({"id": "bad-model", "prompt": "x", "model": "dall-e"}),
        json.dumps({"id": "c-0000", "prompt": "duplicate id"}),
        json.dumps({"id": "no-prompt"}),
        json.dumps({"id": "bad-url", "prompt": "x", "image_urls": ["ftp://nope/x.png"]}),
    ]
    for j, line in enumerate(broken):
        rows.insert(1 + j * (n // len(broken)), line)
    path = write_manifest(workdir / "chaos.jsonl", rows)

    emulator.clear_faults()
    emulator.add_faults(chaos_faults(n))
    restarter = _S3Restarter(s3_server, bucket, prefix, threshold=max(3, n // 3))
    restarter.start()

    flow_runs: list[str] = []
    crashes: list[str] = []
    summary = None
    batch_started = time.monotonic()

    def run_batch() -> Any:
        return asyncio.run(
            _batch_state(
                manifest=path,
                concurrency=concurrency,
                prefix=prefix,
                run_key=run_key,
                credentials_block=block,
                fail_on_item_error=False,
            )
        )

    for attempt in range(3):
        state = run_batch()
        run_id, summary, exc = _flow_outcome(state)
        flow_runs.append(run_id)
        if exc is None:
            break
        if isinstance(exc, BatchError):
            break
        crashes.append(f"run {attempt + 1}: {type(exc).__name__}: {str(exc)[:300]}")
        log(f"flow run crashed, rerunning: {crashes[-1]}")
        restarter.join(60)  # a crash during the restart: rerun once S3 is back
    batch_seconds = time.monotonic() - batch_started
    restarter.stop_event.set()
    restarter.join(90)
    if restarter.error is not None:
        raise restarter.error
    log(f"batch done in {batch_seconds:.1f}s; S3 restart took {restarter.seconds}")

    emulator.clear_faults()

    s3 = s3_server.client()
    status_key = f"{prefix}/batches/{run_key}/status.jsonl"
    status_rows = read_status(s3, bucket, status_key)
    kept = all(k in set(list_keys(s3, bucket)) for k in restarter.keys_before)

    # A rerun of the finished batch pays for nothing.
    before = len(emulator.created_tasks(api_key))
    run_id, _, _ = _flow_outcome(run_batch())
    flow_runs.append(run_id)
    rerun_new = len(emulator.created_tasks(api_key)) - before
    # The invariants are about the final state: after that rerun (items that failed on a
    # retryable error, e.g. S3 down longer than the item's retries, are retried by it).
    persisted_before = sum(r["status"] == "persisted" for r in status_rows)
    failed_rows = [r for r in status_rows if r["status"] == "failed"]
    first_pass = dict(Counter((r.get("error") or {}).get("type", "?") for r in failed_rows))
    status_rows = read_status(s3, bucket, status_key)
    recovered = sum(r["status"] == "persisted" for r in status_rows) - persisted_before

    invariants = check_invariants(
        emulator=emulator,
        s3=s3,
        bucket=bucket,
        status_rows=status_rows,
        prompts_by_id=prompts,
        broken_lines=len(broken),
        api_key=api_key,
    )
    for row in status_rows:  # terminal failures must carry a terminal reason
        if row["status"] == "failed" and row["error"].get("classification") != "terminal":
            invariants.problems.append(f"{row['id']}: failed but not terminal: {row['error']}")

    store = OutputStore(s3, bucket, prefix="chaos-webhooks")
    webhook, wh_runs = _webhook_leg(emulator, api_key, store, workdir, webhook_items)
    flow_runs += wh_runs

    audit = emulator.audit()  # the fault log survives clear_faults(): batch + webhook leg
    faults_fired = dict(Counter(f["kind"] for f in audit["faults_fired"]))
    errors_served: Counter[str] = Counter()
    for endpoint, statuses in audit["statuses"].items():
        for status, count in statuses.items():
            if int(status) >= 400:
                errors_served[f"{endpoint}:{status}"] += count

    texts = prefect_texts(flow_runs)
    log_lines = int(texts.pop("prefect:log_count"))
    artifacts = int(texts.pop("prefect:artifact_count"))
    texts.update(s3_texts(s3, bucket))
    texts.update(file_texts(ledger_dir, workdir))
    if prefect_home is not None:
        texts.update(file_texts(prefect_home / "storage"))
    texts["exceptions"] = "\n".join(crashes) + json.dumps(
        [r.get("error") for r in status_rows], default=str
    )
    if summary is not None:
        texts["result:summary"] = summary.model_dump_json()
    hits = find_secrets(texts, [api_key, WEBHOOK_SECRET, WEBHOOK_SECRET_OLD])

    retries = 0
    with contextlib.suppress(Exception):
        retries = asyncio.run(_retries(flow_runs))
    return ChaosResult(
        items=n,
        webhook_items=webhook_items,
        invariants=invariants,
        faults_fired=faults_fired,
        http_errors_served=dict(errors_served),
        prefect_retries=retries,
        flow_runs=len(flow_runs),
        flow_crashes=crashes,
        rerun_new_tasks=rerun_new,
        recovered_by_rerun=recovered,
        first_pass_failed_reasons=first_pass,
        s3_restart_seconds=None if restarter.seconds is None else round(restarter.seconds, 1),
        s3_objects_before_restart_kept=kept and bool(restarter.keys_before),
        webhook=webhook,
        secret_hits=hits,
        secret_sources=len(texts),
        log_lines=log_lines,
        artifacts=artifacts,
        wall_seconds=time.monotonic() - started,
        batch_seconds=batch_seconds,
        status_rows=status_rows,
    )


async def _retries(flow_run_ids: list[str]) -> int:
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    ids = [uuid.UUID(i) for i in flow_run_ids]
    total = 0
    async with get_client() as client:
        offset = 0
        while True:
            page = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)),
                limit=200,
                offset=offset,
            )
            total += sum(max(0, (t.run_count or 0) - 1) for t in page)
            if len(page) < 200:
                return total
            offset += 200


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def without(*names: str) -> Iterator[None]:
    old = {k: os.environ.pop(k) for k in names if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(old)
