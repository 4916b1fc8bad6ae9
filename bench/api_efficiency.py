"""Benches 2 and 3: API requests per image and completion -> persisted latency, polling vs webhooks.

One local stack per processing time; the emulator signs webhooks (``webhook_secret``) and a
``WebhookReceiver`` (uvicorn, free loopback port, ``SQLiteSignals``) runs in this process. Each
mode runs the library's own tasks in a Prefect flow in a fresh process (``asubmit_generation`` ->
``await_for_task`` -> ``adownload_outputs``, ``concurrency`` items at once, so later items poll
with learned phase durations like a real batch); webhook mode passes ``webhook_url`` and
``signals=`` (the wait then polls only as a 15 s..60 s backstop).

Requests per image = the emulator's audit, per endpoint (generate + get_task + list_tasks +
downloads; the receiver's re-read GET counts too), divided by images persisted. Latency = the
emulator's ``completed_at_unix`` -> the moment ``OutputStore.persist`` returned in the flow.

    python bench/api_efficiency.py [--n 16] [--concurrency 8] [--processing 3 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    api_requests,
    diff_counts,
    key_requests,
    local_stack,
    p50_p95,
    prefect_env,
    run_child,
)

from prefect_eggapi.testing.asgi import serve_asgi

SECRET = "whsec_bench_api_efficiency"
TWO_OUTPUTS = "webhooks, 2 outputs per task"
PENDING = 0.5


def measure(
    n: int = 16,
    concurrency: int = 8,
    processing: tuple[float, ...] = (3.0, 10.0),
    *,
    api_url: str | None = None,
    log_dir: Path | None = None,
) -> list[dict[str, Any]]:
    from prefect_eggapi.credentials import EggAPICredentials
    from prefect_eggapi.webhooks.receiver import EggAPIReconciler, WebhookReceiver
    from prefect_eggapi.webhooks.signals import SQLiteSignals

    rows = []
    for seconds in processing:
        with (
            local_stack(
                pending_seconds=PENDING, processing_seconds=seconds, rate_limit_per_second=None
            ) as stack,
            tempfile.TemporaryDirectory() as tmp,
        ):
            stack.emulator.set_config(webhook_secret=SECRET)
            signals_path = str(Path(tmp) / "signals.sqlite")
            signals = SQLiteSignals(signals_path)
            receiver = WebhookReceiver(
                [SECRET],
                processor=EggAPIReconciler(
                    EggAPICredentials(api_key=stack.api_key, base_url=stack.base_url)
                ),
                signals=signals,
            )
            with serve_asgi(receiver.app) as url:
                modes = ["polling", "webhooks"]
                if seconds == processing[0]:
                    modes.append(TWO_OUTPUTS)  # the re-read and the submit spread over 2 images
                for mode in modes:
                    home = Path(tempfile.mkdtemp(prefix="eggapi-bench-home-"))
                    env = {
                        **stack.env(),
                        **prefect_env(home, api_url),
                        "EGGAPI_LEDGER_DIR": str(home / "ledger"),
                        "EGGAPI_REQUESTS_PER_SECOND": "1000",
                    }
                    tag = f"{mode}-p{seconds:g}-{time.time_ns()}"
                    spec: dict[str, Any] = {
                        "flow": "tasks",
                        "n": n,
                        "concurrency": concurrency,
                        "tag": tag,
                        "name": tag,
                    }
                    if mode != "polling":
                        spec["webhook_url"] = url + receiver.path
                        spec["signals_path"] = signals_path
                    if mode == TWO_OUTPUTS:
                        spec["num_outputs"] = 2
                    before = key_requests(stack.emulator.audit(), stack.api_key)
                    out = run_child("overhead", spec, env, log_dir=log_dir)
                    # The receiver re-reads after answering: let the last re-reads land.
                    time.sleep(0.5)
                    audit = stack.emulator.audit()
                    counts = diff_counts(key_requests(audit, stack.api_key), before)
                    completed = {
                        t["task_id"]: t["completed_at_unix"]
                        for t in audit["tasks"]
                        if t.get("completed_at_unix")
                    }
                    lat = [
                        t - completed[k] for k, t in out["persisted_at"].items() if k in completed
                    ]
                    p50, p95 = p50_p95(lat)
                    received = {
                        sig.task_id: sig.received_at
                        for k in out["persisted_at"]
                        for sig in signals.get(k)[:1]
                    }
                    # Where webhook-mode latency goes: completion -> receiver, receiver -> S3.
                    to_receiver = [received[k] - completed[k] for k in received if k in completed]
                    to_s3 = [out["persisted_at"][k] - received[k] for k in received]
                    mine = {t for t in out["persisted_at"]}
                    delivered = sum(
                        1
                        for d in audit["webhook_deliveries"]
                        if d.get("task_id") in mine and d.get("outcome") == "delivered"
                    )
                    images = max(out["images"], 1)
                    row = {
                        "processing": seconds,
                        "pending": PENDING,
                        "mode": mode,
                        "images": out["images"],
                        "requests": counts,
                        "per_image": api_requests(counts) / images,
                        "polls_per_image": counts.get("get_task", 0) / images,
                        "polls_by_status": out["polls_by_status"],
                        "webhooks_delivered": delivered,
                        "lat_p50": p50,
                        "lat_p95": p95,
                        "to_receiver_p50": p50_p95(to_receiver)[0],
                        "receiver_to_s3_p50": p50_p95(to_s3)[0],
                        "wall": out["wall"],
                    }
                    rows.append(row)
                    print(
                        f"  api p={seconds:g}s {mode:<9} req/img {row['per_image']:.2f}"
                        f" (GET {row['polls_per_image']:.2f}) lat p50 {p50:.2f}s p95 {p95:.2f}s",
                        flush=True,
                    )
            receiver.processor.close()  # type: ignore[attr-defined]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--processing", type=float, nargs="+", default=[3.0, 10.0])
    args = parser.parse_args()
    rows = measure(args.n, args.concurrency, tuple(args.processing))
    print(
        f"{'processing':>10} {'mode':<9}{'req/image':>10}{'GET/image':>10}"
        f"{'p50 s':>8}{'p95 s':>8}  requests"
    )
    for r in rows:
        print(
            f"{r['processing']:>10g} {r['mode']:<9}{r['per_image']:>10.2f}"
            f"{r['polls_per_image']:>10.2f}{r['lat_p50']:>8.2f}{r['lat_p95']:>8.2f}  "
            f"{r['requests']}"
        )


if __name__ == "__main__":
    main()
