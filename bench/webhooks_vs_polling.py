"""Bench: polling vs webhook-woken waits, measured in one run against one emulator.

Both modes submit N tasks (same emulator timing: pending 0.5 s, processing 3 s by default), wait
for each in its own thread, and download the outputs. Each mode uses its own API key, so the
emulator's audit counts its requests separately: submit + task polls (including the receiver's
re-read GET in webhook mode) + list + downloads, per returned image. Webhook mode keeps a slow
backstop poll (15 s, growing to 60 s). Latency is from the emulator's completion time (audit
``completed_at_unix``) to the moment the wait returned.

    python bench/webhooks_vs_polling.py [--tasks 10] [--processing 3.0]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path

from prefect_eggapi.client import EggAPIClient
from prefect_eggapi.client.polling import PollPolicy
from prefect_eggapi.credentials import EggAPICredentials
from prefect_eggapi.testing.asgi import serve_asgi
from prefect_eggapi.testing.emulator import ApiKeyConfig, EmulatorConfig, EmulatorProcess
from prefect_eggapi.testing.emulator.config import key_id
from prefect_eggapi.webhooks.receiver import EggAPIReconciler, WebhookReceiver
from prefect_eggapi.webhooks.signals import SQLiteSignals

POLL_KEY = "egg_sk_bench_polling_000001"
HOOK_KEY = "egg_sk_bench_webhook_000001"
SECRET = "whsec_bench_secret"
# Webhook mode keeps polling only as a backstop for lost deliveries: slowly.
BACKSTOP = PollPolicy(initial_interval=15.0, max_interval=60.0)


def run_mode(
    emulator: EmulatorProcess,
    key: str,
    n: int,
    webhook_url: str | None,
    signals: SQLiteSignals | None,
    poll: PollPolicy | None = None,
) -> dict[str, float]:
    detected: dict[str, float] = {}
    images = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal images
        with EggAPIClient(key, emulator.base_url) as client:
            extra = {"webhook_url": webhook_url} if webhook_url else {}
            task = client.generate(model="nanobanana", prompt=f"bench image {i}", **extra)
            done = client.wait_for_task(task, timeout=120, poll=poll, signals=signals)
            seen = time.time()
            assert done.output is not None
            for url in done.output.all_urls:
                client.download(url, Path(tempfile.gettempdir()) / f"eggapi-bench-{done.id}.png")
            with lock:
                detected[done.id] = seen
                images += len(done.output.all_urls)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # staggered submissions, like a fan-out
    for t in threads:
        t.join()
    audit = emulator.audit()
    completed = {r["task_id"]: r["completed_at_unix"] for r in audit["tasks"]}
    latencies = sorted(detected[t] - completed[t] for t in detected)
    counts = audit["requests"].get(key_id(key), {})
    requests = sum(counts.get(ep, 0) for ep in ("generate", "get_task", "list_tasks", "download"))
    quantiles = statistics.quantiles(latencies, n=20, method="inclusive")
    return {
        "images": images,
        "requests": requests,
        "polls": counts.get("get_task", 0),
        "per_image": requests / max(images, 1),
        "p50": statistics.median(latencies),
        "p95": quantiles[18],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--processing", type=float, default=3.0)
    parser.add_argument("--pending", type=float, default=0.5)
    args = parser.parse_args()
    config = EmulatorConfig(
        api_keys={
            POLL_KEY: ApiKeyConfig(balance=Decimal("1000")),
            HOOK_KEY: ApiKeyConfig(balance=Decimal("1000")),
        },
        pending_seconds=args.pending,
        processing_seconds=args.processing,
        rate_limit_per_second=1000,
        webhook_secret=SECRET,
    )
    with tempfile.TemporaryDirectory() as tmp, EmulatorProcess(config) as emulator:
        signals = SQLiteSignals(Path(tmp) / "signals.sqlite")
        receiver = WebhookReceiver(
            [SECRET],
            processor=EggAPIReconciler(
                EggAPICredentials(api_key=HOOK_KEY, base_url=emulator.base_url)
            ),
            signals=signals,
        )
        with serve_asgi(receiver.app) as url:
            polling = run_mode(emulator, POLL_KEY, args.tasks, None, None)
            webhook = run_mode(
                emulator, HOOK_KEY, args.tasks, url + receiver.path, signals, BACKSTOP
            )
        deliveries = emulator.audit()["webhook_deliveries"]
    delivered = sum(1 for d in deliveries if d["outcome"] == "delivered")
    print(
        f"{args.tasks} tasks per mode; emulator pending {args.pending}s, processing "
        f"{args.processing}s; polling: default PollPolicy; webhook: signals + backstop poll "
        f"every {BACKSTOP.initial_interval:g}-{BACKSTOP.max_interval:g}s; "
        f"webhooks delivered: {delivered}"
    )
    print(
        f"{'mode':<10}{'images':>8}{'requests':>10}{'GET task':>10}{'req/image':>11}"
        f"{'p50 (s)':>10}{'p95 (s)':>10}"
    )
    for name, row in (("polling", polling), ("webhook", webhook)):
        print(
            f"{name:<10}{row['images']:>8.0f}{row['requests']:>10.0f}{row['polls']:>10.0f}"
            f"{row['per_image']:>11.2f}{row['p50']:>10.3f}{row['p95']:>10.3f}"
        )
    print(
        f"webhook/polling: requests per image x{webhook['per_image'] / polling['per_image']:.2f}, "
        f"p50 latency x{webhook['p50'] / max(polling['p50'], 1e-9):.3f}"
    )


if __name__ == "__main__":
    main()
