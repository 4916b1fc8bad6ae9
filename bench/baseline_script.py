"""The hand-written baseline: asyncio + httpx + boto3, no Prefect, no prefect_eggapi.

It does the same work per prompt as one item of the batch flow: ``POST /v1/generate``, poll
``GET /v1/tasks/{id}`` with the schedule the library used before its poll board (1 s,
x1.5, <= 5 s, +-10 % jitter, first poll of a phase at 0.9 x the learned (EWMA, alpha 0.3) queue or
processing time), stream each output through a sha256 into a spooled temp file (4 MiB in memory)
and upload it to S3 with metadata (sha256, size, format, task id, index, model) through one shared
boto3 client and TransferManager settings like the library's (8 MiB parts, 4 threads). At most
``concurrency`` prompts are in flight. What it does *not* do (and the library does): a submission
ledger, budget checks, idempotency LIST/HEAD before upload, PNG dimension sniffing, per-item
status objects and a status manifest, Prefect task runs, logs and events.

With ``webhook_url`` and a signals file it waits like the library's webhook mode: a SQLite row
written by the receiver wakes the wait (one GET), polling stays as a 15 s..60 s backstop.

Standalone, against a running stack (``prefect-eggapi stack`` exports)::

    python bench/baseline_script.py 200 --concurrency 50
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import httpx
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

TERMINAL = {"completed", "failed"}
MiB = 1024 * 1024


# --------------------------------------------------------------------------- the poll policy


@dataclass
class Learned:
    """EWMA of queue and processing seconds of finished tasks (shared by all waits)."""

    alpha: float = 0.3
    queue: float | None = None
    processing: float | None = None

    def observe(self, task: dict[str, Any]) -> None:
        if task.get("status") != "completed":
            return
        try:
            created = datetime.fromisoformat(task["created_at"].replace("Z", "+00:00"))
            started = datetime.fromisoformat(task["started_at"].replace("Z", "+00:00"))
            completed = datetime.fromisoformat(task["completed_at"].replace("Z", "+00:00"))
        except (KeyError, TypeError, ValueError):
            return
        self.queue = self._mix(self.queue, (started - created).total_seconds())
        self.processing = self._mix(self.processing, (completed - started).total_seconds())

    def _mix(self, old: float | None, new: float) -> float | None:
        if new < 0:
            return old
        return new if old is None else old + self.alpha * (new - old)


@dataclass
class Schedule:
    """Same numbers as prefect_eggapi.client.polling.PollPolicy() (or its backstop)."""

    learned: Learned
    initial: float = 1.0
    maximum: float = 5.0
    multiplier: float = 1.5
    jitter: float = 0.1
    fraction: float = 0.9
    learn: bool = True
    phase: str | None = None
    interval: float = 1.0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self, status: str) -> float:
        if status != self.phase:
            self.phase = status
            learned = {"pending": self.learned.queue, "processing": self.learned.processing}.get(
                status
            )
            self.interval = self.initial
            base = learned * self.fraction if learned and self.learn else self.initial
        else:
            self.interval = min(self.maximum, self.interval * self.multiplier)
            base = self.interval
        spread = base * self.jitter
        return max(0.05, base + self.rng.uniform(-spread, spread))


# --------------------------------------------------------------------------- webhook signals


class SignalFile:
    """Reads the receiver's SQLite signal rows (table ``signals``: task_id, status, ...)."""

    def __init__(self, path: str, poll_interval: float = 0.05) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self.seen: set[str] = set()
        self.waiters: dict[str, asyncio.Event] = {}
        self.rowid = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        conn = sqlite3.connect(self.path, check_same_thread=False)
        try:
            while True:
                rows = conn.execute(
                    "SELECT rowid, task_id FROM signals WHERE rowid > ? ORDER BY rowid",
                    (self.rowid,),
                ).fetchall()
                for rowid, task_id in rows:
                    self.rowid = max(self.rowid, rowid)
                    self.seen.add(task_id)
                    event = self.waiters.get(task_id)
                    if event is not None:
                        event.set()
                await asyncio.sleep(self.poll_interval)
        finally:
            conn.close()

    async def wait(self, task_id: str, timeout: float) -> bool:
        if task_id in self.seen:
            return True
        event = self.waiters.setdefault(task_id, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self.waiters.pop(task_id, None)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


# --------------------------------------------------------------------------- the work


def s3_client() -> Any:
    config = Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"mode": "standard", "total_max_attempts": 5},
        signature_version="s3v4",
        s3={"addressing_style": "path"},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
        config=config,
    )


