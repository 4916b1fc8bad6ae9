"""Peak memory while persisting 4k outputs to S3 stays flat as the number of images grows.

Starts the local stack (emulator with realistic random-pixel PNGs + SeaweedFS), creates
nanobanana-pro 4k tasks, then persists N of them (download -> S3, the pipeline's persist step:
``download_outputs``) in a fresh process for each N, and prints that process's peak RSS before and
after. Peak RSS never goes down within a process, so each N runs in its own. Prints figures;
asserts nothing.

    python bench/persist_memory.py            # N = 2 and N = 8
    python bench/persist_memory.py 1 4 16     # other counts
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(task_ids: list[str], warmup_id: str) -> None:
    from prefect_eggapi.client import EggAPIClient
    from prefect_eggapi.storage import OutputStore, S3Settings
    from prefect_eggapi.tasks import download_outputs

    settings = S3Settings.from_env()
    store = OutputStore.from_settings(settings)
    variant = os.environ.get("BENCH_VARIANT", "")
    if variant == "nothreads":
        from prefect_eggapi.storage import build_s3_client, make_transfer_config

        config = make_transfer_config()
        config.use_threads = False
        store = OutputStore(build_s3_client(settings), settings.bucket, settings.prefix,
                            transfer_config=config)
    trim = None
    if variant == "trim":
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim
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
                trim(0)
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


def main(counts: list[int]) -> None:
    from prefect_eggapi.client import EggAPIClient
    from prefect_eggapi.stack import LocalStack

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
        results = []
        for ids in groups:
            run = subprocess.run(
                [sys.executable, __file__, "--child", warmup.id, *ids],
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            if run.returncode != 0:
                raise SystemExit(f"child failed:\n{run.stderr[-3000:]}")
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
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
        f"peak-RSS growth with {last['n']} images vs {first['n']}: {g_last - g_first:+.1f} MB "
        f"for {(last['bytes'] - first['bytes']) / 2**20:.0f} MiB more data "
        f"(flat = bounded memory independent of the number of images)"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[3:], sys.argv[2])
    else:
        main([int(a) for a in sys.argv[1:]] or [2, 8])
