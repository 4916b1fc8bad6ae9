"""Peak memory while persisting 4k outputs to S3 stays flat as the number of images grows.

Starts the local stack (emulator with realistic random-pixel PNGs + SeaweedFS), creates
nanobanana-pro 4k tasks, then persists N of them (download -> S3, the pipeline's persist step:
``download_outputs``) in a fresh process for each N, and prints that process's peak RSS before and
after. Peak RSS never goes down within a process, so each N runs in its own. Prints figures;
asserts nothing.

    python bench/persist_memory.py              # N = 2 and N = 8, the pipeline's own path
    python bench/persist_memory.py 1 4 16       # other counts
    python bench/persist_memory.py --compare    # also three upload variants, for storage.py

History: with one ``upload_fileobj`` per object, growth from N=2 to N=8 was +106..121 MB (each
call starts a new s3transfer thread pool and glibc gives the new threads malloc arenas that keep
their freed memory). ``OutputStore`` now reuses one TransferManager: measured N=2/8/24 (76 / 289 /
872 MiB of PNGs) -> growth 55 / 75 / 78 MB, i.e. it plateaus once the pool's threads exist.
``--compare`` also runs ``use_threads=False`` and ``malloc_trim`` variants.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from typing import Any


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


VARIANTS = {
    "default": "what the pipeline does (OutputStore.from_settings: one shared TransferManager)",
    "nothreads": "TransferConfig(use_threads=False): parts uploaded from the calling thread",
    "trim": "default + glibc malloc_trim(0) after each image",
}


def _store_for(variant: str) -> tuple[Any, Any]:
    """The store to measure, and an optional function to call after each image."""
    from prefect_eggapi.storage import (
        OutputStore,
        S3Settings,
        build_s3_client,
        make_transfer_config,
    )

    settings = S3Settings.from_env()
    store = OutputStore.from_settings(settings)
    if variant == "nothreads":
        config = make_transfer_config()
        config.use_threads = False
        client = build_s3_client(settings)
        store = OutputStore(client, settings.bucket, settings.prefix, transfer_config=config)
    elif variant == "trim":
        import ctypes

        return store, partial(ctypes.CDLL("libc.so.6").malloc_trim, 0)
    return store, None


def child(task_ids: list[str], warmup_id: str) -> None:
    from prefect_eggapi.client import EggAPIClient
    from prefect_eggapi.tasks import download_outputs

    store, trim = _store_for(os.environ.get("BENCH_VARIANT", "default"))
    with EggAPIClient(os.environ["EGGAPI_API_KEY"], os.environ["EGGAPI_BASE_URL"]) as client:
        # Warm up imports, connection pools and the S3 transfer machinery on a small image.
        download_outputs.fn(client.get_task(warmup_id), store, image_artifacts=False)
        before = peak_mb()
        started = time.monotonic()
        sizes = []
        for task_id in task_ids:
            stored = download_outputs.fn(client.get_task(task_id), store, image_artifacts=False)
            sizes.extend(s.size for s in stored)
            if trim is not None:
                trim()
            assert all(s.created for s in stored) and (stored[0].width, stored[0].height) == (
                5504,
                3072,
            )
    print(
        json.dumps(
            {
                "n": len(task_ids),
                "before_mb": round(before, 1),
                "after_mb": round(peak_mb(), 1),
                "bytes": sum(sizes),
                "seconds": round(time.monotonic() - started, 2),
            }
        )
    )


def measure(counts: list[int], variants: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Peak-RSS figures per variant and count (each count in a fresh child process)."""
    from prefect_eggapi.client import EggAPIClient
    from prefect_eggapi.testing.stack import LocalStack

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["EGGAPI_LEDGER_DIR"] = tempfile.mkdtemp(prefix="eggapi-bench-ledger-")
    with LocalStack(
        bucket="eggapi-bench",
        pending_seconds=0,
        processing_seconds=0,
        png_noise=True,
        rate_limit_per_second=None,
        balance="1000",
    ) as stack:
        env = {**os.environ, **stack.env()}
        with EggAPIClient(env["EGGAPI_API_KEY"], env["EGGAPI_BASE_URL"]) as client:
            warmup = client.generate(model="nanobanana", prompt="warm-up")
            client.wait_for_task(warmup, timeout=60)
            groups = []
            for n in counts:
                ids = []
                for i in range(n):
                    t = client.generate(
                        model="nanobanana-pro", prompt=f"bench {n}-{i}", resolution="4k"
                    )
                    ids.append(client.wait_for_task(t, timeout=120).id)
                groups.append(ids)
        report: dict[str, list[dict[str, Any]]] = {}
        for variant in variants:
            results = []
            for ids in groups:
                run = subprocess.run(
                    [sys.executable, __file__, "--child", warmup.id, *ids],
                    # A prefix per variant: the same tasks are persisted afresh each time.
                    env={**env, "BENCH_VARIANT": variant, "EGGAPI_S3_PREFIX": f"bench-{variant}"},
                    capture_output=True,
                    text=True,
                    timeout=900,
                )
                if run.returncode != 0:
                    raise SystemExit(f"child failed:\n{run.stderr[-3000:]}")
                results.append(json.loads(run.stdout.strip().splitlines()[-1]))
            report[variant] = results
    return report


def main(counts: list[int], variants: list[str]) -> None:
    report = measure(counts, variants)
    for variant, results in report.items():
        print(f"\n[{variant}] {VARIANTS[variant]}")
        print(f"{'N 4k images':>12} {'MiB stored':>11} {'peak RSS before':>16} {'after':>8} "
              f"{'growth':>8} {'seconds':>8}")  # fmt: skip
        for r in results:
            growth = r["after_mb"] - r["before_mb"]
            print(
                f"{r['n']:>12} {r['bytes'] / 2**20:>11.0f} {r['before_mb']:>13.1f} MB "
                f"{r['after_mb']:>5.1f} MB {growth:>5.1f} MB {r['seconds']:>8.1f}"
            )
        first, last = results[0], results[-1]
        g_first = first["after_mb"] - first["before_mb"]
        g_last = last["after_mb"] - last["before_mb"]
        print(
            f"peak-RSS growth with {last['n']} images vs {first['n']}: "
            f"{g_last - g_first:+.1f} MB for {(last['bytes'] - first['bytes']) / 2**20:.0f} MiB "
            "more data (flat = memory independent of the number of images)"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[3:], sys.argv[2])
    else:
        args = sys.argv[1:]
        compare = "--compare" in args
        numbers = [int(a) for a in args if a != "--compare"] or [2, 8]
        main(numbers, list(VARIANTS) if compare else ["default"])