async def run(
    prompts: list[str],
    *,
    base_url: str,
    api_key: str,
    bucket: str,
    prefix: str,
    concurrency: int,
    webhook_url: str | None = None,
    signals_path: str | None = None,
    timeout: float = 600,
) -> dict[str, Any]:
    """Generate one image per prompt and persist it; returns per-task timings and counts."""
    headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
    s3 = s3_client()
    transfer = TransferConfig(
        multipart_threshold=16 * MiB, multipart_chunksize=8 * MiB, max_concurrency=4
    )
    learned = Learned()
    semaphore = asyncio.Semaphore(concurrency)
    persisted: dict[str, float] = {}
    polls: dict[str, int] = {"pending": 0, "processing": 0, "completed": 0, "failed": 0}
    signals = SignalFile(signals_path) if signals_path else None
    if signals is not None:
        signals.start()

    async with (
        httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30, limits=limits) as api,
        httpx.AsyncClient(timeout=60, limits=limits) as files,
    ):

        async def get_task(task_id: str) -> dict[str, Any]:
            for attempt in range(5):
                response = await api.get(f"/v1/tasks/{task_id}")
                if response.status_code == 429 or response.status_code >= 500:
                    await asyncio.sleep(0.5 * 2**attempt)
                    continue
                response.raise_for_status()
                task: dict[str, Any] = response.json()["data"]
                polls[task["status"]] = polls.get(task["status"], 0) + 1
                return task
            response.raise_for_status()
            raise RuntimeError("unreachable")

        async def persist(task: dict[str, Any], index: int, url: str) -> None:
            fh = tempfile.SpooledTemporaryFile(max_size=4 * MiB)  # noqa: SIM115
            try:
                # A GET on a pooled connection the server just closed fails with ReadError (seen
                # once in 10,000); the library retries downloads, so the script does too.
                for attempt in range(3):
                    digest = hashlib.sha256()
                    size = 0
                    fh.seek(0)
                    fh.truncate()
                    try:
                        async with files.stream("GET", url) as response:
                            response.raise_for_status()
                            async for chunk in response.aiter_bytes(64 * 1024):
                                digest.update(chunk)
                                fh.write(chunk)
                                size += len(chunk)
                        break
                    except httpx.TransportError:
                        if attempt == 2:
                            raise
                fh.seek(0)
                key = f"{prefix}/{task['id']}/{index}.png"
                extra = {
                    "ContentType": "image/png",
                    "Metadata": {
                        "sha256": digest.hexdigest(),
                        "size": str(size),
                        "format": "png",
                        "eggapi-task-id": task["id"],
                        "output-index": str(index),
                        "model": task.get("model", ""),
                    },
                }
                await asyncio.to_thread(
                    s3.upload_fileobj, fh, bucket, key, ExtraArgs=extra, Config=transfer
                )
            finally:
                fh.close()

        async def one(prompt: str) -> None:
            async with semaphore:
                payload = {
                    "model": "nanobanana",
                    "prompt": prompt,
                    "aspect_ratio": "16:9",
                    "num_outputs": 1,
                }
                if webhook_url:
                    payload["webhook_url"] = webhook_url
                for attempt in range(5):
                    response = await api.post("/v1/generate", json=payload)
                    if response.status_code != 429:
                        break
                    await asyncio.sleep(0.5 * 2**attempt)
                response.raise_for_status()
                task = response.json()["data"]
                schedule = Schedule(
                    learned,
                    **(
                        {"initial": 15.0, "maximum": 60.0, "multiplier": 2.0, "learn": False}
                        if signals
                        else {}
                    ),
                )
                deadline = time.monotonic() + timeout
                woken = False
                while task["status"] not in TERMINAL:
                    if time.monotonic() > deadline:
                        raise TimeoutError(task["id"])
                    delay = schedule.next_delay(task["status"])
                    if signals is not None and not woken:
                        woken = await signals.wait(task["id"], delay)
                    else:
                        await asyncio.sleep(delay)
                    task = await get_task(task["id"])
                learned.observe(task)
                if task["status"] != "completed":
                    raise RuntimeError(f"task {task['id']} failed: {task.get('error')}")
                output = task.get("output") or {}
                urls = output.get("urls") or [output["url"]]
                for index, url in enumerate(urls):
                    await persist(task, index, url)
                persisted[task["id"]] = time.time()

        try:
            await asyncio.gather(*(one(p) for p in prompts))
        finally:
            if signals is not None:
                signals.stop()
    return {"persisted_at": persisted, "images": len(persisted), "polls_by_status": polls}


# --------------------------------------------------------------------------- entry points


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measured run in this (fresh) process; CPU is this process's user + system time."""
    import resource

    prompts = [f"{spec['tag']} bench image {i}" for i in range(spec["n"])]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.time()
    result = asyncio.run(
        run(
            prompts,
            base_url=os.environ["EGGAPI_BASE_URL"],
            api_key=os.environ["EGGAPI_API_KEY"],
            bucket=os.environ["EGGAPI_S3_BUCKET"],
            prefix=spec.get("prefix", "baseline"),
            concurrency=spec["concurrency"],
            webhook_url=spec.get("webhook_url"),
            signals_path=spec.get("signals_path"),
        )
    )
    wall = time.time() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    result.update(
        wall=wall,
        started_at=started,
        cpu=(cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
        peak_rss_mb=cpu1.ru_maxrss / 1024,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("n", type=int, nargs="?", default=50)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    out = child({"n": args.n, "concurrency": args.concurrency, "tag": f"adhoc-{time.time():.0f}"})
    print(
        json.dumps({k: v for k, v in out.items() if k != "persisted_at"}, indent=1, sort_keys=True)
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _common import child_entry

        child_entry(child)
    else:
        main()
