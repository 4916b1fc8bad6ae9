"""Peak memory while downloading 4 x 4k outputs: streaming client vs. reading whole bodies.

Each mode runs in its own fresh process (peak RSS is per process and never goes down), against
one emulator, on the same four completed tasks. Prints figures; asserts nothing.

    python bench/download_memory.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from decimal import Decimal
from pathlib import Path

KEY = "egg_sk_bench_memory_000001"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, base_url: str, urls: list[str]) -> None:
    import httpx

    from prefect_eggapi.client import EggAPIClient

    out = Path(tempfile.mkdtemp())
    with EggAPIClient(KEY, base_url) as client:
        client.list_tasks()  # warm up imports and the connection pool before the baseline
        before = peak_mb()
        sizes = []
        for i, url in enumerate(urls):
            if mode == "streaming":
                sizes.append(client.download(url, out / f"{i}.png").size)
            else:
                body = httpx.get(url, timeout=60).content  # what a naive client does
                (out / f"{i}.png").write_bytes(body)
                sizes.append(len(body))
    print(json.dumps({"mode": mode, "before_mb": before, "after_mb": peak_mb(), "sizes": sizes}))


def main() -> None:
    from prefect_eggapi.client import EggAPIClient
    from prefect_eggapi.testing.emulator import ApiKeyConfig, EmulatorConfig, EmulatorProcess

    config = EmulatorConfig(
        api_keys={KEY: ApiKeyConfig(balance=Decimal(10))},
        pending_seconds=0,
        processing_seconds=0,
        rate_limit_per_second=None,
        png_noise=True,
    )
    with EmulatorProcess(config) as emulator, EggAPIClient(KEY, emulator.base_url) as client:
        task = client.generate(
            model="nanobanana-pro", prompt="benchmark skyline", resolution="4k", num_outputs=4
        )
        urls = client.wait_for_task(task, timeout=60).output_urls
        results = []
        for mode in ("streaming", "whole-body"):
            run = subprocess.run(
                [sys.executable, __file__, "--child", mode, emulator.base_url, *urls],
                capture_output=True,
                text=True,
                check=True,
            )
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    total_mb = sum(results[0]["sizes"]) / 2**20
    print(f"4 x 4k outputs (5504x3072 PNG), {total_mb:.1f} MiB in all")
    print(f"{'mode':<12} {'peak before':>12} {'peak after':>11} {'growth':>8}")
    growth = {}
    for r in results:
        growth[r["mode"]] = r["after_mb"] - r["before_mb"]
        print(
            f"{r['mode']:<12} {r['before_mb']:>10.1f}MB {r['after_mb']:>9.1f}MB "
            f"{growth[r['mode']]:>6.1f}MB"
        )
    print(
        f"streaming growth: {growth['streaming']:.1f} MB (target < 64 MB); "
        f"reading whole bodies grew {growth['whole-body']:.1f} MB on the same files"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()
